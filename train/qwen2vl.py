"""Qwen2-VL vision encoder -> its 2x2 patch merger (the projector, + optional LayerNorm) -> a causal LM.

transformers has no class for a Qwen2-VL ViT in front of a Llama (Sarashina2-Vision's shape), so this is our own
small model built from transformers' parts: Qwen2VisionTransformerPretrainedModel (patch embed, blocks, merger) and
AutoModelForCausalLM. It trains, exports (our format: config.json with a kakehashi architecture record +
model.safetensors + tokenizer + image processor) and loads back without remote code. No parallelism here.

Images arrive as Qwen2-VL's flattened patches: pixel_values [N_patches, 3 * temporal_patch * patch * patch] for
all images of a micro-batch, and image_grid_thw [N_images, 3] (t, h, w in patches); image i gives
t*h*w / merge**2 tokens, which fill the <image> positions of the text in order.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

log = logging.getLogger(__name__)

MODEL_TYPE = "kakehashi_qwen2vl"
PROCESSOR_FILE = "kakehashi_processor.json"


class Qwen2VLVisionLMConfig:
    """The architecture record written as config.json beside the weights (stages and exports)."""

    model_type = MODEL_TYPE

    def __init__(self, vision_config: Qwen2VLVisionConfig, text_config: PretrainedConfig, image_token_index: int,
                 projector_norm: bool = False):
        self.vision_config, self.text_config = vision_config, text_config
        self.image_token_index, self.projector_norm = image_token_index, projector_norm

    def to_dict(self) -> dict:
        return {"model_type": MODEL_TYPE, "architectures": ["KakehashiQwen2VLVisionLM"],
                "vision_config": self.vision_config.to_dict(), "text_config": self.text_config.to_dict(),
                "image_token_index": self.image_token_index, "projector_norm": self.projector_norm}

    def save_pretrained(self, directory) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        Path(directory, "config.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory) -> Qwen2VLVisionLMConfig:
        record = json.loads(Path(directory, "config.json").read_text())
        if record.get("model_type") != MODEL_TYPE:
            raise ValueError(f"{directory}/config.json is not a {MODEL_TYPE} record")
        vision = dict(record["vision_config"])
        vision.pop("model_type", None)
        text = dict(record["text_config"])
        return cls(Qwen2VLVisionConfig(**vision), AutoConfig.for_model(text.pop("model_type"), **text),
                   record["image_token_index"], record["projector_norm"])


class Qwen2VLVisionLM(nn.Module):
    """The model; `forward` is the training forward (same contract as model.LlavaForTraining)."""

    def __init__(self, config: Qwen2VLVisionLMConfig):
        super().__init__()
        self.config = config
        self.vision = Qwen2VisionTransformerPretrainedModel(config.vision_config)  # its merger projects to the LLM
        hidden = config.text_config.hidden_size
        self.projector_norm = nn.LayerNorm(hidden) if config.projector_norm else None
        self.llm = AutoModelForCausalLM.from_config(config.text_config)

    @property
    def device(self) -> torch.device:
        return self.llm.device

    def component_modules(self) -> dict[str, list[nn.Module]]:
        projector = [self.vision.merger] + ([self.projector_norm] if self.projector_norm is not None else [])
        return {"vision_encoder": [self.vision.patch_embed, self.vision.blocks], "projector": projector,
                "llm": [self.llm]}

    def vision_blocks(self) -> nn.ModuleList:
        return self.vision.blocks

    # ------------------------------------------------------------------------------------------ forward

    def image_features(self, pixel_values, image_grid_thw):
        # pixel_values: [N_patches, 3*T*P*P]; image_grid_thw: [N_images, 3] -> [N_patches / merge**2, D_llm]
        features = self.vision(pixel_values, grid_thw=image_grid_thw).pooler_output  # blocks, then the merger
        return self.projector_norm(features) if self.projector_norm is not None else features

    def embeddings(self, input_ids, pixel_values=None, image_grid_thw=None):
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
        image_mask = (input_ids == self.config.image_token_index).unsqueeze(-1)  # [B, T, 1]
        if image_mask.sum() != features.shape[0]:
            raise ValueError(f"{int(image_mask.sum())} image tokens in the text, {features.shape[0]} image features")
        return embeds.masked_scatter(image_mask.expand_as(embeds), features)

    def logits(self, input_ids, attention_mask, pixel_values=None, image_grid_thw=None, position_ids=None):
        embeds = self.embeddings(input_ids, pixel_values, image_grid_thw)
        if position_ids is not None:  # a packed row: transformers builds the block-diagonal mask from position ids
            attention_mask = None     # (only with no mask and no KV cache, hence use_cache=False)
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=False).logits

    def forward(self, input_ids, attention_mask, labels, pixel_values=None, image_grid_thw=None, position_ids=None):
        """(summed token loss, target count): the engine normalises over every target token of an optimizer step."""
        logits = self.logits(input_ids, attention_mask, pixel_values, image_grid_thw, position_ids)  # [B, T, V]
        targets = labels[:, 1:]
        loss_sum = nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")
        return loss_sum, (targets != -100).sum()

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, pixel_values=None, image_grid_thw=None, max_new_tokens=32,
                 do_sample=False, **_):
        """Greedy decoding with the LLM's KV cache; returns prompt + new tokens [1, T + n] as transformers does."""
        if do_sample:
            raise ValueError("only greedy decoding is implemented")
        embeds = self.embeddings(input_ids, pixel_values, image_grid_thw)
        out = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=True)
        tokens, eos = input_ids, self.llm.generation_config.eos_token_id or self.config.text_config.eos_token_id
        eos = {eos} if isinstance(eos, int) else set(eos or ())
        for _ in range(max_new_tokens):
            next_token = out.logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
            tokens = torch.cat([tokens, next_token], dim=1)
            if int(next_token) in eos:
                break
            attention_mask = torch.cat([attention_mask, torch.ones_like(next_token)], dim=1)
            out = self.llm(input_ids=next_token, attention_mask=attention_mask, past_key_values=out.past_key_values,
                           use_cache=True)
        return tokens

    def save_pretrained(self, directory, safe_serialization: bool = True) -> None:
        from safetensors.torch import save_model

        self.config.save_pretrained(directory)
        save_model(self, str(Path(directory, "model.safetensors")), metadata={"format": "pt"})  # tied weights once


# ---------------------------------------------------------------------------------------------- building


def qwen2vl_config(spec, vocab_size: int, image_token_id: int) -> Qwen2VLVisionLMConfig:
    from train.model import _checked, _inline_config, llm_config

    inline = _inline_config(spec.vision_encoder)
    if inline is not None:
        vision = _checked(Qwen2VLVisionConfig, inline, "model.vision_encoder.config")
    else:
        loaded = AutoConfig.from_pretrained(spec.vision_encoder.path, revision=spec.vision_encoder.revision)
        vision = Qwen2VLVisionConfig(**{k: v for k, v in loaded.vision_config.to_dict().items() if k != "model_type"})
    text = llm_config(spec.llm)
    llm_inline = _inline_config(spec.llm)
    text.vocab_size = vocab_size if llm_inline is not None and "vocab_size" not in llm_inline else max(text.vocab_size, vocab_size)
    vision.hidden_size = text.hidden_size  # the merger projects to the LLM's width
    return Qwen2VLVisionLMConfig(vision, text, image_token_id, spec.projector.norm)


def build_qwen2vl(spec, config: Qwen2VLVisionLMConfig, *, load_weights: bool = True) -> Qwen2VLVisionLM:
    """Inline-config components start random (seed first); `path` components load weights."""
    from train.model import set_attn_implementation

    model = Qwen2VLVisionLM(config)
    set_attn_implementation(model.vision, spec)
    set_attn_implementation(model.llm, spec)
    if not load_weights:
        return model
    if spec.vision_encoder.path is not None:
        load_vision_weights(model, spec.vision_encoder.path, spec.vision_encoder.revision)
    if spec.llm.path is not None:
        causal = AutoModelForCausalLM.from_pretrained(
            spec.llm.path, revision=spec.llm.revision, trust_remote_code=spec.llm.trust_remote_code)
        causal.resize_token_embeddings(config.text_config.vocab_size)  # room for the image tokens
        model.llm.load_state_dict(causal.state_dict())
        log.info("LLM weights from %s", spec.llm.path)
    return model


def load_vision_weights(model: Qwen2VLVisionLM, path: str, revision: str | None = None) -> None:
    """Patch embed + blocks from a Qwen2-VL checkpoint (its `visual.*` tensors). The merger is loaded only when its
    output width matches the LLM's; else it starts random (Sarashina2-Vision trains it first)."""
    from huggingface_hub import snapshot_download
    from safetensors import safe_open

    directory = Path(path) if Path(path).is_dir() else Path(snapshot_download(path, revision=revision,
                                                                               allow_patterns=["*.safetensors"]))
    own = model.vision.state_dict()
    loaded = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as tensors:
            for key in tensors.keys():
                name = key.removeprefix("model.").removeprefix("visual.") if ".visual." in f".{key}" else None
                if name in own and tensors.get_slice(key).get_shape() == list(own[name].shape):
                    loaded[name] = tensors.get_tensor(key)
    if any(k.startswith("merger.") and k not in loaded for k in own):  # a merger to another width: all of it new
        loaded = {k: v for k, v in loaded.items() if not k.startswith("merger.")}
    missing = [k for k in own if k not in loaded and not k.startswith("merger.")]
    if missing:
        raise ValueError(f"{path}: no Qwen2-VL vision weights for {', '.join(missing[:3])} ...")
    model.vision.load_state_dict(loaded, strict=False)
    log.info("vision encoder weights from %s (%d tensors; merger %s)", path, len(loaded),
             "loaded" if any(k.startswith("merger.") for k in loaded) else "new")


def image_processor(spec, vision: Qwen2VLVisionConfig):
    """transformers' Qwen2-VL image processor (the PIL twin where torchvision is missing) at the recipe's limits."""
    import importlib.util

    import transformers

    name = "Qwen2VLImageProcessor" + ("Pil" if importlib.util.find_spec("torchvision") is None else "")
    return getattr(transformers, name)(size={"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels},
               patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
               merge_size=vision.spatial_merge_size)


# ---------------------------------------------------------------------------------------------- processor, export


class Qwen2VLChatProcessor:
    """Tokenizer + image processor, with the <image> expansion (and start/end tokens) the training data uses."""

    def __init__(self, tokenizer, image_processor, image_token: str = "<image>",
                 image_start_end: tuple[str, str] | None = None):
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.image_token, self.image_start_end = image_token, tuple(image_start_end) if image_start_end else None
        self.chat_template = tokenizer.chat_template

    def apply_chat_template(self, messages, add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def __call__(self, images=None, text: str = "", return_tensors: str = "pt"):
        inputs = {}
        pieces = text.split(self.image_token)
        if images:
            processed = self.image_processor(images=images, return_tensors="pt")
            inputs = {"pixel_values": processed["pixel_values"], "image_grid_thw": processed["image_grid_thw"]}
            counts = (processed["image_grid_thw"].prod(-1) // self.image_processor.merge_size ** 2).tolist()
            if len(counts) != len(pieces) - 1:
                raise ValueError(f"{len(pieces) - 1} {self.image_token} in the text for {len(counts)} image(s)")
            start, end = self.image_start_end or ("", "")
            text = pieces[0] + "".join(start + self.image_token * n + end + p for n, p in zip(counts, pieces[1:]))
        from transformers import BatchFeature

        encoded = self.tokenizer(text, return_tensors=return_tensors)
        return BatchFeature({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], **inputs})

    def save_pretrained(self, directory) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)
        record = {"image_token": self.image_token, "image_start_end": self.image_start_end}
        Path(directory, PROCESSOR_FILE).write_text(json.dumps(record, ensure_ascii=False, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory) -> Qwen2VLChatProcessor:
        import importlib.util

        import transformers
        from transformers import AutoTokenizer

        record = json.loads(Path(directory, PROCESSOR_FILE).read_text())
        name = "Qwen2VLImageProcessor" + ("Pil" if importlib.util.find_spec("torchvision") is None else "")
        processor = getattr(transformers, name).from_pretrained(directory)
        return cls(AutoTokenizer.from_pretrained(directory), processor, record["image_token"], record["image_start_end"])


def is_export(directory) -> bool:
    path = Path(directory, "config.json")
    return path.is_file() and json.loads(path.read_text()).get("model_type") == MODEL_TYPE


def load_export(directory) -> tuple[Qwen2VLVisionLM, Qwen2VLChatProcessor]:
    """An exported (or stage) directory -> (model in eval mode, processor). Safetensors only, no remote code."""
    from safetensors.torch import load_model

    model = Qwen2VLVisionLM(Qwen2VLVisionLMConfig.from_pretrained(directory))
    load_model(model, str(Path(directory, "model.safetensors")))
    return model.eval(), Qwen2VLChatProcessor.from_pretrained(directory)
