"""The tiled LLaVA family: a SigLIP tower reading each image as a thumbnail plus a grid of tiles
(`vision_encoder.tiling`), LLaVA's 2-layer MLP and a causal LM, held as transformers' own
LlavaOnevisionForConditionalGeneration.

LLaVA-OneVision's layout is the one that holds "fixed-resolution SigLIP + dynamic tiling + MLP + any LLM" without
remote code, and vLLM serves it (LlavaOnevisionForConditionalGeneration, its LLM from vLLM's own registry). The tiles
are cut in the loader's workers (data_pipelines/image/tiles.py) exactly as its image processor cuts them; the forward
below projects every tile, then packs each image's features with transformers' own `pack_image_features` (padding
removed, a learned newline after each row), so the trained weights are what the export's forward reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

from data_pipelines.image.tiles import AnyResTiles, grid_pinpoints
from train.models.configs import image_processor_class, llm_config, own_fields
from train.models.llava import PUBLISHED_LAYOUT, LlavaFamily, vision_config
from train.models.loss import SourceTokens, lm_loss_sum, loss_of, sequence_logps
from train.models.tokenizers import IMAGE_TOKEN, ChatProcessor
from train.models.weights import checkpoint_dir

SIGLIP_MEAN_STD = (0.5, 0.5, 0.5)  # SiglipImageProcessor's mean and std (a tower given as an inline config)


class OnevisionFamily(LlavaFamily):
    name = "llava-onevision"
    export_model_types = ("llava_onevision",)
    model_class, config_class = LlavaOnevisionForConditionalGeneration, LlavaOnevisionConfig
    published_layout = (*PUBLISHED_LAYOUT, ("model.image_newline", "image_newline"))

    def validate(self, spec) -> list[str]:
        problems = super().validate(spec)
        if spec.vision_encoder.select_strategy != "full":  # OneVision's processor and forward disagree on CLS
            problems.append("vision_encoder.select_strategy: tiling takes full (SigLIP has no CLS token)")
        if spec.projector.hidden_size is not None:  # its export is read by from_pretrained, which holds no such width
            problems.append("projector.hidden_size: tiling builds its projector at the LLM's width "
                            "(LlavaOnevisionConfig has no projector width)")
        return problems

    def config(self, spec, vocab_size: int, token_ids: dict[str, int]) -> LlavaOnevisionConfig:
        text, vision, tiling = llm_config(spec, vocab_size), vision_config(spec), spec.vision_encoder.tiling
        return LlavaOnevisionConfig(
            vision_config=vision, text_config=text, image_token_index=token_ids["image"], projector_hidden_act="gelu",
            vision_feature_select_strategy="full", vision_feature_layer=spec.vision_encoder.feature_layer,
            image_grid_pinpoints=grid_pinpoints(vision.image_size, tiling.min_tiles, tiling.max_tiles),
            # grids hold at most max_tiles tiles, so OneVision's feature interpolation (over N tiles' worth) never runs
            vision_aspect_ratio=f"anyres_max_{tiling.max_tiles}",
            tie_word_embeddings=getattr(text, "tie_word_embeddings", False),
        )

    def processor(self, spec, tokenizer, config: LlavaOnevisionConfig) -> OnevisionProcessor:
        source, vision = spec.vision_encoder, config.vision_config
        if spec.init is not None:  # the checkpoint's own processor (its grid, mean and std)
            return OnevisionProcessor.from_pretrained(checkpoint_dir(spec.init, weights=False))
        mean = std = SIGLIP_MEAN_STD
        if source.path is not None and source.config is None:
            tower = image_processor_class("SiglipImageProcessor").from_pretrained(source.path, revision=source.revision)
            mean, std = tuple(tower.image_mean), tuple(tower.image_std)
        size = vision.image_size
        image_processor = image_processor_class("LlavaOnevisionImageProcessor")(
            size={"height": size, "width": size}, image_grid_pinpoints=config.image_grid_pinpoints,
            image_mean=list(mean), image_std=list(std))
        return OnevisionProcessor(tokenizer, image_processor, num_image_tokens=(size // vision.patch_size) ** 2,
                                  vision_aspect_ratio=config.vision_aspect_ratio)

    def load_processor(self, directory: Path) -> OnevisionProcessor:
        return OnevisionProcessor.from_pretrained(directory)

    def image_inputs(self, config: LlavaOnevisionConfig, processor) -> dict:
        return {"patchify": tiler(config, processor.image_processor.image_mean), "tokens_per_image": None}

    def components(self, model: LlavaOnevisionForConditionalGeneration) -> dict[str, list[nn.Module]]:
        parts = super().components(model)
        parts["projector"].append(Newline(model.model.image_newline))  # the learned row separator is the projector's
        return parts

    def memory_shapes(self, config: LlavaOnevisionConfig, spec):
        tiles = tiler(config, SIGLIP_MEAN_STD)
        return {**super().memory_shapes(config, spec), "image_tokens_per_image": tiles.max_tokens(),
                "vision_tokens_per_image": self.vision_length(config) * (1 + tiles.max_tiles)}

    def vision_length(self, config: LlavaOnevisionConfig) -> int:
        """Tokens per tile in the tower (each pixel_values row is one tile)."""
        vision = config.vision_config
        return (vision.image_size // vision.patch_size) ** 2

    def training_module(self, model: LlavaOnevisionForConditionalGeneration) -> nn.Module:
        return OnevisionForTraining(model)

    def transformers_model(self, model: nn.Module) -> None:
        return None  # TRL's DPOTrainer collates OneVision's pixel_values padded per image; not benched against

    def init_fields(self, directory: Path, record: dict) -> dict:
        config = LlavaOnevisionConfig.from_pretrained(directory)
        vision, image_size = config.vision_config, config.vision_config.image_size
        tiles = [height * width // image_size ** 2 for height, width in config.image_grid_pinpoints]
        tiling = {"min_tiles": min(tiles), "max_tiles": max(tiles)}
        if config.image_grid_pinpoints != grid_pinpoints(image_size, **tiling):
            raise ValueError(f"{directory}: image_grid_pinpoints is not every grid of {tiling['min_tiles']} to "
                             f"{tiling['max_tiles']} tiles, which is all kakehashi's tiling expresses")
        return {"vision_encoder": {"kind": "siglip", "config": own_fields(vision), "tiling": tiling,
                                   "feature_layer": config.vision_feature_layer, "select_strategy": "full"},
                "projector": {"kind": "mlp2x_gelu"}, "llm": {"config": own_fields(config.text_config)}}

    def export_config(self, config: LlavaOnevisionConfig, tokenizer) -> LlavaOnevisionConfig:
        return export_config(config, tokenizer)

    def save_processor(self, processor: OnevisionProcessor, directory: Path) -> None:
        processor.save_pretrained(directory)  # processor_config.json holds the image processor's settings

    def load_export(self, directory: Path):
        return (LlavaOnevisionForConditionalGeneration.from_pretrained(directory).eval(),
                OnevisionProcessor.from_pretrained(directory))

    def card(self, spec) -> dict:
        return {"library_name": "transformers", "tags": ["llava_onevision"],
                "format": "A `LlavaOnevisionForConditionalGeneration` (SigLIP tower, dynamic tiling, MLP projector); "
                          "it loads with plain transformers (`AutoModelForImageTextToText`, `AutoProcessor`) and vLLM, "
                          "no `trust_remote_code`."}


ONEVISION = OnevisionFamily()


def tiler(config: LlavaOnevisionConfig, image_mean) -> AnyResTiles:
    vision = config.vision_config
    return AnyResTiles(vision.image_size, vision.patch_size, config.image_grid_pinpoints,
                       max_tiles_of(config.vision_aspect_ratio),
                       pad_colour=tuple(int(m * 255) for m in image_mean))  # the processor's pad_to_square colour


def max_tiles_of(vision_aspect_ratio: str) -> int:
    """N of LLaVA-OneVision's "anyres_max_N" (the config's and the processor's vision_aspect_ratio)."""
    return int(vision_aspect_ratio.removeprefix("anyres_max_"))


def export_config(config: LlavaOnevisionConfig, tokenizer) -> LlavaOnevisionConfig:
    """A copy of `config` with what consumers read set for this model: the architectures (vLLM picks its classes by
    them) and the tokenizer's special ids."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = LlavaOnevisionConfig.from_dict(config.to_dict())
    config.architectures = ["LlavaOnevisionForConditionalGeneration"]
    config.text_config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.text_config.model_type]]
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(config.text_config, name, getattr(tokenizer, name))
    return config


class OnevisionProcessor(ChatProcessor):
    """LlavaOnevisionProcessor's image path without its video processor, which transformers builds only where
    torchvision is installed (training machines need not have it). It writes the files LlavaOnevisionProcessor reads
    (AutoProcessor loads the export as it is where torchvision is) and expands each <image> as it does: a tiled
    image alone in its text, a squared one beside others (`AnyResTiles.image_tokens`)."""

    def __init__(self, tokenizer, image_processor, num_image_tokens: int, vision_aspect_ratio: str):
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.num_image_tokens, self.vision_aspect_ratio = num_image_tokens, vision_aspect_ratio
        self.image_token, self.chat_template = IMAGE_TOKEN, tokenizer.chat_template
        size = image_processor.size["height"]  # the tiles' count as the loader's (pad colour unused here)
        self.tiles = AnyResTiles(size, size // int(num_image_tokens ** 0.5), image_processor.image_grid_pinpoints,
                                 max_tiles_of(vision_aspect_ratio), pad_colour=(0, 0, 0))

    def __call__(self, images=None, text: str | list[str] = "", return_tensors: str = "pt", padding: bool = False):
        """input_ids, attention_mask and (with images) pixel_values [N, max tiles, 3, S, S], image_sizes [N, 2],
        batch_num_images [texts], as LlavaOnevisionProcessor gives them; `images`: every text's, in order."""
        texts = [text] if isinstance(text, str) else list(text)
        per_text = [t.count(self.image_token) for t in texts]
        inputs = {}
        if images:
            if len(images) != sum(per_text):
                raise ValueError(f"{sum(per_text)} {self.image_token} in the text for {len(images)} image(s)")
            nested, start = [], 0
            for count in per_text:
                nested.append(list(images[start:start + count]))
                start += count
            inputs = dict(self.image_processor(images=[n for n in nested if n], return_tensors="pt"))
            counts = self.counts(inputs["image_sizes"].tolist(), per_text)
            texts = [self.expand(t, counts) for t in texts]
        return self.encoded(texts, isinstance(text, str), inputs, return_tensors, padding)

    def counts(self, sizes: list[list[int]], per_text: list[int]) -> list[int]:
        """Image tokens per image in text order: tiled when its text has one image, squared otherwise."""
        alone = [n == 1 for n in per_text for _ in range(n)]
        return [self.tiles.image_tokens(height, width, tiled) for (height, width), tiled in zip(sizes, alone)]

    def save_pretrained(self, directory) -> None:
        """The tokenizer, and processor_config.json as LlavaOnevisionProcessor writes it (its video processor's
        settings too, the image processor's size and normalisation, so that AutoProcessor builds one)."""
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        image = self.image_processor.to_dict()
        video = {"video_processor_type": "LlavaOnevisionVideoProcessor", "size": image["size"],
                 "image_mean": image["image_mean"], "image_std": image["image_std"], "resample": image["resample"],
                 "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                 "do_convert_rgb": True, "do_sample_frames": False}
        record = {"processor_class": "LlavaOnevisionProcessor", "image_processor": image, "video_processor": video,
                  "image_token": self.image_token, "video_token": "<video>", "num_image_tokens": self.num_image_tokens,
                  "vision_aspect_ratio": self.vision_aspect_ratio, "vision_feature_select_strategy": "full"}
        Path(directory, "processor_config.json").write_text(json.dumps(record, ensure_ascii=False, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory) -> OnevisionProcessor:
        from transformers import AutoTokenizer

        record = json.loads(Path(directory, "processor_config.json").read_text())
        # transformers 5 nests the image processor's settings here; older checkpoints keep preprocessor_config.json
        image = record.get("image_processor") or json.loads(Path(directory, "preprocessor_config.json").read_text())
        image = {k: v for k, v in image.items() if k not in ("image_processor_type", "processor_class")}
        image_processor = image_processor_class("LlavaOnevisionImageProcessor")(**image)
        return cls(AutoTokenizer.from_pretrained(directory), image_processor, record["num_image_tokens"],
                   record["vision_aspect_ratio"])


class Newline(nn.Module):
    """Holds OneVision's `image_newline` parameter (a bare parameter of the model) so that it belongs to the projector
    component; registering it here does not change its name in the model's state dict."""

    def __init__(self, parameter: nn.Parameter):
        super().__init__()
        self.image_newline = parameter


class OnevisionForTraining(nn.Module):
    """The tiled forward returning the summed token loss and the target count (see loss.lm_loss_sum). As for LLaVA,
    the tower runs on a dummy tile when a micro-batch has no image (ZeRO-3 gathers parameters collectively)."""

    def __init__(self, llava: LlavaOnevisionForConditionalGeneration):
        super().__init__()
        self.llava = llava

    def forward(self, input_ids, attention_mask, labels, pixel_values=None, image_tiles=None, position_ids=None,
                sources: SourceTokens | None = None, pair_images: bool = False):
        # input_ids, attention_mask, labels: [B, T]; pixel_values: [N_tiles, 3, S, S] or None;
        # image_tiles: [N_images, 3] (height, width, tiles incl. the thumbnail); position_ids: [B, T] packed rows
        hidden = self.hidden_states(input_ids, attention_mask, pixel_values, image_tiles, position_ids, pair_images)
        if pair_images:
            return sequence_logps(hidden, self.llava.lm_head, labels, loss_of(self.llava)[1])
        return lm_loss_sum(hidden, self.llava.lm_head, labels, loss_of(self.llava), sources)

    def logits(self, input_ids, attention_mask, pixel_values=None, image_tiles=None, position_ids=None):
        return self.llava.lm_head(self.hidden_states(input_ids, attention_mask, pixel_values, image_tiles,
                                                     position_ids))

    def image_features(self, pixel_values: torch.Tensor, image_tiles: torch.Tensor) -> torch.Tensor:
        """[N_tiles, 3, S, S] -> [N_image_tokens, D]: as LlavaOnevisionModel.get_image_features, every tile projected,
        then each image's tiles packed (thumbnail, tile grid without its padding, a newline per row)."""
        model, config = self.llava.model, self.llava.config
        tower = model.vision_tower(pixel_values, output_hidden_states=True)
        projected = model.multi_modal_projector(tower.hidden_states[config.vision_feature_layer])  # [N_tiles, P, D]
        per_image = torch.split(projected, image_tiles[:, 2].tolist())
        packed, _ = model.pack_image_features(per_image, image_tiles[:, :2].cpu(), image_newline=model.image_newline,
                                              vision_aspect_ratio=config.vision_aspect_ratio)
        return torch.cat(packed)

    def hidden_states(self, input_ids, attention_mask, pixel_values=None, image_tiles=None, position_ids=None,
                      pair_images=False):
        model, config = self.llava.model, self.llava.config
        embeds = self.llava.get_input_embeddings()(input_ids)  # [B, T, D]
        if pixel_values is None:  # a dummy tile; its features and the newline join the graph with weight 0
            size = config.vision_config.image_size
            dummy = torch.zeros(1, 3, size, size, device=embeds.device, dtype=embeds.dtype)
            tower = model.vision_tower(dummy, output_hidden_states=True)
            features = model.multi_modal_projector(tower.hidden_states[config.vision_feature_layer])
            embeds = embeds + 0.0 * (features.sum() + model.image_newline.sum()).to(embeds.dtype)
        else:
            features = self.image_features(pixel_values.to(embeds.dtype), image_tiles).to(embeds.dtype)
            if pair_images:  # the tower ran once per pair; both rows of a pair read its features
                features = torch.cat([features, features])
            image_mask = (input_ids == config.image_token_index).unsqueeze(-1)
            assert image_mask.sum() == features.shape[0], "image tokens in the text must match the packed features"
            embeds = embeds.masked_scatter(image_mask.expand_as(embeds), features)
        if position_ids is not None:  # packed rows: the mask comes from where the position ids restart
            attention_mask = None
        return model.language_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                    use_cache=False).last_hidden_state
