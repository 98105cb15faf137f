"""The recipe: one YAML file, parsed into a typed, self-validating config.

The recipe is the single source of truth for a run. Unknown keys are rejected everywhere, every problem is
collected before anything runs, and each problem names its field path (and YAML line where known).
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from data_pipelines.render.samples import TASKS  # the source tasks: caption, vqa, interleaved
from data_pipelines.render.templates import (
    IMAGE_PLACEHOLDER as IMAGE_TOKEN,  # the placeholder in shard text and its token
)
from data_pipelines.render.templates import TEMPLATES as TEMPLATE_FORMATS
from train.errors import RecipeError, UsageError  # noqa: F401 (re-exported: the recipe's errors)
from train.models.loss import DEFAULT_LOSS, LOSSES

COMPONENTS = ("vision_encoder", "projector", "llm")
Component = Literal["vision_encoder", "projector", "llm"]
TEMPLATES = tuple(TEMPLATE_FORMATS)  # the templates' names, defined once with their formats
TemplateName = Literal[TEMPLATES]
SCHEDULES = ("cosine", "wsd", "constant")  # a stage's lr schedule (train/stages.py: lr_multiplier)
DECAYS = ("linear", "cosine")               # the shape of the wsd schedule's final decay
OBJECTIVES = ("sft", "dpo", "mpo")          # what a stage minimises (train/objectives.py)
PREFERENCE_TASK = "preference"              # the task of a preference stage's sources (chosen/rejected pairs)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_REVISION = re.compile(r"^[0-9a-f]{40}$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


def _files_checked(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get("check_files"))


def _is_local_path(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~")) or os.path.exists(value) or not _HUB_ID.match(value)


class ComponentSource(Strict):
    """Where a component's architecture and weights come from.

    `path` (local directory or hub id) gives weights; `config` (inline mapping or a JSON/YAML file) gives the
    architecture. With only `config` the component is randomly initialised (tiny models, benchmarks); with both,
    `config` lets `recipe check` run offline and must agree with the weights.
    """

    path: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    config: dict[str, Any] | str | None = None

    @field_validator("path")
    @classmethod
    def _path_exists(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and _files_checked(info) and _is_local_path(value):
            if not Path(value).expanduser().exists():
                raise ValueError(f"no such file or directory: {value}")
        return value

    @field_validator("config")
    @classmethod
    def _config_file_exists(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, str) and _files_checked(info) and not Path(value).expanduser().is_file():
            raise ValueError(f"no such config file: {value}")
        return value

    @model_validator(mode="after")
    def _source_and_safety(self) -> ComponentSource:
        if self.path is None and self.config is None:
            raise ValueError("give `path` (weights) or `config` (architecture), or both")
        if self.trust_remote_code and not (self.revision and _REVISION.match(self.revision)):
            raise ValueError("trust_remote_code needs `revision` pinned to a 40-hex commit, so the code you run is "
                             "the code you read")
        return self


class InitSource(Strict):
    """A whole VLM a recipe starts from (`model.init`): a llava-hf checkpoint, a kakehashi export of either family,
    or a checkpoint in Sarashina2-Vision's layout. Its config.json gives the architecture (filled into the component
    sections, which must agree where they are given), its files the weights, and by default the tokenizer and the
    chat template."""

    path: str
    revision: str | None = None
    trust_remote_code: bool = False

    @field_validator("path")
    @classmethod
    def _path_exists(cls, value: str, info: ValidationInfo) -> str:
        if _files_checked(info) and _is_local_path(value) and not Path(value).expanduser().is_dir():
            raise ValueError(f"no such directory: {value}")
        return value

    @model_validator(mode="after")
    def _safety(self) -> InitSource:
        if self.trust_remote_code and not (self.revision and _REVISION.match(self.revision)):
            raise ValueError("trust_remote_code needs `revision` pinned to a 40-hex commit")
        return self


def _families() -> dict:
    from train.models import FAMILIES  # the registry: vision_encoder.kind -> model family

    return FAMILIES


class Tiling(Strict):
    """Dynamic tiling (LLaVA-OneVision's anyres): each image alone in its sample is read as a thumbnail plus the grid
    of rows x cols tiles (min_tiles <= rows * cols <= max_tiles) that best keeps its resolution and aspect."""
    max_tiles: int = Field(ge=1, le=36)
    min_tiles: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> Tiling:
        if self.min_tiles > self.max_tiles:
            raise ValueError(f"min_tiles {self.min_tiles} is over max_tiles {self.max_tiles}")
        return self


class VisionEncoder(ComponentSource):
    kind: str = "siglip"                               # a model family's kind (train/models): siglip, clip, qwen2_vl
    feature_layer: int = -1                            # hidden state fed to the projector (-2 as LLaVA-1.5)
    select_strategy: Literal["full", "default"] = "full"  # default drops the CLS token (CLIP)
    # dynamic-resolution encoders (qwen2_vl) only: each image is resized (aspect kept) to between min_pixels and
    # max_pixels, in multiples of patch_size * spatial_merge_size, so its token count varies with its size
    min_pixels: int | None = Field(None, gt=0)
    max_pixels: int | None = Field(None, gt=0)
    tiling: Tiling | None = None                       # fixed-size towers: tiles + thumbnail per image (Tiling)

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, value: str) -> str:
        if value not in _families():
            raise ValueError(f"unknown kind {value!r}; known: {', '.join(_families())}")
        return value


class Projector(Strict):
    kind: str = "mlp2x_gelu"                           # mlp2x_gelu (LLaVA) | qwen2_vl_merger (Qwen2-VL's 2x2 merger)
    norm: bool = False                                 # qwen2_vl_merger: a LayerNorm after it (as Sarashina2-Vision)
    # mlp2x_gelu: the width between its two linears; None: the LLM's hidden size (LLaVA's). The released Asagi 8B
    # and 14B are twice the LLM's width. Strict: a YAML `true` or `1.5` is a mistake, not a width of 1
    hidden_size: int | None = Field(None, gt=0, strict=True)


class ModelSpec(Strict):
    init: InitSource | None = None                     # start from a whole VLM (see InitSource); `init: PATH` too
    vision_encoder: VisionEncoder
    projector: Projector = Projector()
    llm: ComponentSource
    tokenizer: str = Field(description="'builtin:tiny-ja' / 'builtin:tiny-ja-sp', a local directory, or a hub id")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"  # flash_attention_2: flash-attn, GPU
    # wrap each image's tokens in these two special tokens (added to the tokenizer when missing; never targets)
    image_start_end: tuple[str, str] | None = None
    # the training loss: chunked (LM head + cross-entropy `loss_chunk_size` tokens at a time, recomputed in backward,
    # so the [tokens, vocab] logits are never held whole), full (all logits at once: the reference to compare
    # against), liger (Liger's fused linear cross-entropy: CUDA, liger-kernel installed, no ZeRO-3)
    loss: Literal[LOSSES] = DEFAULT_LOSS[0]
    loss_chunk_size: int = Field(DEFAULT_LOSS[1], gt=0)       # 1024 x a 100k vocabulary: 0.4 GB of fp32 logits

    @model_validator(mode="before")
    @classmethod
    def _from_init(cls, data: Any) -> Any:
        """With `init`, the components' architecture, the tokenizer and the family's fields come from the
        checkpoint (train.models.init_fields); what the recipe gives must agree with it."""
        if not isinstance(data, dict) or not data.get("init"):
            return data
        from train.models import init_fields

        init = data["init"] if isinstance(data["init"], dict) else {"path": data["init"]}
        fields = init_fields(init)  # ValueError naming the problem when the checkpoint cannot be read
        problems = []
        merged = {**data, "init": init, "tokenizer": data.get("tokenizer") or init["path"]}
        for section, defaults in fields.items():
            given = data.get(section) or {}
            if isinstance(given, dict) and given.get("path"):
                problems.append(f"{section}.path: the weights come from model.init; drop the component's path")
            merged[section] = _agree(section, given, defaults, init["path"], problems)
        if problems:
            raise ValueError("; ".join(problems))
        return merged

    @model_validator(mode="after")
    def _fits_its_family(self) -> ModelSpec:
        from train.models import TILED_FAMILIES, family_for

        families, kind, projector = _families(), self.vision_encoder.kind, self.projector.kind
        if self.vision_encoder.tiling is not None and kind not in TILED_FAMILIES:
            raise ValueError(f"vision_encoder.tiling: kind {kind} does not tile "
                             f"(tiling takes {' / '.join(TILED_FAMILIES)})")
        family, problems = family_for(self), []
        if projector not in family.projector_kinds:
            fits = [k for k, f in families.items() if projector in f.projector_kinds]
            problems.append(f"projector.kind {projector} does not fit vision_encoder.kind {self.vision_encoder.kind}: "
                            f"{self.vision_encoder.kind} takes {' / '.join(family.projector_kinds)}"
                            + (f"; {projector} goes with {' / '.join(fits)}" if fits else ""))
        if self.image_start_end and (len(set(self.image_start_end)) < 2 or IMAGE_TOKEN in self.image_start_end):
            problems.append(f"image_start_end needs two different tokens, neither {IMAGE_TOKEN}")
        problems += family.validate(self)
        if self.loss == "liger" and importlib.util.find_spec("liger_kernel") is None:
            problems.append("loss: liger needs the liger-kernel package, which is not installed here "
                            "(pip install liger-kernel, or loss: chunked)")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer_exists(cls, value: str, info: ValidationInfo) -> str:
        if value.startswith("builtin:"):
            from data_pipelines.synthetic.tiny_tokenizer import BUILDERS

            if value not in BUILDERS:
                raise ValueError(f"unknown builtin tokenizer {value!r}; valid: {', '.join(BUILDERS)}")
        elif _files_checked(info) and _is_local_path(value) and not Path(value).expanduser().exists():
            raise ValueError(f"no such file or directory: {value}")
        return value


def _agree(section: str, given: Any, defaults: Any, init: str, problems: list[str]) -> Any:
    """`defaults` (from model.init's checkpoint) with `given` (the recipe's) on top; a given value that differs from
    the checkpoint's is a problem naming the field and both values."""
    if not isinstance(defaults, dict) or not isinstance(given, dict):
        if given not in (None, {}) and given != defaults:
            problems.append(f"{section}: {given!r} in the recipe, {defaults!r} in model.init ({init})")
        return defaults if given in (None, {}) else given
    merged = dict(defaults)
    for key, value in given.items():
        if key in defaults and key != "path":
            merged[key] = _agree(f"{section}.{key}", value, defaults[key], init, problems)
        else:
            merged[key] = value
    return merged


class DataSource(Strict):
    shards: str | list[str]                            # brace patterns / globs, e.g. data/cap-{000000..000009}.tar
    weight: float = Field(1.0, gt=0)                   # share of the samples drawn
    task: str                                          # caption | vqa | interleaved (render.samples.TASKS)
    name: str | None = None                            # default source<i>; metrics log loss/<name>
    loss_weight: float = Field(1.0, gt=0)              # the source's tokens' weight in the step's loss

    @property
    def patterns(self) -> list[str]:
        return [self.shards] if isinstance(self.shards, str) else list(self.shards or ())

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str | None) -> str | None:
        if value is not None and value not in TASKS:
            raise ValueError(f"unknown task {value!r}; known: {', '.join(TASKS)}")
        return value

    @field_validator("shards")
    @classmethod
    def _shards_exist(cls, value: str | list[str] | None, info: ValidationInfo) -> str | list[str] | None:
        if value is None or not _files_checked(info) or not info.context.get("check_data", True):
            return value
        from data_pipelines.read.shards import expand_shard_patterns

        synth_out = info.context.get("synth_out")
        for pattern in [value] if isinstance(value, str) else value:
            remote = "://" in pattern or pattern.startswith("pipe:")
            will_be_synthesised = synth_out is not None and Path(pattern).parent == Path(synth_out)
            if remote or will_be_synthesised:
                continue
            try:
                expand_shard_patterns([pattern])
            except FileNotFoundError:
                raise ValueError(f"no shard matches {pattern!r}") from None
        return value


def _benchmarks() -> dict:
    from train.benchmarks import TASKS  # the benchmark tasks kakehashi scores as eval-mm does

    return TASKS


class EvalSource(DataSource):
    """An eval_data entry: shards and a task, as `data` (validation loss, and answers to VQA samples), or a benchmark
    task read from `path` in its published schema (train/benchmarks/; its judge-free metrics on the first
    `eval_samples` samples, logged as eval/<name>/<metric>)."""

    shards: str | list[str] | None = None
    task: str | None = None
    benchmark: str | None = None
    path: str | None = None

    @model_validator(mode="after")
    def _shards_or_benchmark(self, info: ValidationInfo) -> EvalSource:
        problems = ["loss_weight weighs training sources only"] if self.loss_weight != 1.0 else []
        if self.benchmark is None:
            problems += [f"{f} is missing (or name a `benchmark` and its `path`)" for f in ("shards", "task")
                         if getattr(self, f) is None]
            problems += ["path is set but benchmark is not"] if self.path is not None else []
        else:
            if self.benchmark not in _benchmarks():
                problems.append(f"benchmark: unknown task {self.benchmark!r}; known: {', '.join(_benchmarks())}")
            problems += [f"{f} does not go with benchmark (its samples come from `path`)" for f in ("shards", "task")
                         if getattr(self, f) is not None]
            if self.path is None:
                problems.append("path is missing: the benchmark's save_to_disk folder, parquet or jsonl file")
            elif _files_checked(info) and info.context.get("check_data", True) and \
                    not Path(self.path).expanduser().exists():
                problems.append(f"path: no such file or directory: {self.path}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class LearningRates(Strict):
    vision_encoder: float | None = Field(None, gt=0)
    projector: float | None = Field(None, gt=0)
    llm: float | None = Field(None, gt=0)


class LoraSpec(Strict):
    """Train a component through LoRA (or DoRA) adapters; its own weights stay frozen and adapters merge at the end."""

    rank: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(
        default=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], min_length=1
    )
    dora: bool = False


class StageLora(Strict):
    vision_encoder: LoraSpec | None = None
    llm: LoraSpec | None = None


class MpoWeights(Strict):
    """MPO's terms (InternVL's mixed preference optimization; its defaults): the preference loss (`loss`), the
    quality loss (BCO pair: each answer against the reference on its own) and the generation loss (SFT on chosen)."""

    preference: float = Field(0.8, ge=0)
    quality: float = Field(0.2, ge=0)
    generation: float = Field(1.0, ge=0)


class PreferenceSpec(Strict):
    """A dpo or mpo stage's settings, named as TRL's DPOConfig names them (train/objectives.py)."""

    beta: float = Field(0.1, gt=0)                     # the strength of the pull toward the reference
    loss: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"  # DPO's loss (and MPO's preference term)
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)  # sigmoid only: conservative DPO's share of flipped labels
    # the reference policy (the stage's starting weights, frozen): `copy` holds a second model (partitioned as the
    # policy under ZeRO-3); `adapters` runs the policy with its LoRA adapters off (no copy; every trained component
    # must train through adapters); `precomputed` reads its log-probabilities from a first pass over the stage's
    # data before training (no copy; stored in the run directory, reused on resume)
    reference: Literal["copy", "adapters", "precomputed"] = "copy"
    mpo: MpoWeights = MpoWeights()


class Stage(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][\w.-]*$")
    train: list[Component]                             # trained components; the others are frozen
    lr: LearningRates
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)      # linear warmup from 0 over this share of the steps, then:
    schedule: str = "cosine"                           # cosine: decay to min_lr_ratio * lr over the rest;
                                                       #   wsd: flat at lr, then `decay` over the last decay_ratio;
                                                       #   constant: flat at lr after the warmup
    decay_ratio: float | None = Field(None, gt=0, le=1)  # wsd only: share of the steps the final decay takes
    decay: str = "linear"                              # wsd only: linear | cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    steps: int = Field(gt=0)                           # optimizer steps
    global_batch_size: int = Field(gt=0)               # rows per optimizer step, all ranks
    micro_batch_size: int = Field(gt=0)                # rows per forward on one rank
    max_length: int = Field(gt=0)                      # tokens per row, image tokens included
    packing: bool = True                               # a row holds several samples (no attention across them);
                                                       #   off: one sample per row, padded to the batch's longest
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["fp32", "bf16"] = "bf16"
    gradient_checkpointing: bool | list[Literal["vision_encoder", "llm"]] = False  # true: both; costs ~20-30% time
    compile: bool = False                              # torch.compile each LLM decoder layer (GPU; first steps slow)
    max_grad_norm: float = Field(1.0, gt=0)
    save_every: int = Field(0, ge=0)                   # steps between DeepSpeed checkpoints; 0 = stage end only
    log_every: int = Field(1, gt=0)
    lora: StageLora = StageLora()                      # components trained through adapters (must be in `train`)
    vision_encoder_last_blocks: int | None = Field(None, gt=0)  # train only the vision encoder's last k blocks
    data_workers: int = Field(2, ge=0)                 # dataloader worker processes per rank (0: in the main one)
    # stall watchdog (train/watchdog.py): when no optimizer step completes in this many seconds (data, forward,
    # backward, collectives, the hooks' checkpoint and eval included), every rank that can logs all its threads'
    # stacks and exits 6; 0 = off. Well above the slowest step (the first, compiling, included)
    watchdog_s: int = Field(1800, ge=0)
    bad_sample_limit: float = Field(0.01, ge=0, le=1)  # the stage fails when more of the samples read are bad
    max_images_per_sample: int | None = Field(None, gt=0)  # interleaved documents keep their first N images (the
                                                       #   text around the others stays); None: all that fit
    data: list[DataSource] = Field(min_length=1)
    objective: Literal[OBJECTIVES] = "sft"             # sft: next-token loss on targets; dpo | mpo: on pairs
    preference: PreferenceSpec | None = None           # dpo | mpo settings (defaults when left out)
    # periodic evaluation (train/periodic_eval.py): every `eval_every` steps and at the stage end; 0 = off
    eval_every: int = Field(0, ge=0)
    eval_data: list[EvalSource] = []                   # held-out sources as `data`, or {benchmark, path}
    eval_samples: int = Field(32, gt=0)                # the first N usable samples of each eval source, every time
    eval_generate: int = Field(4, ge=0)                # of those, VQA samples answered greedily (exact match, ROUGE-L)

    @field_validator("train")
    @classmethod
    def _trains_something(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("stage trains nothing: list at least one of vision_encoder, projector, llm")
        if len(set(value)) != len(value):
            raise ValueError("a component is listed twice")
        return value

    @field_validator("schedule")
    @classmethod
    def _known_schedule(cls, value: str) -> str:
        if value not in SCHEDULES:
            raise ValueError(f"unknown schedule {value!r}; known: {', '.join(SCHEDULES)}")
        return value

    @field_validator("decay")
    @classmethod
    def _known_decay(cls, value: str) -> str:
        if value not in DECAYS:
            raise ValueError(f"unknown decay {value!r}; known: {', '.join(DECAYS)}")
        return value

    def _schedule_problems(self) -> list[str]:
        if self.schedule != "wsd":
            # non-defaults only: a resolved recipe (dump_recipe) spells every default out
            given = ["decay_ratio"] * (self.decay_ratio is not None) + ["decay"] * (self.decay != "linear")
            return [f"{f} is set but schedule is {self.schedule} (it shapes the wsd schedule only)" for f in given]
        if self.decay_ratio is None:
            return ["decay_ratio is missing: schedule wsd decays over the last decay_ratio of the steps"]
        if self.warmup_ratio + self.decay_ratio > 1:
            return [f"warmup_ratio {self.warmup_ratio} + decay_ratio {self.decay_ratio} is more than 1: "
                    "the warmup and the decay overlap"]
        return []

    def _objective_problems(self) -> list[str]:
        if self.objective == "sft":
            problems = [f"data.{i}: task {PREFERENCE_TASK} needs objective dpo or mpo"
                        for i, source in enumerate(self.data) if source.task == PREFERENCE_TASK]
            return problems + ["preference is set but objective is sft"] * (self.preference is not None)
        if self.preference is None:
            self.preference = PreferenceSpec()
        problems = [f"data.{i}: objective {self.objective} trains on pairs; task {source.task} is not "
                    f"{PREFERENCE_TASK}" for i, source in enumerate(self.data) if source.task != PREFERENCE_TASK]
        if self.packing:
            problems.append(f"packing: a {self.objective} stage runs one pair per row; set packing: false")
        if self.preference.label_smoothing and self.preference.loss != "sigmoid":
            problems.append(f"preference.label_smoothing applies to loss sigmoid, not {self.preference.loss}")
        if self.preference.reference == "adapters":
            plain = [c for c in self.train if c not in self.lora_components()]
            if plain:
                problems.append(f"preference.reference: adapters needs every trained component to train through "
                                f"LoRA; {', '.join(plain)} trains its own weights (use reference: copy)")
        if self.objective == "dpo" and self.preference.mpo != MpoWeights():  # a dumped recipe spells the defaults
            problems.append("preference.mpo is set but objective is dpo (its weights shape mpo only)")
        return problems

    @model_validator(mode="after")
    def _consistent(self) -> Stage:
        problems = self._schedule_problems() + self._objective_problems()
        for component in COMPONENTS:
            lr = getattr(self.lr, component)
            if component in self.train and lr is None:
                problems.append(f"lr.{component} is missing but the stage trains {component}")
            if component not in self.train and lr is not None:
                problems.append(f"lr.{component} is set but the stage freezes {component}")
        for component in self.lora_components():
            if component not in self.train:
                problems.append(f"lora.{component} is set but the stage freezes {component}")
        if self.eval_every and not self.eval_data:
            problems.append(f"eval_data is missing but eval_every is {self.eval_every}")
        if self.eval_data and not self.eval_every:
            problems.append("eval_data is set but eval_every is 0 (periodic eval off); "
                            "set eval_every or drop eval_data")
        if self.vision_encoder_last_blocks is not None:
            if not self.trains("vision_encoder"):
                problems.append("vision_encoder_last_blocks is set but the stage freezes vision_encoder")
            if self.lora.vision_encoder is not None:
                problems.append("vision_encoder_last_blocks and lora.vision_encoder cannot be combined")
        if self.global_batch_size % self.micro_batch_size:
            problems.append(
                f"global_batch_size {self.global_batch_size} is not a multiple of "
                f"micro_batch_size {self.micro_batch_size}"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def trains(self, component: str) -> bool:
        return component in self.train

    def source_names(self) -> list[str]:
        """Each `data` source's name as the loader and the metrics (loss/<name>) give it: `name`, else source<i>;
        a repeated name gets its index."""
        names = [source.name or f"source{i}" for i, source in enumerate(self.data)]
        return [n if names.count(n) == 1 else f"{n}{i}" for i, n in enumerate(names)]

    def lora_components(self) -> dict[str, LoraSpec]:
        return {c: spec for c in ("vision_encoder", "llm") if (spec := getattr(self.lora, c)) is not None}


class Synthesize(Strict):
    """Generate the embedded synthetic shapes set into `out` when its shards are missing."""

    out: str
    samples: int = Field(2000, gt=0)
    seed: int = 0
    image_size: int = Field(64, gt=0)
    documents: int = Field(0, ge=0)                    # interleaved documents (docs-*.tar; task interleaved)
    preferences: int = Field(0, ge=0)                  # preference pairs (prefs-*.tar; task preference)
    details: int = Field(0, ge=0)                      # VQA on small shapes on wide/tall canvases (detail-*.tar; vqa)


class Checkpointing(Strict):
    keep_last: int = 2  # complete mid-stage checkpoints kept per stage

    @field_validator("keep_last")
    @classmethod
    def _at_least_two(cls, value: int) -> int:
        if value < 2:
            raise ValueError("keep_last must be >= 2: while the newest checkpoint is being written, the previous "
                             "one is the only complete copy")
        return value


class Recipe(Strict):
    name: str
    seed: int = 0
    model: ModelSpec
    template: TemplateName | None = None               # default with model.init: chat (its own)
    synthesize: Synthesize | None = None
    wandb: dict[str, Any] | None = None                # {project, entity, ...}: logging on when set
    checkpoint: Checkpointing = Checkpointing()
    max_nonfinite_steps: int = Field(3, gt=0)          # skipped steps in a row before the run stops
    # the process group's timeout: a collective waiting longer for a rank (dead, stopped, stuck) fails and the run
    # exits 6. Above the longest time the other ranks wait for rank 0 alone (writing a stage's weights, the export)
    collective_timeout_s: int = Field(600, gt=0)
    stages: list[Stage] = Field(min_length=1)

    @model_validator(mode="after")
    def _template_given(self) -> Recipe:
        if self.template is None:
            if self.model.init is None:
                raise ValueError(f"template: required field is missing ({', '.join(TEMPLATES)})")
            self.template = "chat"  # the checkpoint's own chat template
        return self

    @model_validator(mode="after")
    def _liger_without_zero3(self) -> Recipe:
        zero3 = [stage.name for stage in self.stages if stage.zero_stage == 3]
        if self.model.loss == "liger" and zero3:  # Liger reads the LM head's weight, which ZeRO-3 partitions
            raise ValueError(f"model.loss: liger cannot run under ZeRO-3 (stages {', '.join(zero3)}); use chunked")
        weighted = [stage.name for stage in self.stages if any(s.loss_weight != 1.0 for s in stage.data)]
        if self.model.loss == "liger" and weighted:  # its fused kernel keeps no per-token loss to weigh
            raise ValueError(f"model.loss: liger cannot weigh sources (loss_weight in stages {', '.join(weighted)}); "
                             "use chunked")
        return self

    @model_validator(mode="after")
    def _unique_stage_names(self) -> Recipe:
        names = [stage.name for stage in self.stages]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"stage names must be unique; repeated: {', '.join(duplicates)}")
        return self


# ---------------------------------------------------------------------------------------------- loading


def apply_overrides(data: dict, overrides: list[str]) -> list[str]:
    """Apply `dotted.path=value` overrides in place (values parsed as YAML). Returns the problems found."""
    problems = []
    for override in overrides:
        path, sep, raw = override.partition("=")
        if not sep or not path:
            problems.append(f"--set {override!r}: expected dotted.path=value")
            continue
        value = yaml.safe_load(raw) if raw else ""
        keys = path.split(".")
        node: Any = data
        for depth, key in enumerate(keys):
            last = depth == len(keys) - 1
            where = ".".join(keys[: depth + 1])
            if isinstance(node, list):
                if not key.isdecimal() or int(key) >= len(node):
                    problems.append(f"--set {path}: {where} is not an index of a list of {len(node)}")
                    break
                key = int(key)
            elif not isinstance(node, dict):
                problems.append(f"--set {path}: {'.'.join(keys[:depth])} is not a mapping or list")
                break
            if last:
                node[key] = value
            else:
                if isinstance(node, dict) and key not in node:
                    node[key] = {}
                node = node[key]
    return problems


def _line_index(text: str) -> dict[tuple, int]:
    """Map each field path (tuple of keys / indices) to its 1-based line in the YAML text."""
    lines: dict[tuple, int] = {}

    def walk(node: yaml.Node, path: tuple) -> None:
        lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                child = path + (key.value,)
                walk(value, child)
                lines[child] = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, path + (i,))

    root = yaml.compose(text)
    if root is not None:
        walk(root, ())
    return lines


def _describe(error: dict, lines: dict[tuple, int]) -> tuple[str, str, int | None]:
    generated = ("function-", "literal[")  # pydantic's names for validator and literal members, not user keys
    loc = tuple(part for part in error["loc"] if not (isinstance(part, str) and part.startswith(generated)))
    # pydantic adds the union member name for `str | list[str]` fields; it is not part of the user's path
    loc = tuple(p for p in loc if p not in ("str", "list[str]", "dict[str,any]", "Synthesize"))
    field = ".".join(str(p) for p in loc) or "(recipe)"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    elif error["type"] == "missing":
        message = "required field is missing"
    line = next((lines[loc[:n]] for n in range(len(loc), -1, -1) if loc[:n] in lines), None)
    return field, message, line


def parse_recipe(
    text: str, source: str = "<recipe>", overrides: list[str] = (), check_files: bool = True, check_data: bool = True
) -> Recipe:
    """Parse and validate recipe text. Raises RecipeError listing every problem."""
    try:
        data = yaml.safe_load(text)
        lines = _line_index(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise RecipeError(source, [f"YAML syntax error at {where}{getattr(err, 'problem', None) or err}"]) from None
    if not isinstance(data, dict):
        raise RecipeError(source, ["(recipe): the recipe must be a YAML mapping"])
    problems = apply_overrides(data, list(overrides))
    synth = data.get("synthesize")
    context = {"check_files": check_files, "check_data": check_data,
               "synth_out": synth.get("out") if isinstance(synth, dict) else None}
    try:
        recipe = Recipe.model_validate(data, context=context)
    except ValidationError as err:
        described: dict[tuple[str, int | None], list[str]] = {}
        for error in err.errors():  # a union field fails once per member: report it once
            field, message, line = _describe(error, lines)
            described.setdefault((field, line), []).append(message)
        for (field, line), messages in described.items():
            problems.append(f"{field}: {' or '.join(dict.fromkeys(messages))}" + (f" (line {line})" if line else ""))
        raise RecipeError(source, problems) from None
    if problems:
        raise RecipeError(source, problems)
    return recipe


def load_recipe(
    path: str | os.PathLike, overrides: list[str] = (), check_files: bool = True, check_data: bool = True
) -> Recipe:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise RecipeError(str(path), [f"cannot read recipe: {err.strerror}"]) from None
    return parse_recipe(text, str(path), overrides, check_files, check_data)


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe (overrides applied) as YAML, stored beside every run."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
