"""Architecture records: inline configs checked against their class, the LLM's config and weights from
the recipe, attention implementation, image processor classes."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

import yaml
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from train.errors import RecipeError, UsageError

log = logging.getLogger(__name__)


def own_fields(config: PretrainedConfig) -> dict:
    """A config's own fields (hidden_size, ...) with its model_type, without PretrainedConfig's generic ones."""
    generic = set(PretrainedConfig().to_dict()) - {"model_type"}
    return {k: v for k, v in config.to_dict().items() if k not in generic}


def inline_config(source) -> dict[str, Any] | None:
    """A component's inline architecture: the mapping itself, or a JSON / YAML file it names; None without one."""
    if isinstance(source.config, str):
        text = Path(source.config).expanduser().read_text(encoding="utf-8")
        return json.loads(text) if source.config.endswith(".json") else yaml.safe_load(text)
    return dict(source.config) if source.config is not None else None


def checked_config(cls: type[PretrainedConfig], values: dict[str, Any], field: str) -> PretrainedConfig:
    """Build a config, refusing keys the architecture does not know (HF configs silently keep any kwarg)."""
    known = set(cls().to_dict())
    unknown = sorted(set(values) - known - {"model_type"})
    if unknown:
        raise RecipeError("recipe", [f"{field}.{key}: unknown key for {cls.__name__}" for key in unknown])
    return cls(**{k: v for k, v in values.items() if k != "model_type"})


def set_layer_count(config: PretrainedConfig, field: str, layers: int) -> None:
    """config.<field> = layers, and its per-layer list (layer_types, as some LLM configs carry) cut to match."""
    if not 1 <= layers <= getattr(config, field):
        raise UsageError(f"{layers} layers: the model has 1..{getattr(config, field)} ({config.model_type})")
    setattr(config, field, layers)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:layers]


def llm_config(spec, vocab_size: int) -> PretrainedConfig:
    """The LLM's config, its vocabulary sized for the tokenizer: an inline architecture without `vocab_size` takes
    the tokenizer's; a given one grows to make room for the added image tokens."""
    source = spec.llm
    inline = inline_config(source)
    if inline is None:
        text = AutoConfig.from_pretrained(source.path, revision=source.revision,
                                          trust_remote_code=source.trust_remote_code)
    elif "model_type" not in inline:
        raise RecipeError("recipe", ["model.llm.config.model_type: required field is missing (e.g. llama)"])
    else:
        text = checked_config(type(AutoConfig.for_model(inline["model_type"])), inline, "model.llm.config")
    takes_tokenizers = inline is not None and "vocab_size" not in inline
    text.vocab_size = vocab_size if takes_tokenizers else max(text.vocab_size, vocab_size)
    return text


def load_llm(spec, vocab_size: int) -> nn.Module:
    """The recipe LLM's pretrained causal LM, its embeddings resized to `vocab_size` (room for the image tokens)."""
    causal = AutoModelForCausalLM.from_pretrained(spec.llm.path, revision=spec.llm.revision,
                                                  trust_remote_code=spec.llm.trust_remote_code)
    causal.resize_token_embeddings(vocab_size)
    log.info("LLM weights from %s", spec.llm.path)
    return causal


def set_attn_implementation(model: nn.Module, spec) -> None:
    try:
        model.set_attn_implementation(spec.attn_implementation)
    except (ImportError, ValueError) as err:
        raise RecipeError("recipe", [f"model.attn_implementation: {spec.attn_implementation} is not available "
                                     f"here ({str(err).splitlines()[0]})"]) from None


def image_processor_class(name: str):
    """transformers' torchvision-backed image processor where torchvision imports, else its PIL twin (same outputs)."""
    import transformers

    if importlib.util.find_spec("torchvision") is None and hasattr(transformers, name + "Pil"):
        name += "Pil"
    return getattr(transformers, name)
