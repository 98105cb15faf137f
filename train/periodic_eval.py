"""Evaluation inside a training stage: every `eval_every` steps and at the stage end, the validation loss per eval
source on a fixed set of samples (the first `eval_samples` usable samples of each source, the same every time), and
exact match / character ROUGE-L of greedy answers to the first `eval_generate` VQA samples among them.

Samples are made by the training loader's own per-sample path (MixtureLoader.build_example, on a loader built as
the stage's), so eval sees exactly what training would, for every model family.

An eval_data entry may instead name a benchmark and its path (train/benchmarks/periodic.py): its judge-free metrics
on eval-mm's scale join the same record as `eval/<name>/<metric>`.

Written as `"kind": "eval"` records to metrics.jsonl (and wandb, with a table of the generations and their images).

Lockstep across ranks, because under ZeRO-3 every forward all-gathers parameters collectively: ranks split each
source's samples, all run the same number of forwards (a rank whose share ran out repeats a sample at weight 0), and
the sums are all-reduced. Every rank answers every VQA sample, with `synced_gpus` under ZeRO-3 so that all run the
same number of decoding steps. The global RNG is forked around it all and module modes restored, so training
computes exactly the same with periodic eval on or off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from data_pipelines.batch.collate import collate, model_inputs
from data_pipelines.image.images import ImageError, decode_image
from data_pipelines.read.shard_reader import iter_raw_samples
from data_pipelines.read.shards import expand_shard_patterns
from data_pipelines.render.example import Example
from data_pipelines.render.samples import BadSample
from data_pipelines.render.tokenize import pad_token_id
from train import distributed
from train.benchmarks.generate import answer
from train.benchmarks.metrics import exact_match, rouge_l_chars_f1
from train.data import source_specs, stage_loader
from train.errors import UsageError
from train.evaluate import first_turn
from train.models import family_for, model_config
from train.recipe import DataSource, Stage
from train.stages import resolve_stage

MAX_NEW_TOKENS = 32  # as `kakehashi eval`


@dataclass
class VqaSample:
    source: str
    key: str
    images: list  # PIL images the first turn shows
    question: str
    reference: str


@dataclass
class EvalSet:
    sources: dict[str, list[Example]]  # eval source name -> its fixed samples, in shard order
    vqa: list[VqaSample]


def shard_sources(stage: Stage) -> list[DataSource]:
    """The stage's eval sources read from shards (the others are benchmarks)."""
    return [source for source in stage.eval_data if source.benchmark is None]


def source_names(sources: list[DataSource]) -> list[str]:
    """`name`, else the task; a repeated name gets its index (eval_loss/<name> must be unique)."""
    names = [s.name or s.task for s in sources]
    return [n if names.count(n) == 1 else f"{n}{i}" for i, n in enumerate(names)]


def load_eval_set(stage: Stage, loader) -> EvalSet:
    """The first `eval_samples` usable samples of each eval source, made by `loader` (a MixtureLoader over the eval
    sources, as the stage's training loader is built) exactly as training makes its samples."""
    sources, vqa = {}, []
    shards = shard_sources(stage)
    for index, (name, source) in enumerate(zip(source_names(shards), shards)):
        examples = sources.setdefault(name, [])
        for raw in (raw for shard in expand_shard_patterns(source.patterns) for raw in iter_raw_samples(shard)):
            if len(examples) >= stage.eval_samples:
                break
            try:
                example, question = loader.build_example(raw, index), None
                if source.task == "vqa" and len(vqa) < stage.eval_generate:
                    prompt, shown, reference = first_turn(raw.meta, [decode_image(data) for data in raw.images])
                    question = VqaSample(name, raw.key, shown, prompt, reference)
            except (BadSample, ImageError):
                continue  # the training loader counts bad samples; eval just takes the next usable one
            examples.append(example)
            vqa += [question] if question else []
        if not examples:
            raise UsageError(f"stage {stage.name}: eval_data source {name!r} ({', '.join(source.patterns)}) has no "
                             f"usable {source.task} sample within max_length {stage.max_length}")
    return EvalSet(sources, vqa)


class PeriodicEval:
    def __init__(self, family, stage: Stage, eval_set: EvalSet, processor, *, rank: int, world_size: int,
                 metrics=None, benchmarks: list | None = None):
        self.family, self.stage, self.eval_set, self.processor = family, stage, eval_set, processor
        self.benchmarks = benchmarks or []  # train/benchmarks/periodic.py BenchmarkEval
        self.rank, self.world_size, self.metrics = rank, world_size, metrics
        self.lockstep = resolve_stage(stage, world_size).lockstep
        image_processor = processor.image_processor
        self.image_mean, self.image_std = tuple(image_processor.image_mean), tuple(image_processor.image_std)
        tokenizer = processor.tokenizer
        self.pad_token_id = pad_token_id(tokenizer)

    def due(self, step: int) -> bool:
        return step % self.stage.eval_every == 0 or step == self.stage.steps

    def maybe_run(self, engine, step: int) -> dict | None:
        return self.run(engine, step) if self.due(step) else None

    def run(self, engine, step: int) -> dict:
        """Evaluate on every rank (collectively); rank 0 writes the record. Returns the record.

        `engine`: the DeepSpeed engine, or the bare training module (family.training_module) it wraps.
        """
        modes = {module: module.training for module in engine.modules()}  # the engine and all it wraps
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                engine.eval()
                record = {"kind": "eval", "stage": self.stage.name, "step": step, **self.losses(engine)}
                model = self.family.unwrap(getattr(engine, "module", engine))
                answers = self.generate(model)
                for benchmark in self.benchmarks:
                    record.update(benchmark.run(model, self.processor, synced_gpus=self.lockstep))
        finally:
            for module, training in modes.items():
                module.train(training)
        if answers:
            record["eval_vqa_samples"] = len(answers)
            record["eval_exact_match"] = sum(exact_match(a, s.reference) for s, a in answers) / len(answers)
            record["eval_rouge_l_chars_f1"] = sum(rouge_l_chars_f1(a, s.reference) for s, a in answers) / len(answers)
        if self.metrics is not None:
            self.metrics.write(record)
            if self.metrics.wandb_run is not None and answers:
                self.metrics.wandb_run.log({f"{self.stage.name}/eval_generations": generation_table(step, answers)})
        return record

    def losses(self, engine) -> dict:
        """eval_loss/<source>: mean token loss over the source's fixed samples, all ranks together."""
        if not self.eval_set.sources:  # benchmarks only
            return {}
        device = distributed.device()
        micro = self.stage.micro_batch_size
        sums = []
        for examples in self.eval_set.sources.values():
            share = examples[self.rank::self.world_size]
            forwards = math.ceil(math.ceil(len(examples) / self.world_size) / micro)  # the same on every rank
            loss_sum, count = 0.0, 0
            for index in range(forwards):
                chunk = share[index * micro:(index + 1) * micro]
                batch = collate(chunk or examples[:1], self.pad_token_id)  # an empty share still joins the gather
                chunk_loss, chunk_count = engine(**model_inputs(batch, device, self.image_mean, self.image_std))
                if chunk:
                    loss_sum, count = loss_sum + chunk_loss.item(), count + int(chunk_count)
            sums += [loss_sum, count]
        totals = torch.tensor(sums, dtype=torch.float64, device=device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(totals)
        names = list(self.eval_set.sources)
        record = {f"eval_loss/{name}": totals[2 * i].item() / totals[2 * i + 1].item()
                  for i, name in enumerate(names) if totals[2 * i + 1] > 0}
        if names and totals[1::2].sum() > 0:
            record["eval_loss"] = (totals[0::2].sum() / totals[1::2].sum()).item()
        return record

    def generate(self, model) -> list[tuple[VqaSample, str]]:
        return [(sample, answer(model, self.processor, sample.images, sample.question, MAX_NEW_TOKENS,
                                synced_gpus=self.lockstep))
                for sample in self.eval_set.vqa]


def generation_table(step: int, answers: list[tuple[VqaSample, str]]):
    import wandb

    table = wandb.Table(columns=["step", "source", "key", "image", "question", "answer", "reference"])
    for sample, said in answers:
        image = wandb.Image(sample.images[0]) if sample.images else None
        table.add_data(step, sample.source, sample.key, image, sample.question, said, sample.reference)
    return table


def build_periodic_eval(recipe, index: int, processor, config=None, *, rank: int, world_size: int, metrics=None):
    """The stage's PeriodicEval, or None when its `eval_every` is 0. `config`: the model's architecture record
    (default: the recipe's, sized for the processor's tokenizer)."""
    stage = recipe.stages[index]
    if not stage.eval_every:
        return None
    from train.benchmarks.periodic import load_benchmark_evals

    config = config if config is not None else model_config(recipe.model, processor.tokenizer)
    eval_set, shards = EvalSet({}, []), shard_sources(stage)
    if shards:
        specs = source_specs(shards)
        for spec, name in zip(specs, source_names(shards)):
            spec.name = name
        loader = stage_loader(recipe, index, processor, config, rank=0, world_size=1, sources=specs, num_workers=0)
        eval_set = load_eval_set(stage, loader)
    benchmarks = load_benchmark_evals([s for s in stage.eval_data if s.benchmark is not None], stage.eval_samples,
                                      recipe.template)
    return PeriodicEval(family_for(recipe.model), stage, eval_set, processor, rank=rank, world_size=world_size,
                        metrics=metrics, benchmarks=benchmarks)
