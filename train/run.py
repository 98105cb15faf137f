"""Run every stage of a recipe in order into one output directory, then export.

OUTPUT/
  recipe.yaml                 the resolved recipe (overrides applied); a different recipe is refused
  processor/                  tokenizer (with the image token, chat template) + image processor, as LlavaProcessor
  metrics.jsonl               one JSON object per logged step
  checkpoints/NN-name/        DeepSpeed checkpoints every `save_every` steps
  stages/NN-name/             consolidated weights (model.safetensors), config.json, summary.json; written to a
                              temporary directory and renamed, so a stage directory is complete or absent
  export/                     LlavaForConditionalGeneration + AutoProcessor, loadable by plain transformers
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from train import distributed
from train.recipe import IMAGE_TOKEN, Recipe, RecipeError, Stage, UsageError, dump_recipe

log = logging.getLogger(__name__)


def stage_dir(output: Path, index: int, stage: Stage) -> Path:
    return output / "stages" / f"{index + 1:02d}-{stage.name}"


def is_complete(path: Path) -> bool:
    return (path / "summary.json").is_file()


RUN_ENTRIES = ("recipe.yaml", "processor", "cache", "metrics.jsonl", "stages", "checkpoints", "export", "wandb",
               "wandb.json", "report")


def prepare_output(output: Path, recipe: Recipe, force: bool, resume: str) -> None:
    """Refuse to mix runs: an output directory holds one recipe's run, or is new."""
    text = dump_recipe(recipe)
    stored = output / "recipe.yaml"
    occupied = output.exists() and any(output.iterdir())
    if resume == "never" and occupied:
        if not force:
            raise UsageError(f"--resume never: {output} is not empty; pass --force to start over (its run is deleted)")
        for entry in RUN_ENTRIES:
            path = output / entry
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    elif stored.is_file():
        if not _same_recipe(stored, recipe) and not force:
            raise UsageError(f"{output} holds a run of a different recipe (see its recipe.yaml); use a new --output or --force")
    elif occupied and not force:
        raise UsageError(f"{output} is not empty and holds no kakehashi run; use a new --output or --force")
    output.mkdir(parents=True, exist_ok=True)
    stored.write_text(text, encoding="utf-8")


def _same_recipe(stored: Path, recipe: Recipe) -> bool:
    """Whether OUTPUT/recipe.yaml is this recipe, compared as parsed recipes: a field added to the schema since the
    run started takes its default in both, so upgrading kakehashi does not orphan a run."""
    from train.recipe import parse_recipe

    try:
        before = parse_recipe(stored.read_text(encoding="utf-8"), str(stored), check_files=False)
    except RecipeError:
        return False
    return before.model_dump(mode="json") == recipe.model_dump(mode="json")


def resume_point(output: Path, recipe: Recipe, resume: str) -> tuple[int, Path | None]:
    """(index of the first stage to train, checkpoint to resume it from or None).

    auto: the first unfinished stage, from its newest complete checkpoint if it has one; never: stage 0 from scratch;
    a path: that checkpoint, which must belong to the first unfinished stage.
    """
    from train import checkpoint

    dirs = [stage_dir(output, i, stage) for i, stage in enumerate(recipe.stages)]
    first = next((i for i, d in enumerate(dirs) if not is_complete(d)), len(dirs))
    if resume == "never" or first == len(dirs):
        return first, None
    if resume == "auto":
        found = checkpoint.complete_checkpoints(output / "checkpoints" / dirs[first].name)
        return first, found[-1] if found else None
    path = Path(resume)
    if not (path / checkpoint.COMPLETE).is_file():
        raise UsageError(f"--resume {resume}: not a complete checkpoint (no {checkpoint.COMPLETE} marker)")
    names = [d.name for d in dirs]
    if path.parent.name not in names or path.parent.parent.resolve() != (output / "checkpoints").resolve():
        raise UsageError(f"--resume {resume}: not a checkpoint of this run (expected {output}/checkpoints/NN-stage/step-N)")
    index = names.index(path.parent.name)
    if index != first:
        state = "already finished" if index < first else f"after unfinished stage {recipe.stages[first].name}"
        raise UsageError(f"--resume {resume}: stage {recipe.stages[index].name} is {state}")
    return index, path


def synthesize_missing_data(recipe: Recipe) -> None:
    if recipe.synthesize is None:
        return
    out = Path(recipe.synthesize.out)
    if (out / "index.json").is_file():
        return
    from data_pipelines.synth import synthesize

    spec = recipe.synthesize
    print(f"synthesizing {spec.samples} caption + {spec.samples} VQA samples into {out}", flush=True)
    synthesize(out, samples=spec.samples, seed=spec.seed, image_size=spec.image_size)


def build_processor(recipe: Recipe, output: Path):
    """Tokenizer + image processor as one LlavaProcessor, saved in the run so export ships exactly what trained."""
    from transformers import LlavaProcessor

    from data_pipelines.templates import jinja_chat_template
    from train.model import build_image_processor, extra_vision_tokens, load_tokenizer, vision_config

    spec = recipe.model
    tokenizer = load_tokenizer(spec, output / "cache")
    if recipe.template != "chat":
        tokenizer.chat_template = jinja_chat_template(recipe.template)
    if spec.vision_encoder.kind == "qwen2_vl":
        from train.qwen2vl import Qwen2VLChatProcessor, image_processor, qwen2vl_config

        vision = qwen2vl_config(spec, len(tokenizer), -1).vision_config
        return Qwen2VLChatProcessor(tokenizer, image_processor(spec.vision_encoder, vision), IMAGE_TOKEN,
                                    spec.image_start_end)
    vision = vision_config(spec.vision_encoder)
    return LlavaProcessor(
        image_processor=build_image_processor(spec.vision_encoder, vision),
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=spec.vision_encoder.select_strategy,
        chat_template=tokenizer.chat_template,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=extra_vision_tokens(spec.vision_encoder),
    )


def load_processor(recipe: Recipe, directory: Path):
    if recipe.model.vision_encoder.kind == "qwen2_vl":
        from train.qwen2vl import Qwen2VLChatProcessor

        return Qwen2VLChatProcessor.from_pretrained(directory)
    from transformers import LlavaProcessor

    return LlavaProcessor.from_pretrained(directory)


def atomic_write_dir(final: Path, write) -> None:
    """Write a directory through `write(tmp)` into a temporary sibling, then rename it into place."""
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    if final.exists():
        raise UsageError(f"{final} appeared while writing it; refusing to overwrite")
    tmp.rename(final)


def stage_batches(recipe: Recipe, index: int, processor, rank: int, world_size: int):
    from data_pipelines.loader import MixtureLoader, SourceSpec
    from train.model import tokens_per_image, vision_config

    stage = recipe.stages[index]
    sources = [
        SourceSpec(shards=source.patterns, weight=source.weight, task=source.task, name=source.name or f"source{i}")
        for i, source in enumerate(stage.data)
    ]
    image_processor = processor.image_processor
    start_end = recipe.model.image_start_end
    if recipe.model.vision_encoder.kind == "qwen2_vl":  # dynamic resolution: token counts vary per image
        from data_pipelines.patches import DynamicResolutionPatches

        return MixtureLoader(
            sources, tokenizer=processor.tokenizer, patchify=DynamicResolutionPatches(image_processor),
            image_mean=tuple(image_processor.image_mean), image_std=tuple(image_processor.image_std),
            template=recipe.template, tokens_per_image=None, image_start_end=start_end, max_length=stage.max_length,
            micro_batch_size=stage.micro_batch_size, seed=recipe.seed + index, rank=rank, world_size=world_size,
            num_workers=stage.data_workers, bad_sample_limit=stage.bad_sample_limit, packing=stage.packing)
    vision = vision_config(recipe.model.vision_encoder)
    return MixtureLoader(
        sources,
        tokenizer=processor.tokenizer,
        # workers decode and resize to uint8 at the model's input size; the engine normalises on the device
        image_size=vision.image_size,
        image_mean=tuple(image_processor.image_mean),
        image_std=tuple(image_processor.image_std),
        resize_mode="shortest_edge_crop" if recipe.model.vision_encoder.kind == "clip" else "squash",
        template=recipe.template,
        tokens_per_image=tokens_per_image(recipe.model.vision_encoder, vision),
        image_start_end=start_end,
        max_length=stage.max_length,
        micro_batch_size=stage.micro_batch_size,
        seed=recipe.seed + index,
        rank=rank,
        world_size=world_size,
        num_workers=stage.data_workers,
        bad_sample_limit=stage.bad_sample_limit,
        packing=stage.packing,
    )


def run(recipe: Recipe, output: Path, force: bool = False, export: bool = True, resume: str = "auto") -> list[dict]:
    """Train every stage not yet complete in `output`, then export. Returns the stage summaries."""
    from train import preemption
    from train.engine import MetricsLog, consolidated_state_dict, train_stage
    from train.model import build_model, model_config
    from train.periodic_eval import build_periodic_eval

    preemption.install_handlers()  # before the rendezvous: a signal then must not kill the process outright
    rank, world_size = distributed.init_distributed()
    try:
        if rank == 0:
            prepare_output(output, recipe, force, resume)
            synthesize_missing_data(recipe)
            if not (output / "processor").is_dir():
                atomic_write_dir(output / "processor", build_processor(recipe, output).save_pretrained)
        distributed.barrier()
        processor = load_processor(recipe, output / "processor")
        tokenizer = processor.tokenizer
        config = model_config(recipe.model, len(tokenizer), tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
        metrics = MetricsLog(output / "metrics.jsonl") if rank == 0 else None
        first, resume_from = resume_point(output, recipe, resume)

        summaries, previous = [], None
        for index, stage in enumerate(recipe.stages):
            done = stage_dir(output, index, stage)
            if index < first:
                summaries.append(json.loads((done / "summary.json").read_text()))
                if rank == 0:
                    print(f"stage {index + 1}/{len(recipe.stages)} {stage.name}: already complete in {done}, skipped")
                previous = done
                continue
            torch.manual_seed(recipe.seed)  # random-init components are identical on every rank
            llava = build_model(recipe.model, config, load_weights=previous is None)
            if previous is not None:  # a stage starts from the previous stage's final weights
                llava.load_state_dict(load_file(previous / "model.safetensors"))
            batches = stage_batches(recipe, index, processor, rank, world_size)
            if metrics is not None:
                metrics.wandb_run = _wandb_run(recipe, stage, output)
            engine, summary = train_stage(
                llava, stage, batches, metrics, rank=rank, world_size=world_size,
                checkpoint_dir=output / "checkpoints" / done.name,
                resume_from=resume_from if index == first else None,
                keep_last=recipe.checkpoint.keep_last, max_nonfinite_steps=recipe.max_nonfinite_steps,
                bad_samples=lambda: dict(batches.stats["bad"]),
                periodic_eval=build_periodic_eval(recipe, index, processor, rank=rank, world_size=world_size,
                                                  metrics=metrics),
            )
            state = consolidated_state_dict(engine, rank)
            if rank == 0:
                record = asdict(summary)
                adapters = None
                if stage.lora_components():  # the stage's weights are plain LLaVA: adapters merged in
                    from train.lora import merged_state_dict

                    state, adapters = merged_state_dict(
                        state, lambda: build_model(recipe.model, config, load_weights=False), stage
                    )

                def write_stage(tmp: Path) -> None:
                    save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
                    if adapters is not None:
                        from train.lora import save_adapters

                        save_adapters(adapters, stage, tmp / "adapters")
                    config.save_pretrained(tmp)
                    (tmp / "summary.json").write_text(json.dumps(record, indent=2) + "\n")

                atomic_write_dir(done, write_stage)
                print(format_summary(index, len(recipe.stages), record), flush=True)
                summaries.append(record)
            if metrics is not None and metrics.wandb_run is not None:
                metrics.wandb_run.finish()
            distributed.barrier()
            del engine, llava, state
            previous = done

        if export and rank == 0 and not (output / "export").exists():
            from train.export import export_stage

            export_stage(output, previous, output / "export")
            kind = "kakehashi format, train.chat.load_export" if recipe.model.vision_encoder.kind == "qwen2_vl" else \
                "LlavaForConditionalGeneration + AutoProcessor"
            print(f"export: {output / 'export'} ({kind})", flush=True)
        distributed.barrier()
        return summaries
    except preemption.Preempted:
        if rank == 0:
            preemption.requeue()
        raise
    finally:
        distributed.close()


def format_summary(index: int, total: int, s: dict) -> str:
    trained = ", ".join(c for c, n in s["trainable"].items() if n) or "nothing"
    return (
        f"stage {index + 1}/{total} {s['stage']}: {s['steps']} steps in {s['seconds']:.1f}s, "
        f"loss {s['first_loss']:.4f} -> {s['final_loss']:.4f}, trained {trained} "
        f"({sum(s['trainable'].values()):,} params), {s['samples']} samples, "
        f"{s['tokens'] / max(s['seconds'], 1e-9):,.0f} tokens/s, {s['bad_samples']} bad samples skipped, "
        f"{s['skipped_steps']} non-finite steps skipped"
    )


def _wandb_run(recipe: Recipe, stage: Stage, output: Path):
    """One wandb run per stage (job type = stage, group = recipe), only when the recipe configures wandb.

    The run id is kept in OUTPUT/wandb.json, so a resumed or requeued job continues the same wandb run;
    WANDB_MODE (offline, disabled) is respected by wandb itself.
    """
    if not recipe.wandb:
        return None
    import uuid

    import wandb

    ids_path = output / "wandb.json"
    ids = json.loads(ids_path.read_text()) if ids_path.is_file() else {}
    run_id = ids.setdefault(stage.name, uuid.uuid4().hex[:16])
    ids_path.write_text(json.dumps(ids, indent=2) + "\n")
    settings = {"group": recipe.name, "job_type": stage.name, "name": f"{recipe.name}/{stage.name}", **recipe.wandb}
    return wandb.init(dir=str(output), id=run_id, resume="allow", config=recipe.model_dump(mode="json"), **settings)


__all__ = ["run", "RecipeError", "UsageError"]
