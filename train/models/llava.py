"""The LLaVA family: a SigLIP or CLIP vision tower + a 2-layer MLP projector + a causal LM (Asagi's shape), held as
transformers' own LlavaForConditionalGeneration.

Training the HF class itself (rather than a look-alike converted at the end) is what makes the export exact: the
weights we train are the weights `LlavaForConditionalGeneration.from_pretrained` reads. No parallelism here;
DeepSpeed wraps what `training_module` returns.

The projector's intermediate width may differ from the LLM's (`projector.hidden_size`; the released Asagi 8B and 14B
are twice the LLM's, their config.json says so in `projector_hidden_size`). transformers' LlavaConfig has no such
field, so the model stays transformers' class with its projector's linears at that width (WideProjector), the width
kept in the config as `projector_hidden_size`; such an export is read back by `load_export`, not by
`LlavaForConditionalGeneration.from_pretrained`. At the LLM's width nothing differs from plain llava-hf.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.activations import ACT2FN
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from train.models import weights as weight_files
from train.models.base import ModelFamily
from train.models.configs import (
    checked_config,
    image_processor_class,
    inline_config,
    llm_config,
    load_llm,
    own_fields,
    set_attn_implementation,
)
from train.models.loss import SourceTokens, lm_loss_sum, loss_of, sequence_logps, set_loss
from train.models.tokenizers import IMAGE_TOKEN
from train.models.weights import Weight, checkpoint_dir

log = logging.getLogger(__name__)

TOWERS = {  # vision_encoder.kind -> (config class, model class, image processor class name, extra tokens (CLS))
    "siglip": (SiglipVisionConfig, SiglipVisionModel, "SiglipImageProcessor", 0),
    "clip": (CLIPVisionConfig, CLIPVisionModel, "CLIPImageProcessor", 1),
}
KIND_OF_MODEL_TYPE = {"siglip_vision_model": "siglip", "clip_vision_model": "clip"}
# transformers 5's in-memory names -> the layout of published llava-hf checkpoints, which vLLM, SGLang and
# transformers itself read (transformers 5 maps it back on load: conversion_mapping.py, "llava" and
# "CLIPVisionModel"); vLLM reads the vision tower only as vision_tower.vision_model.*
PUBLISHED_LAYOUT = (
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)
SHARD_SIZE = "5GB"  # save_pretrained's default: one file below it, shards and an index above it


def vision_config(spec):
    source = spec.vision_encoder
    inline = inline_config(source)
    if inline is not None:
        return checked_config(TOWERS[source.kind][0], inline, "model.vision_encoder.config")
    loaded = AutoConfig.from_pretrained(source.path, revision=source.revision,
                                        trust_remote_code=source.trust_remote_code)
    return getattr(loaded, "vision_config", loaded)  # a full SigLIP/CLIP checkpoint carries a text tower too


def projector_width(config: LlavaConfig) -> int:
    """The projector's intermediate width: the config's `projector_hidden_size` (an Asagi-layout checkpoint, a
    recipe's projector.hidden_size), else the LLM's width, as transformers' LlavaMultiModalProjector has it."""
    return getattr(config, "projector_hidden_size", None) or config.text_config.hidden_size


def recipe_width(spec, text) -> int | None:
    """The recipe's projector width where it is not the LLM's (`text`: the LLM's config); None: transformers' own
    projector, so that an export at the LLM's width stays plain llava-hf."""
    width = spec.projector.hidden_size
    return width if width is not None and width != text.hidden_size else None


class WideProjector(LlavaMultiModalProjector):
    """transformers' projector (its forward, its names linear_1 / act / linear_2) with the intermediate width
    projector_width(config) instead of the LLM's."""

    def __init__(self, config: LlavaConfig):
        nn.Module.__init__(self)  # not LlavaMultiModalProjector's, which would allocate the LLM-width linears first
        layers = 1 if isinstance(config.vision_feature_layer, int) else len(config.vision_feature_layer)
        width, bias = projector_width(config), config.multimodal_projector_bias
        self.linear_1 = nn.Linear(config.vision_config.hidden_size * layers, width, bias=bias)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(width, config.text_config.hidden_size, bias=bias)


def new_llava(config: LlavaConfig, model_class=LlavaForConditionalGeneration) -> LlavaForConditionalGeneration:
    """transformers' LlavaForConditionalGeneration of `config` with its projector at projector_width(config). The
    class stays transformers' own (its forward, generate, ZeRO-3's hooks, LoRA's targets); only the projector's two
    linears are swapped, and given transformers' init (the rest is marked initialised and left as it is; under
    ZeRO-3's no_init_weights this is a no-op and train/build.py's finish_partitioned initialises them)."""
    model = model_class(config)
    if projector_width(config) != config.text_config.hidden_size:
        model.model.multi_modal_projector = WideProjector(config)
        model.init_weights()
    return model


def tower_kind(config: LlavaConfig) -> str:
    return KIND_OF_MODEL_TYPE[config.vision_config.model_type]


def tokens_per_image(config: LlavaConfig) -> int:
    """Image tokens in the LLM's sequence per image, counted as LlavaProcessor counts them."""
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    dropped = 1 if config.vision_feature_select_strategy == "default" else 0  # "default" drops the first token (CLS)
    return patches + TOWERS[tower_kind(config)][3] - dropped


class LlavaFamily(ModelFamily):
    name = "llava"
    projector_kinds = ("mlp2x_gelu",)
    export_model_types = ("llava",)
    vision_depth_field = "num_hidden_layers"  # SigLIP / CLIP blocks
    model_class, config_class = LlavaForConditionalGeneration, LlavaConfig  # the transformers classes it holds
    published_layout = PUBLISHED_LAYOUT

    def new_model(self, config):
        """The family's transformers model of `config`, its projector at projector_width(config)."""
        return new_llava(config, self.model_class)

    def validate(self, spec) -> list[str]:
        problems = []
        if spec.vision_encoder.min_pixels or spec.vision_encoder.max_pixels:
            problems.append(f"vision_encoder: min_pixels / max_pixels apply to kind qwen2_vl only "
                            f"({spec.vision_encoder.kind} has a fixed image size)")
        if spec.projector.norm:
            problems.append("projector.norm applies to kind qwen2_vl_merger only")
        if spec.image_start_end:  # LlavaProcessor would not put them around the image tokens at inference
            problems.append(f"image_start_end: a LLaVA export cannot wrap image tokens in start/end tokens "
                            f"({spec.vision_encoder.kind}); it applies to kind qwen2_vl")
        return problems

    def config(self, spec, vocab_size: int, token_ids: dict[str, int]) -> LlavaConfig:
        text = llm_config(spec, vocab_size)
        width = recipe_width(spec, text)
        return LlavaConfig(
            vision_config=vision_config(spec), text_config=text, image_token_index=token_ids["image"],
            projector_hidden_act="gelu", vision_feature_select_strategy=spec.vision_encoder.select_strategy,
            vision_feature_layer=spec.vision_encoder.feature_layer,
            tie_word_embeddings=getattr(text, "tie_word_embeddings", False),
            **({"projector_hidden_size": width} if width is not None else {}),  # kept as an extra config field
        )

    def build(self, spec, config: LlavaConfig, *, load_weights: bool = True) -> LlavaForConditionalGeneration:
        model = self.new_model(config)
        set_attn_implementation(model, spec)
        set_loss(model, spec)
        if load_weights:
            weight_files.load_weights(model, self.weights(spec, config, model), strict=spec.init is not None)
        return model

    def weights(self, spec, config: LlavaConfig, model: LlavaForConditionalGeneration | None = None) -> list[Weight]:
        if spec.init is not None:
            log.info("weights from model.init %s", spec.init.path)
            return init_weights(spec, config, self.published_layout)
        if model is None:  # the names and shapes that `path` components fill (nothing is allocated on meta)
            with torch.device("meta"):
                model = self.new_model(config)
        shapes = {name: tuple(getattr(t, "ds_shape", t.shape)) for name, t in model.state_dict(keep_vars=True).items()}
        weights = []
        if spec.vision_encoder.path is not None:
            tower_cls, source = TOWERS[spec.vision_encoder.kind][1], spec.vision_encoder
            log.info("vision encoder weights from %s", source.path)
            weights += weight_files.module_weights("model.vision_tower.", own(shapes, "model.vision_tower."),
                                           lambda: tower_cls.from_pretrained(source.path, revision=source.revision),
                                           shapes)
        if spec.llm.path is not None:
            causal = functools.cache(lambda: load_llm(spec, config.text_config.vocab_size))  # once for both parts
            weights += weight_files.module_weights("model.language_model.", own(shapes, "model.language_model."),
                                           lambda: causal().get_decoder(), shapes)
            weights += weight_files.module_weights("lm_head.", own(shapes, "lm_head."),
                                           lambda: causal().get_output_embeddings(), shapes)
        return weights

    def processor(self, spec, tokenizer, config: LlavaConfig) -> LlavaProcessor:
        source, vision = spec.vision_encoder, config.vision_config
        processor_cls = image_processor_class(TOWERS[source.kind][2])
        if spec.init is not None:  # the checkpoint's own resize, crop and normalisation
            image_processor = processor_cls.from_pretrained(checkpoint_dir(spec.init, weights=False))
        elif source.path is not None and source.config is None:
            image_processor = processor_cls.from_pretrained(source.path, revision=source.revision)
        elif source.kind == "clip":
            size = vision.image_size
            image_processor = processor_cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        else:
            image_processor = processor_cls(size={"height": vision.image_size, "width": vision.image_size})
        return LlavaProcessor(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=vision.patch_size,
            vision_feature_select_strategy=source.select_strategy, chat_template=tokenizer.chat_template,
            image_token=IMAGE_TOKEN, num_additional_image_tokens=TOWERS[source.kind][3],
        )

    def load_processor(self, directory: Path) -> LlavaProcessor:
        return LlavaProcessor.from_pretrained(directory)

    def image_inputs(self, config: LlavaConfig, processor) -> dict:
        # workers decode and resize to uint8 at the model's input size; the engine normalises on the device
        return {"image_size": config.vision_config.image_size, "tokens_per_image": tokens_per_image(config),
                "resize_mode": "shortest_edge_crop" if tower_kind(config) == "clip" else "squash"}

    def components(self, model: LlavaForConditionalGeneration) -> dict[str, list[nn.Module]]:
        return {"vision_encoder": [model.model.vision_tower], "projector": [model.model.multi_modal_projector],
                "llm": [model.model.language_model, model.lm_head]}

    def vision_blocks(self, model: LlavaForConditionalGeneration) -> nn.ModuleList:
        return model.model.vision_tower.encoder.layers  # SigLIP and CLIP alike (transformers 5 flattens vision_model)

    def towers(self, model: LlavaForConditionalGeneration) -> dict[str, nn.Module]:
        return {"vision_encoder": model.model.vision_tower, "llm": model.model.language_model}

    def memory_shapes(self, config: LlavaConfig, spec):
        text, vision = config.text_config, config.vision_config
        return dict(llm_layers=text.num_hidden_layers, llm_hidden=text.hidden_size,
                      llm_intermediate=text.intermediate_size, vocab=text.vocab_size,
                      vision_layers=vision.num_hidden_layers, vision_hidden=vision.hidden_size,
                      vision_intermediate=vision.intermediate_size, vision_tokens_per_image=self.vision_length(config),
                      image_tokens_per_image=tokens_per_image(config))

    def vision_length(self, config: LlavaConfig) -> int:
        vision = config.vision_config
        return (vision.image_size // vision.patch_size) ** 2 + TOWERS[tower_kind(config)][3]

    def training_module(self, model: LlavaForConditionalGeneration) -> nn.Module:
        return LlavaForTraining(model)

    def unwrap(self, training_module: nn.Module) -> LlavaForConditionalGeneration:
        return training_module.llava

    def transformers_model(self, model: LlavaForConditionalGeneration) -> LlavaForConditionalGeneration:
        return model

    def init_fields(self, directory: Path, record: dict) -> dict:
        config = LlavaConfig.from_pretrained(directory)  # published llava-hf configs and our exports alike
        vision, text = config.vision_config, config.text_config
        return {"vision_encoder": {"kind": KIND_OF_MODEL_TYPE[vision.model_type], "config": own_fields(vision),
                                   "feature_layer": config.vision_feature_layer,
                                   "select_strategy": config.vision_feature_select_strategy},
                "projector": {"kind": "mlp2x_gelu", "hidden_size": projector_width(config)},
                "llm": {"config": own_fields(text)}}

    def load_stage(self, directory: Path) -> LlavaForConditionalGeneration:
        from safetensors.torch import load_file

        model = self.new_model(self.config_class.from_pretrained(directory))
        model.load_state_dict(load_file(Path(directory) / "model.safetensors"))
        return model

    def save_export(self, model: LlavaForConditionalGeneration, processor, directory: Path,
                    max_shard_size: str | int = SHARD_SIZE) -> None:
        """The published llava-hf layout: weights under its names (sharded with an index above `max_shard_size`),
        a config whose token ids and image_seq_length are this model's, the processor's files."""
        from huggingface_hub import save_torch_state_dict

        self.export_config(model.config, processor.tokenizer).save_pretrained(directory)
        export_generation_config(processor.tokenizer).save_pretrained(directory)
        save_torch_state_dict(published_state_dict(model, self.published_layout), directory,
                              max_shard_size=max_shard_size, metadata={"format": "pt"})
        self.save_processor(processor, directory)

    def export_config(self, config: LlavaConfig, tokenizer) -> LlavaConfig:
        return export_config(config, tokenizer)

    def save_processor(self, processor, directory: Path) -> None:
        processor.save_pretrained(directory)
        processor.image_processor.save_pretrained(directory)  # preprocessor_config.json too, as llava-hf ships it

    def load_export(self, directory: Path):
        from transformers import AutoProcessor

        config = LlavaConfig.from_pretrained(directory)
        if projector_width(config) != config.text_config.hidden_size:  # from_pretrained would refuse its projector
            model = load_wide(directory, config)
        else:
            model = LlavaForConditionalGeneration.from_pretrained(directory)
        return model.eval(), AutoProcessor.from_pretrained(directory)

    def card(self, spec) -> dict:
        width = recipe_width(spec, llm_config(spec, 0)) if spec.projector.hidden_size is not None else None
        if width is not None:
            return {"library_name": "kakehashi", "tags": ["llava"],
                    "format": f"A `LlavaForConditionalGeneration` in the llava-hf layout whose projector is {width} "
                              f"wide (`projector_hidden_size` in config.json), not the LLM's width: plain "
                              f"transformers' `LlavaForConditionalGeneration` and vLLM's llava cannot hold it; "
                              f"kakehashi loads it (`train.chat.load_export`)."}
        return {"library_name": "transformers", "tags": ["llava"],
                "format": "A `LlavaForConditionalGeneration`; it loads with plain transformers "
                          "(`LlavaForConditionalGeneration`, `AutoProcessor`), no `trust_remote_code`."}


LLAVA = LlavaFamily()


def own(shapes: dict, prefix: str) -> list[str]:
    return [name.removeprefix(prefix) for name in shapes if name.startswith(prefix)]


def init_weights(spec, config: LlavaConfig, layout=PUBLISHED_LAYOUT) -> list[Weight]:
    """model.init's tensors under transformers 5's in-memory names, its vocabulary grown to `config`'s when
    kakehashi added tokens to its tokenizer."""
    rows = config.text_config.vocab_size
    return [weight_files.grown_rows(w, rows) if w.name in VOCABULARY_ROWS else w
            for w in in_memory_weights(checkpoint_dir(spec.init), layout)]


def in_memory_weights(directory: Path, layout=PUBLISHED_LAYOUT) -> list[Weight]:
    """A published-layout directory's tensors under transformers 5's in-memory names, as from_pretrained maps them
    (the llava-hf layout mapped back)."""
    return [weight_files.Weight(in_memory_name(w.name, layout), w.shape, w.read)
            for w in weight_files.directory_weights(directory)]


def load_wide(directory: Path, config: LlavaConfig) -> LlavaForConditionalGeneration:
    """What from_pretrained gives for an export whose projector is not the LLM's width, which it cannot hold: the
    model (new_llava) in the dtype config.json names (float32 if none, as kakehashi's exports are), its tensors
    copied in one at a time, the export's generation config."""
    from transformers import GenerationConfig

    dtype = config.dtype if isinstance(config.dtype, torch.dtype) else torch.float32
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = new_llava(config)
    finally:
        torch.set_default_dtype(before)
    weight_files.load_weights(model, in_memory_weights(directory), strict=True)
    if Path(directory, "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model


VOCABULARY_ROWS = ("model.language_model.embed_tokens.weight", "lm_head.weight")


def in_memory_name(name: str, layout=PUBLISHED_LAYOUT) -> str:
    """A published llava-hf name -> transformers 5's in-memory name (names already in-memory are kept)."""
    for ours, published in layout:
        if name.startswith(published):
            return ours + name[len(published):]
    return name


def published_name(name: str, layout=PUBLISHED_LAYOUT) -> str:
    for ours, published in layout:
        if name.startswith(ours):
            return published + name[len(ours):]
    raise KeyError(f"{name}: no place in the llava-hf layout")


def published_state_dict(model: LlavaForConditionalGeneration, layout=PUBLISHED_LAYOUT) -> dict[str, torch.Tensor]:
    """The model's weights under the published names (`layout`: the family's); a tied LM head is stored once (as
    the embeddings)."""
    state = {published_name(k, layout): v for k, v in model.state_dict().items()}
    if model.config.text_config.tie_word_embeddings:
        state.pop("language_model.lm_head.weight", None)
    return state


def export_config(config: LlavaConfig, tokenizer) -> LlavaConfig:
    """A copy of `config` with what consumers read set for this model: the architectures (vLLM picks its classes by
    them), the image tokens per image (LlavaConfig's default 576 is CLIP-L/336's), the tokenizer's special ids."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = LlavaConfig.from_dict(config.to_dict())
    config.architectures = ["LlavaForConditionalGeneration"]  # what vLLM picks its model class by
    config.text_config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.text_config.model_type]]
    config.image_seq_length = tokens_per_image(config)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(config.text_config, name, getattr(tokenizer, name))
    return config


def export_generation_config(tokenizer):
    from transformers import GenerationConfig

    return GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)


class LlavaForTraining(nn.Module):
    """LLaVA forward that returns the *summed* token loss and the target count (see base.lm_loss_sum).

    The vision tower runs on every call, on a dummy image whose contribution is zeroed when a micro-batch has no
    image: under ZeRO-3 each module's parameters are all-gathered collectively, so a rank that skipped the tower
    while another ran it would hang.
    """

    def __init__(self, llava: LlavaForConditionalGeneration):
        super().__init__()
        self.llava = llava

    def forward(self, input_ids, attention_mask, labels, pixel_values=None, image_grid_thw=None, position_ids=None,
                sources: SourceTokens | None = None, pair_images: bool = False):
        # input_ids, attention_mask, labels: [B, T]; pixel_values: [N_images, 3, H, W] or None;
        # position_ids: [B, T] for packed rows (restarting per sample), else None
        # pair_images: preference pairs (collate_pairs): rows [chosen..., rejected...], each pair's images once;
        # returns (summed target log-probability per row [B], targets per row [B]) instead of the loss
        assert image_grid_thw is None, "a LLaVA vision tower takes fixed-size images, not dynamic-resolution patches"
        hidden = self.hidden_states(input_ids, attention_mask, pixel_values, position_ids, pair_images)  # [B, T, D]
        if pair_images:
            return sequence_logps(hidden, self.llava.lm_head, labels, loss_of(self.llava)[1])
        return lm_loss_sum(hidden, self.llava.lm_head, labels, loss_of(self.llava), sources)

    def logits(self, input_ids, attention_mask, pixel_values=None, position_ids=None):
        return self.llava.lm_head(self.hidden_states(input_ids, attention_mask, pixel_values, position_ids))

    def hidden_states(self, input_ids, attention_mask, pixel_values=None, position_ids=None, pair_images=False):
        """The LLM's last hidden states [B, T, D] (before the LM head, which the loss applies chunk by chunk).
        `pair_images`: the images' features fill the image tokens twice (the chosen rows', then the rejected rows')."""
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
        if pair_images and not dummy:  # the tower ran once per pair; both rows of a pair read its features
            features = torch.cat([features, features])
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
        return self.llava.model.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                               position_ids=position_ids, use_cache=False).last_hidden_state
