"""A stage's model as training needs it: built in the stage's precision and, under ZeRO-3, partitioned as it is
built, its weights copied in one tensor at a time.

- Precision: DeepSpeed's bf16 mode trains bf16 parameters and keeps fp32 masters of the trained ones in its
  optimizer; handed an fp32 model it casts it to bf16 itself. Building in bf16 skips the fp32 copy (twice the
  memory) that would be thrown away.
- ZeRO-3: the model is built inside `deepspeed.zero.Init`, which partitions each module's parameters over the ranks
  as soon as the module exists, so no rank holds the whole model; a weight is gathered whole only while it is
  filled (rank 0 reads it, DeepSpeed hands each rank its partition) or initialised.
- Weights: a previous stage's directory, or what the family names (model.init's checkpoint, `path` components), as
  `train.models.base.Weight`s read one at a time. Safetensors files are read tensor by tensor; a `path` component
  comes whole from transformers' from_pretrained (its key conversions), on rank 0 only under ZeRO-3. Without
  ZeRO-3 every rank holds the whole model anyway and reads them itself.

A stage's random init under ZeRO-3 has the same distribution as without it, not the same draws (rank 0 draws per
module, after the build).
"""

from __future__ import annotations

import logging
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from train.models import family_for
from train.models.base import ModelFamily
from train.models.weights import load_weights, safetensors_weights
from train.recipe import Recipe, Stage
from train.stages import ResolvedStage, resolve_stage

log = logging.getLogger(__name__)


@dataclass
class StageBuild:
    """What a stage needs to train, assembled in one place for `kakehashi train` and `bench train`."""

    resolved: ResolvedStage  # the settings it runs with on these ranks
    model: nn.Module         # in the stage's dtype; under ZeRO-3 partitioned as it was built
    loader: object           # the stage's MixtureLoader, this rank's split
    reference: nn.Module | None = None  # a `reference: copy` preference stage's frozen copy, built as `model` is


def build_stage(recipe: Recipe, index: int, processor, config, *, rank: int, world_size: int,
                previous: Path | None = None, load: bool = True) -> StageBuild:
    """Stage `index` of `recipe` as a run trains it: its resolved settings, its model (from the `previous` stage
    directory, else the recipe's weights with `load`, else random) and its loader. Seeds torch with the recipe's
    seed first, so random-init components are the same on every rank and in every caller."""
    from train.data import stage_loader

    stage = recipe.stages[index]
    resolved = resolve_stage(stage, world_size)  # a batch that does not divide fails before anything is built
    torch.manual_seed(recipe.seed)
    model = build_stage_model(family_for(recipe.model), recipe.model, config, stage, world_size, previous, load)
    reference = None
    if stage.objective != "sft" and stage.preference.reference == "copy":  # the policy's starting weights, again
        torch.manual_seed(recipe.seed)
        reference = build_stage_model(family_for(recipe.model), recipe.model, config, stage, world_size, previous,
                                      load)
    loader = stage_loader(recipe, index, processor, config, rank=rank, world_size=world_size)
    return StageBuild(resolved, model, loader, reference)


def check_init_weights(recipe: Recipe, config) -> None:
    """RecipeError naming each model.init tensor whose shape the recipe's architecture does not hold (tensors that
    do not fit the checkpoint's own config.json: a config edited by hand, a projector wider than its missing
    projector_hidden_size says), from the safetensors headers and a model on the meta device: `recipe check` and
    `train` refuse it before anything is built or loaded."""
    if recipe.model.init is None:
        return
    from train.errors import RecipeError
    from train.models.weights import shape_problems

    family = family_for(recipe.model)
    with torch.device("meta"):
        model = family.build(recipe.model, config, load_weights=False)
    problems = shape_problems(model, family.weights(recipe.model, config, model))
    if problems:
        raise RecipeError("recipe", [f"model.init: {problem}" for problem in problems[:5]]
                          + ([f"model.init: ... and {len(problems) - 5} more"] if len(problems) > 5 else []))


def build_stage_model(family: ModelFamily, spec, config, stage: Stage, world_size: int, previous: Path | None,
                      load: bool = True) -> nn.Module:
    """The stage's model: from `previous` (a stage directory) when given, else the recipe's weights (`load`) over
    the family's random init. Seed torch first: random-init components are the same on every rank."""
    resolved = resolve_stage(stage, world_size)
    partitioned = resolved.partitioned
    if partitioned:
        # zero.Init records the __init__ of each nn.Module class defined inside it and puts it back on exit: a class
        # that transformers imports lazily there and then decorates (use_kernelized_func wraps __init__) would lose
        # the decorator's __init__ for the rest of the process. A build on the meta device imports them first.
        with torch.device("meta"):
            family.build(spec, config, load_weights=False)
    with construction(resolved):
        model = family.build(spec, config, load_weights=False)
    check_dtype(model, resolved)
    if partitioned:
        finish_partitioned(model, initialise=previous is None)
    if previous is not None:
        weights, strict = safetensors_weights(previous / "model.safetensors"), True
    else:
        weights, strict = (family.weights(spec, config, model), spec.init is not None) if load else ([], False)
    count = load_weights(model, weights, strict=strict, gathered=gathered if partitioned else None)
    log.info("stage %s: model built in %s%s, %d weight tensors loaded%s", stage.name, resolved.dtype,
             f", partitioned over {world_size} ranks (ZeRO-3)" if partitioned else "", count,
             f" from {previous}" if previous is not None else "")
    return model


@contextmanager
def construction(resolved: ResolvedStage):
    """Where the stage's model is built: parameters created in the stage's dtype; under ZeRO-3 inside
    zero.Init. There, transformers' own init is deferred (it would run on the then-empty partitions and mark them
    done; finish_partitioned runs it afterwards), as transformers' from_pretrained does under ZeRO-3.

    zero.Init is given the stage's DeepSpeed config (the engine's), not `dtype=`: DeepSpeed (0.16-0.19) resolves
    `dtype` as `dtype or fp16 if accelerator.is_fp16_supported() else bf16 ...`, so on an accelerator without fp16
    (a CPU without AVX512-FP16/AMX-FP16) any dtype given, fp32 included, becomes bf16, and every floating tensor
    created inside the context is rounded through bf16. From a config the dtype is the config's bf16 switch."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(resolved.dtype)
    try:
        with ExitStack() as stack:
            if resolved.partitioned:
                import deepspeed
                from transformers import initialization
                from transformers.integrations.deepspeed import prevent_arange_dtype_change

                stack.enter_context(initialization.no_init_weights())
                stack.enter_context(prevent_arange_dtype_change())  # RoPE's fp32 buffers stay fp32
                deepspeed.init_distributed(verbose=False)  # the config's batch check reads deepspeed.comm's world
                stack.enter_context(deepspeed.zero.Init(config_dict_or_path=resolved.deepspeed_config()))
            yield
    finally:
        torch.set_default_dtype(before)


def check_dtype(model: nn.Module, resolved: ResolvedStage) -> None:
    """Every floating parameter is held in the stage's dtype (under ZeRO-3: its partition), or the build is wrong."""
    dtype = resolved.dtype
    wrong = [(name, held.dtype) for name, p in model.named_parameters()
             for held in [getattr(p, "ds_tensor", None) if hasattr(p, "ds_id") else p]
             if held is not None and held.is_floating_point() and held.dtype != dtype]
    if wrong:
        raise RuntimeError(f"stage {resolved.stage.name}: {len(wrong)} parameters built in another dtype than {dtype}, "
                           f"e.g. {wrong[0][0]} in {wrong[0][1]}")


def finish_partitioned(model: nn.Module, initialise: bool) -> None:
    """What a plain build's post_init does, on a model built under zero.Init: tie the weights transformers ties
    (the LM head to the embeddings), and with `initialise` its random init: transformers' init of each model inside
    it, and the reset of any layer outside one (e.g. a LayerNorm of our own), on gathered parameters."""
    import deepspeed
    from transformers import PreTrainedModel
    from transformers.integrations.deepspeed import initialize_weights_zero3

    def visit(module: nn.Module) -> None:
        if isinstance(module, PreTrainedModel):
            if initialise:
                initialize_weights_zero3(module)
            module.tie_weights()
            return
        own = list(module.parameters(recurse=False))
        if own and initialise:  # a torch layer of the model's own (e.g. a LayerNorm): its reset is its init
            with deepspeed.zero.GatheredParameters(own, modifier_rank=0):
                if torch.distributed.get_rank() == 0:
                    module.reset_parameters()
        for child in module.children():
            visit(child)

    visit(model)


@contextmanager
def gathered(tensor: torch.Tensor):
    """A ZeRO-3 parameter whole for the time of the block, rank 0 filling it (yields True there) and DeepSpeed
    partitioning rank 0's values on exit; a tensor ZeRO does not partition (a buffer) is filled by every rank."""
    if not hasattr(tensor, "ds_id"):
        yield True
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters([tensor], modifier_rank=0):
        yield torch.distributed.get_rank() == 0
