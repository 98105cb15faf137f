"""Run every stage of a recipe in order into one run directory (layout: train/rundir.py), then export.

`run` reads top to bottom: start the run (directory, data, processor, architecture), then per stage either skip
it (complete) or train it (build, load the previous stage's weights, train, write the stage directory), then export.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from safetensors.torch import save_file

from train import distributed, preemption, watchdog
from train.errors import CollectiveFailed, DiskFull, Preempted, TokenizerUnavailable
from train.models import family_for, model_config
from train.models.base import ModelFamily
from train.models.tokenizers import load_tokenizer
from train.recipe import Recipe, Stage
from train.reporting import MetricsLog
from train.rundir import RunDir, atomic_write_dir

log = logging.getLogger(__name__)


@dataclass
class RunSession:
    """What every stage of one run shares."""

    recipe: Recipe
    run: RunDir
    family: ModelFamily
    processor: object
    config: object               # the family's architecture record, sized for the run's tokenizer
    metrics: MetricsLog | None   # rank 0 only
    rank: int
    world_size: int
    first: int                   # the first stage to train (those before it are complete)
    resume_from: Path | None     # the checkpoint the first stage resumes from
    previous: Path | None = None  # the last stage directory written or found complete


def run(recipe: Recipe, output: Path, force: bool = False, export: bool = True, resume: str = "auto") -> dict:
    """Train every stage not yet complete in `output`, then export. Returns {"run", "stages", "export"}."""
    preemption.install_handlers()  # before the rendezvous: a signal then must not kill the process outright
    rank, world_size = distributed.init_distributed(recipe.collective_timeout_s)
    watchdog.start(RunDir(output).stalls, rank)
    try:
        session = start_run(recipe, RunDir(output), force, resume, rank, world_size)
        summaries = [run_stage(session, index) for index in range(len(recipe.stages))]
        exported = export_run(session) if export else None
        distributed.barrier()
        return {"run": str(output), "stages": summaries, "export": exported}
    except Preempted:
        if rank == 0:
            preemption.requeue()
        raise
    except RuntimeError as err:
        lost = lost_rank(err, rank)
        if lost is None:
            raise
        raise lost from None
    finally:
        distributed.close()
        watchdog.stop()  # after close: a hang while closing is still ended by the watchdog


def lost_rank(error: RuntimeError, rank: int) -> CollectiveFailed | None:
    """A collective's failure (a peer died, stopped answering past collective_timeout_s) as the one line the run
    ends with: which collective, called from where, what the stage was doing; None for any other error."""
    collective = distributed.failed_collective(error)
    if collective is None:
        return None
    doing = watchdog.where()
    reason = (str(error).strip().splitlines() or [repr(error)])[0][:300]
    return CollectiveFailed(f"rank {rank}: collective {collective} failed{f' ({doing})' if doing else ''}: another "
                            f"rank is lost or stuck ({reason})")


def start_run(recipe: Recipe, run: RunDir, force: bool, resume: str, rank: int, world_size: int) -> RunSession:
    """Prepare the run directory, data and processor (rank 0), then read them on every rank."""
    family = family_for(recipe.model)
    if rank == 0:
        run.prepare(recipe, force, resume)
        synthesize_missing_data(recipe)
        if not run.processor.is_dir():
            atomic_write_dir(run.processor, build_processor(recipe, run.cache).save_pretrained)
    distributed.barrier()
    processor = family.load_processor(run.processor)
    config = model_config(recipe.model, processor.tokenizer)
    from train.build import check_init_weights

    check_init_weights(recipe, config)  # exit 2 naming the tensor, not a shape error in the middle of a build
    first, resume_from = run.resume_point(recipe, resume)
    return RunSession(recipe=recipe, run=run, family=family, processor=processor, config=config,
                      metrics=MetricsLog(run.metrics) if rank == 0 else None, rank=rank, world_size=world_size,
                      first=first, resume_from=resume_from)


def run_stage(session: RunSession, index: int) -> dict:
    """Skip stage `index` when it is complete, else train it. Returns its summary."""
    recipe, stage = session.recipe, session.recipe.stages[index]
    done = session.run.stage(index, stage.name)
    if index < session.first:
        log.info("stage %d/%d %s: already complete in %s, skipped", index + 1, len(recipe.stages), stage.name, done)
        session.previous = done
        return session.run.stage_summary(done)
    summary = train_and_write_stage(session, index, done)
    session.previous = done
    return summary


def train_and_write_stage(session: RunSession, index: int, done: Path) -> dict:
    from train.build import build_stage
    from train.engine import consolidated_state_dict, train_stage
    from train.hooks import stage_hooks
    from train.periodic_eval import build_periodic_eval

    recipe, stage, family, rank = session.recipe, session.recipe.stages[index], session.family, session.rank
    # a stage starts from the previous stage's final weights, the first from the recipe's
    built = build_stage(recipe, index, session.processor, session.config, rank=rank, world_size=session.world_size,
                        previous=session.previous)
    model, loader = built.model, built.loader
    if session.metrics is not None:
        session.metrics.wandb_run = _wandb_run(recipe, stage, session.run)
    periodic_eval = build_periodic_eval(recipe, index, session.processor, session.config, rank=rank,
                                        world_size=session.world_size, metrics=session.metrics)
    hooks = stage_hooks(stage, rank=rank, metrics=session.metrics, max_nonfinite_steps=recipe.max_nonfinite_steps,
                        periodic_eval=periodic_eval, checkpoint_dir=session.run.checkpoints(index, stage.name),
                        keep_last=recipe.checkpoint.keep_last)
    engine, summary = train_stage(family, model, stage, loader, rank=rank, world_size=session.world_size,
                                  hooks=hooks, resume_from=session.resume_from if index == session.first else None,
                                  reference_model=built.reference,
                                  reference_logps=session.run.reference_logps(index, stage.name, rank,
                                                                              session.world_size))
    watchdog.phase("consolidating the stage's weights")
    state, record = consolidated_state_dict(family, engine, rank), asdict(summary)
    full = None
    if rank == 0:
        watchdog.phase(f"writing {done}")
        try:
            write_stage(session, stage, state, record, done)
        except DiskFull as err:  # raised on every rank below, so none waits for rank 0 in a later collective
            full = err
        else:
            log.info("%s", format_summary(index, len(recipe.stages), record))
    if session.metrics is not None and session.metrics.wandb_run is not None:
        session.metrics.wandb_run.finish()
    watchdog.phase("waiting for rank 0 to write the stage directory")
    if distributed.all_reduce_sum(full is not None):  # also the barrier: the stage directory is written
        raise full or DiskFull(f"rank 0 ran out of space writing {done} (see its log)")
    watchdog.disarm()  # between stages: building and loading are bounded by the collective timeout
    return record


def write_stage(session: RunSession, stage: Stage, state: dict, record: dict, done: Path) -> None:
    """The stage directory: plain weights (LoRA adapters merged; the adapters alone beside them), config, summary."""
    adapters = None
    if stage.lora_components():
        from train.lora import merged_state_dict, save_adapters

        build = lambda: session.family.build(session.recipe.model, session.config, load_weights=False)  # noqa: E731
        state, adapters = merged_state_dict(session.family, state, build, stage)

    def write(tmp: Path) -> None:
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        if adapters is not None:
            save_adapters(adapters, stage, tmp / "adapters")
        session.config.save_pretrained(tmp)
        (tmp / "summary.json").write_text(json.dumps(record, indent=2) + "\n")

    atomic_write_dir(done, write)


def export_run(session: RunSession) -> str | None:
    """Export the last stage into OUTPUT/export (rank 0, once); returns its path."""
    out = session.run.export
    if session.rank == 0 and not out.exists():
        from train.export import export_stage

        export_stage(session.run.root, session.previous, out)
        log.info("export: %s (%s)", out, session.family.card(session.recipe.model)["format"])
    return str(out)


# ---------------------------------------------------------------------------------------------- building blocks


def synthesize_missing_data(recipe: Recipe) -> None:
    if recipe.synthesize is None or (Path(recipe.synthesize.out) / "index.json").is_file():
        return
    from data_pipelines.synthetic.synth import synthesize

    spec = recipe.synthesize
    log.info("synthesizing %d caption + %d VQA samples (+ %d documents, %d preference pairs) into %s", spec.samples,
             spec.samples, spec.documents, spec.preferences, spec.out)
    synthesize(Path(spec.out), samples=spec.samples, seed=spec.seed, image_size=spec.image_size,
               documents=spec.documents, preferences=spec.preferences,
               details=spec.details)


def build_processor(recipe: Recipe, cache_dir: Path, stand_in: bool = False):
    """The recipe's tokenizer (image token, chat template) + its family's image processor, as one processor that
    the run saves, so the export ships exactly what trained. `stand_in`: see load_tokenizer (benchmarks)."""
    from data_pipelines.render.templates import jinja_chat_template

    tokenizer = load_tokenizer(recipe.model, cache_dir, stand_in=stand_in)
    if recipe.template != "chat":
        tokenizer.chat_template = jinja_chat_template(recipe.template)
    return family_for(recipe.model).processor(recipe.model, tokenizer, model_config(recipe.model, tokenizer))


def model_config_offline(recipe: Recipe):
    """model_config without downloading anything: the recipe's tokenizer when it is on this machine, else the LLM
    config's vocabulary plus the tokens kakehashi adds (the image token, image start/end), the image token last."""
    import os
    import tempfile

    from train.models.configs import llm_config

    with tempfile.TemporaryDirectory() as cache:
        try:
            return model_config(recipe.model, load_tokenizer(recipe.model, os.environ.get("KAKEHASHI_CACHE", cache),
                                                             offline=True))
        except TokenizerUnavailable:  # a hub tokenizer not on this machine
            pass
    base = llm_config(recipe.model, 0).vocab_size
    added = ["image", *(["image_start", "image_end"] if recipe.model.image_start_end else [])]
    return family_for(recipe.model).config(recipe.model, base + len(added), {k: base + i for i, k in enumerate(added)})


def format_summary(index: int, total: int, s: dict) -> str:
    trained = ", ".join(c for c, n in s["trainable"].items() if n) or "nothing"
    return (
        f"stage {index + 1}/{total} {s['stage']}: {s['steps']} steps in {s['seconds']:.1f}s, "
        f"loss {s['first_loss']:.4f} -> {s['final_loss']:.4f}, trained {trained} "
        f"({sum(s['trainable'].values()):,} params), {s['samples']} samples, "
        f"{s['tokens'] / max(s['seconds'], 1e-9):,.0f} tokens/s, {s['bad_samples']} bad samples skipped, "
        f"{s['skipped_steps']} non-finite steps skipped"
    )


def _wandb_run(recipe: Recipe, stage: Stage, run: RunDir):
    """One wandb run per stage (job type = stage, group = recipe), only when the recipe configures wandb.

    The run id is kept in OUTPUT/wandb.json, so a resumed or requeued job continues the same wandb run;
    WANDB_MODE (offline, disabled) is respected by wandb itself.
    """
    if not recipe.wandb:
        return None
    import uuid

    import wandb

    ids = json.loads(run.wandb_ids.read_text()) if run.wandb_ids.is_file() else {}
    run_id = ids.setdefault(stage.name, uuid.uuid4().hex[:16])
    run.wandb_ids.write_text(json.dumps(ids, indent=2) + "\n")
    settings = {"group": recipe.name, "job_type": stage.name, "name": f"{recipe.name}/{stage.name}", **recipe.wandb}
    return wandb.init(dir=str(run.root), id=run_id, resume="allow", config=recipe.model_dump(mode="json"), **settings)
