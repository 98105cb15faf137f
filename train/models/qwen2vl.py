"""The Qwen2-VL-encoder family (Sarashina2-Vision's shape): Qwen2-VL's dynamic-resolution ViT -> its 2x2 patch
merger (the projector, + the LayerNorm Sarashina2-Vision puts after it) -> a causal LM.

transformers has no class for a Qwen2-VL ViT in front of a Llama, so this is our own small model built from
transformers' parts (Qwen2VisionTransformerPretrainedModel, AutoModelForCausalLM). Its modules are named as the
released Sarashina2-Vision checkpoint names its tensors (`visual.*`, `norm.*`, `llm.model.*`, `llm.lm_head.*`), and
its config.json is the release's record (`Sarashina2VisionForCausalLM`, `model_type: sarashina2_vision`), so stages
and exports are in the layout SGLang (sglang/srt/models/sarashina2_vision.py) and llama.cpp's converter
(conversion/sarashina2.py: text GGUF + mmproj) load. No remote code; no parallelism here.

Images arrive as Qwen2-VL's flattened patches: pixel_values [N_patches, 3 * temporal_patch * patch * patch] for
all images of a micro-batch, and image_grid_thw [N_images, 3] (t, h, w in patches); image i gives
t*h*w / merge**2 tokens, which fill the <image> positions of the text in order.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

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
from train.models.tokenizers import IMAGE_TOKEN, ChatProcessor, token_of
from train.models.weights import Weight, checkpoint_dir

log = logging.getLogger(__name__)

MODEL_TYPE = "sarashina2_vision"
ARCHITECTURE = "Sarashina2VisionForCausalLM"
VISION_MODEL_TYPE = "qwen2_vl"  # the release's vision_config.model_type (transformers 5 calls it qwen2_vl_vision)
PROCESSOR_FILE = "kakehashi_processor.json"


class Qwen2VLVisionLMConfig:
    """The architecture record written as config.json beside the weights (stages and exports), in the fields of the
    released Sarashina2-Vision config that SGLang and llama.cpp's converter read: text_config (the LLM's),
    vision_config (Qwen2-VL's, hidden_size = the LLM's width: the merger's output), image_token_index and the image
    start/end token ids; `projector_norm` says whether the LayerNorm after the merger is there (the release's is)."""

    model_type = MODEL_TYPE

    def __init__(self, vision_config: Qwen2VLVisionConfig, text_config: PretrainedConfig, image_token_index: int,
                 projector_norm: bool = True, start_image_token_index: int | None = None,
                 end_image_token_index: int | None = None):
        self.vision_config, self.text_config = vision_config, text_config
        self.image_token_index, self.projector_norm = image_token_index, projector_norm
        self.start_image_token_index, self.end_image_token_index = start_image_token_index, end_image_token_index

    def to_dict(self) -> dict:
        text = self.text_config.to_dict()
        return {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "text_config": text,
                "vision_config": {**own_fields(self.vision_config), "model_type": VISION_MODEL_TYPE},
                "image_token_index": self.image_token_index, "start_image_token_index": self.start_image_token_index,
                "end_image_token_index": self.end_image_token_index, "vocab_size": text["vocab_size"],
                "tie_word_embeddings": text.get("tie_word_embeddings", False), "projector_norm": self.projector_norm}

    def save_pretrained(self, directory) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        Path(directory, "config.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, record: dict) -> Qwen2VLVisionLMConfig:
        known = set(Qwen2VLVisionConfig().to_dict()) - {"model_type"}
        vision = {k: v for k, v in record["vision_config"].items() if k in known}
        text = dict(record["text_config"])
        return cls(Qwen2VLVisionConfig(**vision), AutoConfig.for_model(text.pop("model_type"), **text),
                   record["image_token_index"], record.get("projector_norm", True),
                   record.get("start_image_token_index"), record.get("end_image_token_index"))

    @classmethod
    def from_pretrained(cls, directory) -> Qwen2VLVisionLMConfig:
        record = json.loads(Path(directory, "config.json").read_text())
        if record.get("model_type") != MODEL_TYPE:
            raise ValueError(f"{directory}/config.json is not a {MODEL_TYPE} record")
        return cls.from_dict(record)


class Qwen2VLVisionLM(nn.Module):
    """The model; `forward` is the training forward (same contract as model.LlavaForTraining)."""

    def __init__(self, config: Qwen2VLVisionLMConfig):
        super().__init__()
        self.config = config
        self.visual = Qwen2VisionTransformerPretrainedModel(config.vision_config)  # its merger projects to the LLM
        hidden = config.text_config.hidden_size
        self.norm = nn.LayerNorm(hidden) if config.projector_norm else None  # after the merger (Sarashina2-Vision)
        self.llm = AutoModelForCausalLM.from_config(config.text_config)

    @property
    def device(self) -> torch.device:
        return self.llm.device

    # ------------------------------------------------------------------------------------------ forward

    def image_features(self, pixel_values, image_grid_thw):
        # pixel_values: [N_patches, 3*T*P*P]; image_grid_thw: [N_images, 3] -> [N_patches / merge**2, D_llm]
        features = self.visual(pixel_values, grid_thw=image_grid_thw).pooler_output  # blocks, then the merger
        return self.norm(features) if self.norm is not None else features

    def embeddings(self, input_ids, pixel_values=None, image_grid_thw=None, pair_images=False):
        """Token embeddings [B, T, D] with the image features in the <image> positions.

        The vision encoder runs on every call, on a dummy image whose contribution is zeroed when there is none:
        under ZeRO-3 a rank that skipped it while another ran it would hang in the parameter all-gather.
        """
        embeds = self.llm.get_input_embeddings()(input_ids)  # [B, T, D]
        dummy = pixel_values is None
        if dummy:  # the smallest image: one merge window of patches -> one token
            vision, merge = self.config.vision_config, self.config.vision_config.spatial_merge_size
            patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
            pixel_values = torch.zeros(merge * merge, patch_dim, device=embeds.device)
            image_grid_thw = torch.tensor([[1, merge, merge]], device=embeds.device)
        features = self.image_features(pixel_values.to(embeds.dtype), image_grid_thw).to(embeds.dtype)
        if dummy:
            return embeds + 0.0 * features.sum()
        if pair_images:  # the encoder ran once per preference pair; its chosen and rejected rows both read it
            features = torch.cat([features, features])
        image_mask = (input_ids == self.config.image_token_index).unsqueeze(-1)  # [B, T, 1]
        if image_mask.sum() != features.shape[0]:
            raise ValueError(f"{int(image_mask.sum())} image tokens in the text, {features.shape[0]} image features")
        return embeds.masked_scatter(image_mask.expand_as(embeds), features)

    def hidden_states(self, input_ids, attention_mask, pixel_values=None, image_grid_thw=None, position_ids=None,
                      pair_images=False):
        """The LLM's last hidden states [B, T, D] (before the LM head, which the loss applies chunk by chunk)."""
        embeds = self.embeddings(input_ids, pixel_values, image_grid_thw, pair_images)
        if position_ids is not None:  # a packed row: transformers builds the block-diagonal mask from position ids
            attention_mask = None     # (only with no mask and no KV cache, hence use_cache=False)
        return self.llm.model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False).last_hidden_state

    def logits(self, input_ids, attention_mask, pixel_values=None, image_grid_thw=None, position_ids=None):
        return self.llm.lm_head(self.hidden_states(input_ids, attention_mask, pixel_values, image_grid_thw,
                                                   position_ids))

    def forward(self, input_ids, attention_mask, labels, pixel_values=None, image_grid_thw=None, position_ids=None,
                sources: SourceTokens | None = None, pair_images: bool = False):
        """(summed token loss, target count): the engine normalises over every target token of an optimizer step.
        With `pair_images` (preference pairs): (target log-probability per row, targets per row), as LLaVA's."""
        hidden = self.hidden_states(input_ids, attention_mask, pixel_values, image_grid_thw, position_ids,
                                    pair_images)
        if pair_images:
            return sequence_logps(hidden, self.llm.lm_head, labels, loss_of(self)[1])
        return lm_loss_sum(hidden, self.llm.lm_head, labels, loss_of(self), sources)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, pixel_values=None, image_grid_thw=None, max_new_tokens=32,
                 do_sample=False, synced_gpus=False, **generate):
        """Greedy decoding of a (left-padded) batch by the LLM's own `generate` on the embeddings (KV cache, stop
        strings, eos / pad ids as transformers does them); returns prompt + new tokens [B, T + n] as transformers does.

        `synced_gpus` (ZeRO-3 on several ranks): every rank keeps running forwards until all have finished, since
        each forward all-gathers parameters collectively."""
        if do_sample:
            raise ValueError("only greedy decoding is implemented")
        embeds = self.embeddings(input_ids, pixel_values, image_grid_thw)
        new_tokens = self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask, do_sample=False,
                                       max_new_tokens=max_new_tokens, synced_gpus=synced_gpus, **generate)
        return torch.cat([input_ids, new_tokens.to(input_ids.device)], dim=1)  # [B, T + n]

    def save_pretrained(self, directory, safe_serialization: bool = True) -> None:
        from safetensors.torch import save_model

        self.config.save_pretrained(directory)
        save_model(self, str(Path(directory, "model.safetensors")), metadata={"format": "pt"})  # tied weights once


class Qwen2VLChatProcessor(ChatProcessor):
    """Tokenizer + image processor, with the <image> expansion (and start/end tokens) the training data uses."""

    def __init__(self, tokenizer, image_processor, image_token: str = "<image>",
                 image_start_end: tuple[str, str] | None = None):
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.image_token, self.image_start_end = image_token, tuple(image_start_end) if image_start_end else None
        self.chat_template = tokenizer.chat_template

    def __call__(self, images=None, text: str | list[str] = "", return_tensors: str = "pt", padding: bool = False):
        """Token ids (and patches) of one text, or of a batch of texts (`padding`: to the longest, on the tokenizer's
        padding side); `images` are those of every <image> of the text(s), in order."""
        texts = [text] if isinstance(text, str) else list(text)
        inputs = {}
        if images:
            processed = self.image_processor(images=images, return_tensors="pt")
            inputs = {"pixel_values": processed["pixel_values"], "image_grid_thw": processed["image_grid_thw"]}
            counts = (processed["image_grid_thw"].prod(-1) // self.image_processor.merge_size ** 2).tolist()
            placeholders = sum(t.count(self.image_token) for t in texts)
            if len(counts) != placeholders:
                raise ValueError(f"{placeholders} {self.image_token} in the text for {len(counts)} image(s)")
            texts = [self.expand(t, counts) for t in texts]  # takes each text's counts off the front
        return self.encoded(texts, isinstance(text, str), inputs, return_tensors, padding)

    def save_pretrained(self, directory) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        sentencepiece = Path(self.tokenizer.name_or_path, "tokenizer.model")  # transformers 5 keeps tokenizer.json
        if sentencepiece.is_file() and sentencepiece.parent.resolve() != Path(directory).resolve():
            shutil.copyfile(sentencepiece, Path(directory, "tokenizer.model"))  # the model llama.cpp's converter reads
        self.image_processor.save_pretrained(directory)
        record = {"image_token": self.image_token, "image_start_end": self.image_start_end}
        Path(directory, PROCESSOR_FILE).write_text(json.dumps(record, ensure_ascii=False, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory) -> Qwen2VLChatProcessor:
        from transformers import AutoTokenizer

        record = json.loads(Path(directory, PROCESSOR_FILE).read_text())
        image_processor = image_processor_class("Qwen2VLImageProcessor").from_pretrained(directory)
        return cls(AutoTokenizer.from_pretrained(directory), image_processor, record["image_token"],
                   record["image_start_end"])


# ---------------------------------------------------------------------------------------------- the family


def vision_config(spec, text: PretrainedConfig) -> Qwen2VLVisionConfig:
    source = spec.vision_encoder
    inline = inline_config(source)
    if inline is not None:
        vision = checked_config(Qwen2VLVisionConfig, inline, "model.vision_encoder.config")
    else:
        loaded = AutoConfig.from_pretrained(source.path, revision=source.revision)
        vision = Qwen2VLVisionConfig(**{k: v for k, v in loaded.vision_config.to_dict().items() if k != "model_type"})
    vision.hidden_size = text.hidden_size  # the merger projects to the LLM's width
    return vision


class Qwen2VLFamily(ModelFamily):
    name = "qwen2_vl_encoder"
    projector_kinds = ("qwen2_vl_merger",)
    export_model_types = (MODEL_TYPE,)
    vision_depth_field = "depth"  # Qwen2-VL ViT blocks

    def validate(self, spec) -> list[str]:
        encoder = spec.vision_encoder
        encoder.min_pixels = encoder.min_pixels or 56 * 56  # Qwen2VLImageProcessor's defaults
        encoder.max_pixels = encoder.max_pixels or 28 * 28 * 1280
        problems = []
        if encoder.min_pixels > encoder.max_pixels:
            problems.append(f"vision_encoder: min_pixels {encoder.min_pixels} is more than max_pixels "
                            f"{encoder.max_pixels}")
        if spec.projector.hidden_size is not None:  # the merger's width is Qwen2-VL's (4 x the encoder's), fixed
            problems.append("projector.hidden_size applies to kind mlp2x_gelu only (qwen2_vl_merger's width is "
                            "fixed by the vision encoder)")
        return problems

    def config(self, spec, vocab_size: int, token_ids: dict[str, int]) -> Qwen2VLVisionLMConfig:
        text = llm_config(spec, vocab_size)
        return Qwen2VLVisionLMConfig(vision_config(spec, text), text, token_ids["image"], spec.projector.norm,
                                     token_ids.get("image_start"), token_ids.get("image_end"))

    def build(self, spec, config: Qwen2VLVisionLMConfig, *, load_weights: bool = True) -> Qwen2VLVisionLM:
        model = Qwen2VLVisionLM(config)
        set_attn_implementation(model.visual, spec)
        set_attn_implementation(model.llm, spec)
        set_loss(model, spec)
        if load_weights:
            weight_files.load_weights(model, self.weights(spec, config, model), strict=spec.init is not None)
        return model

    def weights(self, spec, config: Qwen2VLVisionLMConfig, model: Qwen2VLVisionLM | None = None) -> list[Weight]:
        if spec.init is not None:
            log.info("weights from model.init %s", spec.init.path)
            rows = config.text_config.vocab_size
            return [weight_files.grown_rows(w, rows) if w.name in VOCABULARY_ROWS else w
                    for w in weight_files.directory_weights(checkpoint_dir(spec.init))]
        if model is None:  # the names and shapes that `path` components fill (nothing is allocated on meta)
            with torch.device("meta"):
                model = Qwen2VLVisionLM(config)
        shapes = {name: tuple(getattr(t, "ds_shape", t.shape)) for name, t in model.state_dict(keep_vars=True).items()}
        weights = []
        if spec.vision_encoder.path is not None:
            weights += vision_weights(shapes, spec.vision_encoder.path, spec.vision_encoder.revision)
        if spec.llm.path is not None:
            names = [n.removeprefix("llm.") for n in shapes if n.startswith("llm.")]
            weights += weight_files.module_weights("llm.", names, lambda: load_llm(spec, config.text_config.vocab_size),
                                           shapes)
        return weights

    def processor(self, spec, tokenizer, config: Qwen2VLVisionLMConfig) -> Qwen2VLChatProcessor:
        vision = config.vision_config
        image_processor = image_processor_class("Qwen2VLImageProcessor")(
            size={"shortest_edge": spec.vision_encoder.min_pixels, "longest_edge": spec.vision_encoder.max_pixels},
            patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
            merge_size=vision.spatial_merge_size)
        return Qwen2VLChatProcessor(tokenizer, image_processor, IMAGE_TOKEN, spec.image_start_end)

    def load_processor(self, directory: Path) -> Qwen2VLChatProcessor:
        return Qwen2VLChatProcessor.from_pretrained(directory)

    def image_inputs(self, config: Qwen2VLVisionLMConfig, processor: Qwen2VLChatProcessor) -> dict:
        from data_pipelines.image.patches import DynamicResolutionPatches

        # dynamic resolution: token counts vary per image
        return {"patchify": DynamicResolutionPatches(processor.image_processor), "tokens_per_image": None,
                "image_start_end": processor.image_start_end}

    def components(self, model: Qwen2VLVisionLM) -> dict[str, list[nn.Module]]:
        projector = [model.visual.merger] + ([model.norm] if model.norm is not None else [])
        return {"vision_encoder": [model.visual.patch_embed, model.visual.blocks], "projector": projector,
                "llm": [model.llm]}

    def vision_blocks(self, model: Qwen2VLVisionLM) -> nn.ModuleList:
        return model.visual.blocks

    def towers(self, model: Qwen2VLVisionLM) -> dict[str, nn.Module]:
        return {"vision_encoder": model.visual, "llm": model.llm.model}

    def memory_shapes(self, config: Qwen2VLVisionLMConfig, spec):
        text, vision = config.text_config, config.vision_config
        patches = spec.vision_encoder.max_pixels // vision.patch_size ** 2  # the largest image the processor makes
        return dict(llm_layers=text.num_hidden_layers, llm_hidden=text.hidden_size,
                      llm_intermediate=text.intermediate_size, vocab=text.vocab_size, vision_layers=vision.depth,
                      vision_hidden=vision.embed_dim, vision_intermediate=int(vision.embed_dim * vision.mlp_ratio),
                      vision_tokens_per_image=patches, image_tokens_per_image=patches // vision.spatial_merge_size ** 2)

    def vision_length(self, config) -> None:
        return None  # t * h * w patches per image, read from each batch's image_grid_thw

    def training_module(self, model: Qwen2VLVisionLM) -> Qwen2VLVisionLM:
        return model  # its forward is the training forward

    def unwrap(self, training_module: Qwen2VLVisionLM) -> Qwen2VLVisionLM:
        return training_module

    def init_fields(self, directory: Path, record: dict) -> dict:
        config = Qwen2VLVisionLMConfig.from_dict(record)
        vision = {k: v for k, v in own_fields(config.vision_config).items() if k != "model_type"}
        fields = {"vision_encoder": {"kind": "qwen2_vl", "config": vision},
                  "projector": {"kind": "qwen2_vl_merger", "norm": config.projector_norm},
                  "llm": {"config": own_fields(config.text_config)}}
        ids = (config.start_image_token_index, config.end_image_token_index)
        if None not in ids:  # the tokens around each image, by name (the recipe names tokens, the config ids)
            fields["image_start_end"] = [token_of(directory, i) for i in ids]
        return fields

    def load_stage(self, directory: Path) -> Qwen2VLVisionLM:
        from safetensors.torch import load_model

        model = Qwen2VLVisionLM(Qwen2VLVisionLMConfig.from_pretrained(directory))
        load_model(model, str(Path(directory, "model.safetensors")))
        return model

    def save_export(self, model: Qwen2VLVisionLM, processor, directory: Path) -> None:
        model.save_pretrained(directory)
        processor.save_pretrained(directory)

    def load_export(self, directory: Path) -> tuple[Qwen2VLVisionLM, Qwen2VLChatProcessor]:
        return self.load_stage(directory).eval(), Qwen2VLChatProcessor.from_pretrained(directory)

    def card(self, spec) -> dict:
        return {"library_name": "kakehashi", "tags": ["sarashina2-vision", "qwen2-vl-encoder"],
                "format": "A Qwen2-VL vision encoder + merger in front of a causal LM in Sarashina2-Vision's released "
                          "layout (`Sarashina2VisionForCausalLM`), which SGLang and llama.cpp's converter read; "
                          "kakehashi loads it without remote code (`train.chat.load_export`)."}


QWEN2VL = Qwen2VLFamily()


VOCABULARY_ROWS = ("llm.model.embed_tokens.weight", "llm.lm_head.weight")


def vision_weights(shapes: dict, path: str, revision: str | None = None) -> list[Weight]:
    """Patch embed + blocks from a Qwen2-VL checkpoint (its `visual.*` tensors), read one at a time. The merger is
    loaded only when its output width matches the LLM's; else it starts random (Sarashina2-Vision trains it first)."""
    from huggingface_hub import snapshot_download

    directory = Path(path) if Path(path).is_dir() else Path(snapshot_download(path, revision=revision,
                                                                               allow_patterns=["*.safetensors"]))
    own = {n.removeprefix("visual."): shape for n, shape in shapes.items() if n.startswith("visual.")}
    loaded = {}
    for weight in weight_files.directory_weights(directory):
        key = weight.name
        name = key.removeprefix("model.").removeprefix("visual.") if ".visual." in f".{key}" else None
        if name in own and tuple(weight.shape) == tuple(own[name]):
            loaded[name] = weight_files.Weight("visual." + name, weight.shape, weight.read)
    if any(k.startswith("merger.") and k not in loaded for k in own):  # a merger to another width: all of it new
        loaded = {k: v for k, v in loaded.items() if not k.startswith("merger.")}
    missing = [k for k in own if k not in loaded and not k.startswith("merger.")]
    if missing:
        raise ValueError(f"{path}: no Qwen2-VL vision weights for {', '.join(missing[:3])} ...")
    log.info("vision encoder weights from %s (%d tensors; merger %s)", path, len(loaded),
             "loaded" if any(k.startswith("merger.") for k in loaded) else "new")
    return list(loaded.values())
