"""LoRA / DoRA adapters (peft) on a component, trained in place and merged back into plain weights.

Adapters are injected into the component's own modules, so the model keeps its family's class, and its
state dict gains `...<target>.base_layer.weight` and `...<target>.lora_A/B.default.weight` keys. At the end of the
stage the adapters are merged (by peft, which also knows DoRA) into a copy on rank 0: the stage's weights and the
export are plain weights, and the adapters alone are saved beside them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from train.models.base import ModelFamily
from train.recipe import LoraSpec, Stage

log = logging.getLogger(__name__)


def lora_config(spec: LoraSpec):
    from peft import LoraConfig

    return LoraConfig(
        r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=list(spec.target_modules),
        use_dora=spec.dora, bias="none",
    )


def inject_adapters(family: ModelFamily, model: nn.Module, stage: Stage) -> None:
    """Add the stage's adapters to its LoRA components (their base weights stay frozen by the stage plan)."""
    from peft import inject_adapter_in_model

    for component, spec in stage.lora_components().items():
        targets = set(spec.target_modules)
        for module in family.components(model)[component]:  # e.g. the LLM's decoder, and its lm_head
            if any(name.rpartition(".")[2] in targets for name, _ in module.named_modules()):
                inject_adapter_in_model(lora_config(spec), module)
        log.info("stage %s: LoRA r=%d alpha=%d%s on %s (%s)", stage.name, spec.rank, spec.alpha,
                 " DoRA" if spec.dora else "", component, ", ".join(spec.target_modules))


def is_adapter_parameter(name: str) -> bool:
    return "lora_" in name


def merged_state_dict(family: ModelFamily, state: dict[str, torch.Tensor], build_plain_model,
                      stage: Stage) -> tuple[dict, dict]:
    """(plain weights with adapters merged, adapter weights alone) from a consolidated state dict."""
    from peft.tuners.lora import LoraLayer

    model = build_plain_model()
    inject_adapters(family, model, stage)
    model.load_state_dict(state)
    adapters = {k: v for k, v in state.items() if is_adapter_parameter(k)}
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(safe_merge=True)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
    merged = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return merged, adapters


def save_adapters(adapters: dict[str, torch.Tensor], stage: Stage, directory: Path) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file(adapters, directory / "adapter_model.safetensors", metadata={"format": "pt"})
    for component, spec in stage.lora_components().items():
        lora_config(spec).save_pretrained(directory / component)
