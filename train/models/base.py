"""What every model family shares: the interface a family implements, and the helpers its modules build on.

A family (train/models/llava.py, train/models/qwen2vl.py) is everything the rest of kakehashi needs to know about
one kind of VLM: its architecture record, how it is built (and weights loaded), its processor, what the data
loader must do with images, its three components, its training forward, and its export. Nothing outside
train/models/ branches on the kind of model; it asks the family.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from data_pipelines.templates import IMAGE_PLACEHOLDER as IMAGE_TOKEN
from train.errors import RecipeError, UsageError

log = logging.getLogger(__name__)


class ModelFamily:
    """The interface of a model family. `spec` is the recipe's ModelSpec; `config` the family's architecture
    record (a transformers config, or the family's own); `model` what `build` returns."""

    name: str                             # shown in logs and model cards
    projector_kinds: tuple[str, ...]      # projector.kind values this family builds
    export_model_types: tuple[str, ...]   # config.json model_type values of directories `load_export` reads

    # -------------------------------------------------------------------------------------------- recipe, build

    def validate(self, spec) -> list[str]:
        """Problems of the recipe's model section for this family ('field: message'); may fill family defaults."""
        return []

    def config(self, spec, vocab_size: int, token_ids: dict[str, int]):
        """The architecture record for a vocabulary of `vocab_size`; token_ids: {"image": id, and with
        model.image_start_end "image_start", "image_end"} (train.models.model_config gives them)."""
        raise NotImplementedError

    def build(self, spec, config, *, load_weights: bool = True) -> nn.Module:
        """The model; inline-config components start random (seed first), `path` components load weights."""
        raise NotImplementedError

    def processor(self, spec, tokenizer, config):
        """Tokenizer + image processor as one object with `save_pretrained`, `apply_chat_template`, `__call__`."""
        raise NotImplementedError

    def load_processor(self, directory: Path):
        raise NotImplementedError

    def image_inputs(self, config, processor) -> dict:
        """The data loader's image arguments (MixtureLoader): fixed size and tokens per image, or a patchifier."""
        raise NotImplementedError

    # -------------------------------------------------------------------------------------------- structure

    def components(self, model: nn.Module) -> dict[str, list[nn.Module]]:
        """vision_encoder, projector, llm -> their modules, in data-flow order."""
        raise NotImplementedError

    def vision_blocks(self, model: nn.Module) -> nn.ModuleList:
        """The vision encoder's transformer blocks, first to last (partial unfreezing)."""
        raise NotImplementedError

    def towers(self, model: nn.Module) -> dict[str, nn.Module]:
        """The vision encoder's and the LLM's transformers models (activation checkpointing); the LLM's has
        `.layers`."""
        raise NotImplementedError

    def memory_shapes(self, config, spec) -> dict[str, int]:
        """The sizes train/memory.py estimates a stage's memory from (the fields of train.memory.Shapes): the
        layers and widths of the LLM and the vision encoder, the vocabulary, patches and LLM tokens per image."""
        raise NotImplementedError

    def vision_length(self, config) -> int | None:
        """Tokens per image inside the vision encoder when fixed; None when read from image_grid_thw per batch."""
        raise NotImplementedError

    def component_parameters(self, model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Each component's named parameters (names as in the model's state dict), tied weights counted once."""
        names = {id(p): n for n, p in model.named_parameters()}
        return {component: [(names[id(p)], p) for module in modules for p in module.parameters() if id(p) in names]
                for component, modules in self.components(model).items()}

    def parameter_counts(self, model: nn.Module) -> dict[str, int]:
        return {c: sum(parameter_size(p) for _, p in ps) for c, ps in self.component_parameters(model).items()}

    # -------------------------------------------------------------------------------------------- training

    def training_module(self, model: nn.Module) -> nn.Module:
        """What DeepSpeed wraps: forward(input_ids, attention_mask, labels, pixel_values=None, image_grid_thw=None,
        position_ids=None) -> (summed token loss, target count)."""
        raise NotImplementedError

    def unwrap(self, training_module: nn.Module) -> nn.Module:
        """The model inside a training module (generation, consolidated weights)."""
        raise NotImplementedError

    # -------------------------------------------------------------------------------------------- files

    def init_fields(self, directory: Path, record: dict) -> dict:
        """The recipe's model sections that a checkpoint of this family (config.json = `record`) fixes:
        {"vision_encoder": {...}, "projector": {...}, "llm": {"config": ...}, ...} (model.init)."""
        raise NotImplementedError

    def load_stage(self, directory: Path) -> nn.Module:
        """A stage directory's model (config.json + model.safetensors in the model's own state-dict names)."""
        raise NotImplementedError

    def save_export(self, model: nn.Module, processor, directory: Path) -> None:
        raise NotImplementedError

    def load_export(self, directory: Path) -> tuple[nn.Module, Any]:
        """An export -> (model in eval mode, processor). Safetensors only, no remote code."""
        raise NotImplementedError

    def card(self) -> dict:
        """What the export's model card says of its format: {"library_name", "tags", "format"}."""
        raise NotImplementedError


def checkpoint_dir(init, weights: bool = True) -> Path:
    """model.init's directory (`init`: its recipe section or a dict of it): the local one, or the hub snapshot of
    its files (with `weights`, the safetensors too; else the configs and tokenizer only)."""
    source = init if isinstance(init, dict) else init.model_dump()
    path = Path(source["path"]).expanduser()
    if path.is_dir():
        return path
    if path.is_absolute() or source["path"].startswith((".", "~")) or source["path"].count("/") != 1:
        raise UsageError(f"model.init: no such directory: {source['path']}")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.model", "*.jinja", "*.txt", *(["*.safetensors"] if weights else [])]
    try:
        return Path(snapshot_download(source["path"], revision=source.get("revision"), allow_patterns=patterns))
    except Exception as err:  # noqa: BLE001 - offline, unknown repo, ...: one line naming it
        raise UsageError(f"model.init: cannot read {source['path']} ({str(err).splitlines()[0]})") from None


def token_of(directory: Path, token_id: int) -> str:
    """The token that a checkpoint's own tokenizer has at `token_id`."""
    return AutoTokenizer.from_pretrained(directory).convert_ids_to_tokens(token_id)


def own_fields(config: PretrainedConfig) -> dict:
    """A config's own fields (hidden_size, ...) with its model_type, without PretrainedConfig's generic ones."""
    generic = set(PretrainedConfig().to_dict()) - {"model_type"}
    return {k: v for k, v in config.to_dict().items() if k not in generic}


def resized_vocabulary(state: dict[str, torch.Tensor], names: tuple[str, ...], vocab_size: int) -> dict:
    """`state` with the embedding and LM head rows `names` grown (new rows: the mean row) to `vocab_size`: a
    checkpoint's vocabulary plus tokens kakehashi added to its tokenizer."""
    for name in names:
        if name in state and state[name].shape[0] < vocab_size:
            rows = state[name]
            extra = rows.mean(0, keepdim=True).expand(vocab_size - rows.shape[0], -1)
            state[name] = torch.cat([rows, extra])
    return state


def parameter_size(param: nn.Parameter) -> int:
    return getattr(param, "ds_numel", param.numel())  # ZeRO-3 leaves an empty placeholder; ds_numel is the real size


# ---------------------------------------------------------------------------------------------- configs


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


# ---------------------------------------------------------------------------------------------- tokenizer, loss


def load_tokenizer(spec, cache_dir: str | Path, offline: bool = False):
    """The recipe's tokenizer, with the image token (and image start/end tokens) added as special tokens if missing."""
    if spec.tokenizer.startswith("builtin:"):
        from data_pipelines.tiny_tokenizer import load_or_build_tiny_tokenizer

        name = spec.tokenizer.removeprefix("builtin:")
        tokenizer = load_or_build_tiny_tokenizer(Path(cache_dir) / name, spec.tokenizer)
    else:
        tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer, trust_remote_code=spec.llm.trust_remote_code,
                                                  local_files_only=offline)
    missing = [t for t in (IMAGE_TOKEN, *(spec.image_start_end or ())) if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # right padding is masked out of the loss anyway
    return tokenizer


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token loss in fp32, target count) of logits [B, T, V] against labels [B, T] (-100: not a target).

    Summed, not averaged: the engine normalises over every target token of an optimizer step (all micro-batches,
    all ranks), not per micro-batch."""
    targets = labels[:, 1:]
    loss_sum = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                                           ignore_index=-100, reduction="sum")
    return loss_sum, (targets != -100).sum()
