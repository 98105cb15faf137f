"""Model assembly: vision tower + projector + causal LM, held as transformers' own LlavaForConditionalGeneration.

Training the HF class itself (rather than a look-alike converted at the end) is what makes the export exact: the
weights we train are the weights `LlavaForConditionalGeneration.from_pretrained` reads. This file holds no
parallelism; DeepSpeed wraps what it returns.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PretrainedConfig,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from train.recipe import IMAGE_TOKEN, ComponentSource, ModelSpec, RecipeError, VisionEncoder

log = logging.getLogger(__name__)

VISION_CLASSES = {  # kind -> (config class, model class, image processor class name)
    "siglip": (SiglipVisionConfig, SiglipVisionModel, "SiglipImageProcessor"),
    "clip": (CLIPVisionConfig, CLIPVisionModel, "CLIPImageProcessor"),
}


def _image_processor_class(kind: str):
    """The torchvision-backed processor where torchvision imports, else transformers' PIL twin (same outputs)."""
    import importlib.util

    import transformers

    name = VISION_CLASSES[kind][2]
    if importlib.util.find_spec("torchvision") is None and hasattr(transformers, name + "Pil"):
        name += "Pil"
    return getattr(transformers, name)


# ---------------------------------------------------------------------------------------------- configs


def _inline_config(source: ComponentSource) -> dict[str, Any] | None:
    if isinstance(source.config, str):
        text = Path(source.config).expanduser().read_text(encoding="utf-8")
        return json.loads(text) if source.config.endswith(".json") else yaml.safe_load(text)
    return dict(source.config) if source.config is not None else None


def _checked(cls: type[PretrainedConfig], values: dict[str, Any], field: str) -> PretrainedConfig:
    """Build a config, refusing keys the architecture does not know (HF configs silently keep any kwarg)."""
    known = set(cls().to_dict())
    unknown = sorted(set(values) - known - {"model_type"})
    if unknown:
        raise RecipeError("recipe", [f"{field}.{key}: unknown key for {cls.__name__}" for key in unknown])
    return cls(**{k: v for k, v in values.items() if k != "model_type"})


def vision_config(spec: VisionEncoder) -> PretrainedConfig:
    config_cls = VISION_CLASSES[spec.kind][0]
    inline = _inline_config(spec)
    if inline is not None:
        return _checked(config_cls, inline, "model.vision_encoder.config")
    loaded = AutoConfig.from_pretrained(spec.path, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    return getattr(loaded, "vision_config", loaded)  # a full SigLIP/CLIP checkpoint carries a text tower too


def llm_config(spec: ComponentSource) -> PretrainedConfig:
    inline = _inline_config(spec)
    if inline is None:
        return AutoConfig.from_pretrained(spec.path, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    if "model_type" not in inline:
        raise RecipeError("recipe", ["model.llm.config.model_type: required field is missing (e.g. llama)"])
    config_cls = type(AutoConfig.for_model(inline["model_type"]))
    return _checked(config_cls, inline, "model.llm.config")


def extra_vision_tokens(spec: VisionEncoder) -> int:
    """Tokens the tower emits beyond its patches: CLIP's CLS (SigLIP has none)."""
    return 1 if spec.kind == "clip" else 0


def tokens_per_image(spec: VisionEncoder, vision: PretrainedConfig) -> int:
    """Image tokens in the LLM's sequence per image, counted as LlavaProcessor counts them."""
    patches = (vision.image_size // vision.patch_size) ** 2
    dropped = 1 if spec.select_strategy == "default" else 0  # "default" drops the first token (CLS)
    return patches + extra_vision_tokens(spec) - dropped


# ---------------------------------------------------------------------------------------------- tokenizer, processor


def load_tokenizer(spec: ModelSpec, cache_dir: str | Path, offline: bool = False):
    """The recipe's tokenizer, with the image token added as a special token if it lacks one."""
    if spec.tokenizer == "builtin:tiny-ja":
        from data_pipelines.tiny_tokenizer import load_or_build_tiny_tokenizer

        tokenizer = load_or_build_tiny_tokenizer(Path(cache_dir) / "tiny-ja")
    else:
        tokenizer = AutoTokenizer.from_pretrained(
            spec.tokenizer, trust_remote_code=spec.llm.trust_remote_code, local_files_only=offline
        )
    missing = [t for t in (IMAGE_TOKEN, *(spec.image_start_end or ())) if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # right padding is masked out of the loss anyway
    return tokenizer


def build_image_processor(spec: VisionEncoder, vision: PretrainedConfig):
    processor_cls = _image_processor_class(spec.kind)
    if spec.path is not None and spec.config is None:
        return processor_cls.from_pretrained(spec.path, revision=spec.revision)
    size = vision.image_size
    if spec.kind == "clip":
        return processor_cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return processor_cls(size={"height": size, "width": size})


# ---------------------------------------------------------------------------------------------- the model


def llava_config(spec: ModelSpec, vocab_size: int, image_token_id: int) -> LlavaConfig:
    vision = vision_config(spec.vision_encoder)
    text = llm_config(spec.llm)
    inline = _inline_config(spec.llm)
    if inline is not None and "vocab_size" not in inline:
        text.vocab_size = vocab_size  # an inline architecture takes the tokenizer's vocabulary
    else:
        text.vocab_size = max(text.vocab_size, vocab_size)  # room for an added image token
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_select_strategy=spec.vision_encoder.select_strategy,
        vision_feature_layer=spec.vision_encoder.feature_layer,
        tie_word_embeddings=getattr(text, "tie_word_embeddings", False),
    )


def set_attn_implementation(model: nn.Module, spec: ModelSpec) -> None:
    try:
        model.set_attn_implementation(spec.attn_implementation)
    except (ImportError, ValueError) as err:
        raise RecipeError("recipe", [f"model.attn_implementation: {spec.attn_implementation} is not available "
                                     f"here ({str(err).splitlines()[0]})"]) from None


def model_config(spec: ModelSpec, vocab_size: int, image_token_id: int):
    """The architecture record of the recipe's VLM: a LlavaConfig, or ours for a Qwen2-VL vision encoder."""
    if spec.vision_encoder.kind == "qwen2_vl":
        from train.qwen2vl import qwen2vl_config

        return qwen2vl_config(spec, vocab_size, image_token_id)
    return llava_config(spec, vocab_size, image_token_id)


def build_model(spec: ModelSpec, config, *, load_weights: bool = True) -> nn.Module:
    """Assemble the VLM. Inline-config components start random (seed first); `path` components load weights."""
    if spec.vision_encoder.kind == "qwen2_vl":
        from train.qwen2vl import build_qwen2vl

        return build_qwen2vl(spec, config, load_weights=load_weights)
    model = LlavaForConditionalGeneration(config)
    set_attn_implementation(model, spec)
    if not load_weights:
        return model
    if spec.vision_encoder.path is not None:
        tower_cls = VISION_CLASSES[spec.vision_encoder.kind][1]
        tower = tower_cls.from_pretrained(spec.vision_encoder.path, revision=spec.vision_encoder.revision)
        model.model.vision_tower.load_state_dict(tower.state_dict())
        log.info("vision encoder weights from %s", spec.vision_encoder.path)
    if spec.llm.path is not None:
        causal = AutoModelForCausalLM.from_pretrained(
            spec.llm.path, revision=spec.llm.revision, trust_remote_code=spec.llm.trust_remote_code
        )
        causal.resize_token_embeddings(config.text_config.vocab_size)  # room for the image token
        model.model.language_model.load_state_dict(causal.get_decoder().state_dict())
        model.lm_head.load_state_dict(causal.get_output_embeddings().state_dict())
        log.info("LLM weights from %s", spec.llm.path)
    return model


def component_modules(model: nn.Module) -> dict[str, list[nn.Module]]:
    if hasattr(model, "component_modules"):  # train.qwen2vl's model
        return model.component_modules()
    return {
        "vision_encoder": [model.model.vision_tower],
        "projector": [model.model.multi_modal_projector],
        "llm": [model.model.language_model, model.lm_head],
    }


def component_parameters(model: LlavaForConditionalGeneration) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Each component's named parameters (names as in the model's state dict), tied weights counted once."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {
        component: [(names[id(p)], p) for module in modules for p in module.parameters() if id(p) in names]
        for component, modules in component_modules(model).items()
    }


def parameter_counts(model: LlavaForConditionalGeneration) -> dict[str, int]:
    # ZeRO-3 leaves an empty placeholder in `p`; ds_numel is the real size
    return {c: sum(getattr(p, "ds_numel", p.numel()) for _, p in ps) for c, ps in component_parameters(model).items()}


def towers(model: nn.Module) -> dict[str, nn.Module]:
    """The vision encoder's and the LLM's transformers models (activation checkpointing); the LLM's has `.layers`."""
    if hasattr(model, "component_modules"):  # train.qwen2vl's model
        return {"vision_encoder": model.vision, "llm": model.llm.model}
    return {"vision_encoder": model.model.vision_tower, "llm": model.model.language_model}


def vision_blocks(model: nn.Module) -> nn.ModuleList:
    """The vision encoder's transformer blocks, first to last (for partial unfreezing)."""
    if hasattr(model, "vision_blocks"):
        return model.vision_blocks()
    return model.model.vision_tower.encoder.layers  # SigLIP and CLIP alike (transformers 5 flattens vision_model)


def check_vision_last_blocks(model: nn.Module, stage) -> int:
    """The vision encoder's block count; RecipeError when the stage unfreezes more blocks than it has."""
    blocks = len(vision_blocks(model))
    if stage.vision_encoder_last_blocks is not None and stage.vision_encoder_last_blocks > blocks:
        raise RecipeError("recipe", [f"stages.{stage.name}.vision_encoder_last_blocks: "
                                     f"{stage.vision_encoder_last_blocks} is more than the vision encoder's {blocks} blocks"])
    return blocks


def training_module(model: nn.Module) -> nn.Module:
    """What DeepSpeed wraps: forward(input_ids, attention_mask, labels, pixel_values, ...) -> (loss_sum, targets)."""
    return model if hasattr(model, "component_modules") else LlavaForTraining(model)


# ---------------------------------------------------------------------------------------------- training forward


class LlavaForTraining(nn.Module):
    """LLaVA forward that returns the *summed* token loss and the target count, so the engine can normalise over
    every target token of an optimizer step (all micro-batches, all ranks), not per micro-batch.

    The vision tower runs on every call, on a dummy image whose contribution is zeroed when a micro-batch has no
    image: under ZeRO-3 each module's parameters are all-gathered collectively, so a rank that skipped the tower
    while another ran it would hang.
    """

    def __init__(self, llava: LlavaForConditionalGeneration):
        super().__init__()
        self.llava = llava

    def forward(self, input_ids, attention_mask, labels, pixel_values=None, position_ids=None):
        # input_ids, attention_mask, labels: [B, T]; pixel_values: [N_images, 3, H, W] or None;
        # position_ids: [B, T] for packed rows (restarting per sample), else None
        logits = self.logits(input_ids, attention_mask, pixel_values, position_ids)  # [B, T, V]
        targets = labels[:, 1:]
        loss_sum = nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum"
        )
        return loss_sum, (targets != -100).sum()

    def logits(self, input_ids, attention_mask, pixel_values=None, position_ids=None):
        config = self.llava.config
        embeds = self.llava.get_input_embeddings()(input_ids)  # [B, T, D]
        dummy = pixel_values is None
        if dummy:
            size = config.vision_config.image_size
            pixel_values = torch.zeros(1, 3, size, size, device=embeds.device)
        pixel_values = pixel_values.to(embeds.dtype)
        features = self.llava.model.get_image_features(
            pixel_values=pixel_values,
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        )
        features = getattr(features, "pooler_output", features)  # transformers 5 returns an output object
        features = torch.cat([f.reshape(-1, f.shape[-1]) for f in features]).to(embeds.dtype)  # [N*tokens, D]
        if dummy:
            embeds = embeds + 0.0 * features.sum()
        else:
            image_mask = (input_ids == config.image_token_index).unsqueeze(-1)
            assert image_mask.sum() == features.shape[0], "image tokens in the text must match the encoder's output"
            embeds = embeds.masked_scatter(image_mask.expand_as(embeds), features)
        if position_ids is not None:
            # packed rows: with no attention mask, transformers derives a block-diagonal causal mask (sdpa, eager)
            # or flash-attention varlen boundaries from where the position ids restart; no attention across samples
            attention_mask = None
        return self.llava(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).logits
