"""The interface every model family implements (ModelFamily). The helpers a family's module builds on live by job
beside it: weights.py (reading and copying weights, model.init's directory), configs.py (architecture records),
tokenizers.py (the recipe's tokenizer and its stand-in), loss.py (the training loss every family's forward returns).

A family (train/models/llava.py, train/models/qwen2vl.py) is everything the rest of kakehashi needs to know about
one kind of VLM: its architecture record, how it is built (and weights loaded), its processor, what the data
loader must do with images, its three components, its training forward, and its export. Nothing outside
train/models/ branches on the kind of model; it asks the family.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from torch import nn

from train.models.configs import set_layer_count
from train.models.weights import Weight, parameter_size

log = logging.getLogger(__name__)


class ModelFamily(ABC):
    """The interface of a model family. `spec` is the recipe's ModelSpec; `config` the family's architecture
    record (a transformers config, or the family's own); `model` what `build` returns. Abstract methods are what a
    family must write (a family that forgets one fails when its module is imported, not at run time); the others
    have defaults it may override."""

    name: str                             # shown in logs and model cards
    projector_kinds: tuple[str, ...]      # projector.kind values this family builds
    export_model_types: tuple[str, ...]   # config.json model_type values of directories `load_export` reads
    vision_depth_field: str               # the vision config's block count (num_hidden_layers, depth, ...)

    # -------------------------------------------------------------------------------------------- recipe, build

    def validate(self, spec) -> list[str]:
        """Problems of the recipe's model section for this family ('field: message'); may fill family defaults."""
        return []

    @abstractmethod
    def config(self, spec, vocab_size: int, token_ids: dict[str, int]):
        """The architecture record for a vocabulary of `vocab_size`; token_ids: {"image": id, and with
        model.image_start_end "image_start", "image_end"} (train.models.model_config gives them)."""
        raise NotImplementedError

    def reduce_depth(self, config, llm_layers: int | None = None, vision_layers: int | None = None) -> None:
        """Cut the architecture record in place to `llm_layers` LLM layers and `vision_layers` vision blocks (None:
        as it is): the real widths at reduced depth, for benchmarks whose figures then scale by layer count."""
        if llm_layers is not None:
            set_layer_count(config.text_config, "num_hidden_layers", llm_layers)
        if vision_layers is not None:
            set_layer_count(config.vision_config, self.vision_depth_field, vision_layers)

    def depth(self, config) -> dict[str, int]:
        """{"llm_layers", "vision_layers"} of an architecture record (what `reduce_depth` sets)."""
        return {"llm_layers": config.text_config.num_hidden_layers,
                "vision_layers": getattr(config.vision_config, self.vision_depth_field)}

    @abstractmethod
    def build(self, spec, config, *, load_weights: bool = True) -> nn.Module:
        """The model; inline-config components start random (seed first), and with `load_weights` what `weights`
        names is copied in (train/build.py builds a stage's model in its precision, under ZeRO-3 partitioned)."""
        raise NotImplementedError

    @abstractmethod
    def weights(self, spec, config, model: nn.Module | None = None) -> list[Weight]:
        """The recipe's weights in the model's own state-dict names, each read when asked for: all of model.init's
        checkpoint, else those of its `path` components ([] when every component starts random). `model`: the
        model they go into (its names and shapes), else one built on the meta device."""
        raise NotImplementedError

    @abstractmethod
    def processor(self, spec, tokenizer, config):
        """Tokenizer + image processor as one object with `save_pretrained`, `apply_chat_template`, `__call__`."""
        raise NotImplementedError

    @abstractmethod
    def load_processor(self, directory: Path):
        raise NotImplementedError

    @abstractmethod
    def image_inputs(self, config, processor) -> dict:
        """The data loader's image arguments (MixtureLoader): fixed size and tokens per image, or a patchifier."""
        raise NotImplementedError

    # -------------------------------------------------------------------------------------------- structure

    @abstractmethod
    def components(self, model: nn.Module) -> dict[str, list[nn.Module]]:
        """vision_encoder, projector, llm -> their modules, in data-flow order."""
        raise NotImplementedError

    @abstractmethod
    def vision_blocks(self, model: nn.Module) -> nn.ModuleList:
        """The vision encoder's transformer blocks, first to last (partial unfreezing)."""
        raise NotImplementedError

    @abstractmethod
    def towers(self, model: nn.Module) -> dict[str, nn.Module]:
        """The vision encoder's and the LLM's transformers models (activation checkpointing); the LLM's has
        `.layers`."""
        raise NotImplementedError

    @abstractmethod
    def memory_shapes(self, config, spec) -> dict[str, int]:
        """The sizes train/memory.py estimates a stage's memory from (the fields of train.memory.Shapes): the
        layers and widths of the LLM and the vision encoder, the vocabulary, patches and LLM tokens per image."""
        raise NotImplementedError

    @abstractmethod
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

    @abstractmethod
    def training_module(self, model: nn.Module) -> nn.Module:
        """What DeepSpeed wraps: forward(input_ids, attention_mask, labels, pixel_values=None, image_grid_thw=None,
        position_ids=None) -> (summed token loss, target count)."""
        raise NotImplementedError

    @abstractmethod
    def unwrap(self, training_module: nn.Module) -> nn.Module:
        """The model inside a training module (generation, consolidated weights)."""
        raise NotImplementedError

    def transformers_model(self, model: nn.Module) -> nn.Module | None:
        """The model as a transformers class that other trainers (TRL's DPOTrainer) train as they are; None when
        the family's model is kakehashi's own (train/trainer_baseline.py)."""
        return None

    # -------------------------------------------------------------------------------------------- files

    @abstractmethod
    def init_fields(self, directory: Path, record: dict) -> dict:
        """The recipe's model sections that a checkpoint of this family (config.json = `record`) fixes:
        {"vision_encoder": {...}, "projector": {...}, "llm": {"config": ...}, ...} (model.init)."""
        raise NotImplementedError

    @abstractmethod
    def load_stage(self, directory: Path) -> nn.Module:
        """A stage directory's model (config.json + model.safetensors in the model's own state-dict names)."""
        raise NotImplementedError

    @abstractmethod
    def save_export(self, model: nn.Module, processor, directory: Path) -> None:
        raise NotImplementedError

    @abstractmethod
    def load_export(self, directory: Path) -> tuple[nn.Module, Any]:
        """An export -> (model in eval mode, processor). Safetensors only, no remote code."""
        raise NotImplementedError

    @abstractmethod
    def card(self, spec) -> dict:
        """What the export's model card says of its format: {"library_name", "tags", "format"} (`spec`: the
        recipe's model section, whose fields may decide which consumers can read the export)."""
        raise NotImplementedError


