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
from typing import Any, Callable, Iterable, NamedTuple

import torch
import yaml
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from data_pipelines.render.templates import IMAGE_PLACEHOLDER as IMAGE_TOKEN
from train.errors import RecipeError, TokenizerUnavailable, UsageError

log = logging.getLogger(__name__)


class ModelFamily:
    """The interface of a model family. `spec` is the recipe's ModelSpec; `config` the family's architecture
    record (a transformers config, or the family's own); `model` what `build` returns."""

    name: str                             # shown in logs and model cards
    projector_kinds: tuple[str, ...]      # projector.kind values this family builds
    export_model_types: tuple[str, ...]   # config.json model_type values of directories `load_export` reads
    vision_depth_field: str               # the vision config's block count (num_hidden_layers, depth, ...)

    # -------------------------------------------------------------------------------------------- recipe, build

    def validate(self, spec) -> list[str]:
        """Problems of the recipe's model section for this family ('field: message'); may fill family defaults."""
        return []

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

    def build(self, spec, config, *, load_weights: bool = True) -> nn.Module:
        """The model; inline-config components start random (seed first), and with `load_weights` what `weights`
        names is copied in (train/build.py builds a stage's model in its precision, under ZeRO-3 partitioned)."""
        raise NotImplementedError

    def weights(self, spec, config, model: nn.Module | None = None) -> list[Weight]:
        """The recipe's weights in the model's own state-dict names, each read when asked for: all of model.init's
        checkpoint, else those of its `path` components ([] when every component starts random). `model`: the
        model they go into (its names and shapes), else one built on the meta device."""
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


class Weight(NamedTuple):
    """One tensor of a weight source, read only when `read()` is called: a loader copies one tensor at a time, and
    under ZeRO-3 only the rank that fills the gathered parameter reads it."""

    name: str                    # the model's state-dict name
    shape: tuple[int, ...]       # the shape `read()` returns (checked on every rank before anything is read)
    read: Callable[[], torch.Tensor]


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def safetensors_weights(path: Path | str) -> list[Weight]:
    """The tensors of one safetensors file, each read by itself with plain file reads: no memory map, so the
    process holds the tensor being copied, not the file's pages (which would count in its resident memory)."""
    with open(path, "rb") as file:
        header_size = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(header_size))
    header.pop("__metadata__", None)

    def reader(entry: dict) -> Callable[[], torch.Tensor]:
        def read() -> torch.Tensor:
            begin, end = entry["data_offsets"]
            raw = torch.empty(end - begin, dtype=torch.uint8)
            with open(path, "rb") as file:
                file.seek(8 + header_size + begin)
                file.readinto(raw.numpy())
            return raw.view(SAFETENSORS_DTYPES[entry["dtype"]]).reshape(entry["shape"])
        return read

    return [Weight(name, tuple(entry["shape"]), reader(entry)) for name, entry in header.items()]


def directory_weights(directory: Path) -> list[Weight]:
    """Every tensor of a checkpoint directory's safetensors files (one file, or the shards beside an index)."""
    return [w for file in sorted(Path(directory).glob("*.safetensors")) for w in safetensors_weights(file)]


def grown_rows(weight: Weight, rows: int) -> Weight:
    """`weight` (embedding or LM head rows) grown to `rows` as resized_vocabulary grows them."""
    if weight.shape[0] >= rows:
        return weight
    return Weight(weight.name, (rows, *weight.shape[1:]),
                  lambda: resized_vocabulary({weight.name: weight.read()}, (weight.name,), rows)[weight.name])


def module_weights(prefix: str, names: Iterable[str], load: Callable[[], nn.Module], shapes: dict) -> list[Weight]:
    """Weights `prefix` + name for each of a module's state-dict `names`, read from the module `load()` returns
    (loaded once, on the first read: a `path` component through transformers' from_pretrained)."""
    loaded = []

    def tensor(name: str) -> torch.Tensor:
        if not loaded:
            loaded.append(load().state_dict())
        return loaded[0][name]

    return [Weight(prefix + name, tuple(shapes[prefix + name]), lambda name=name: tensor(name)) for name in names]


def load_weights(model: nn.Module, weights: Iterable[Weight], *, strict: bool, gathered=None) -> int:
    """Copy `weights` into `model`, one tensor at a time; returns how many. A shape that differs is an error; a name
    the model lacks is logged and skipped (as from_pretrained does: a checkpoint may carry a pooling head, ...); with
    `strict` a parameter or buffer left out is an error (tied weights: one of its names is enough).
    `gathered(tensor)`: a context yielding whether this process fills `tensor` (train/build.py's ZeRO-3 gather)."""
    from contextlib import nullcontext

    targets = dict(model.named_parameters(remove_duplicate=False))
    targets.update(model.named_buffers(remove_duplicate=False))
    persistent = set(model.state_dict(keep_vars=True))
    filled, count, unused = set(), 0, []
    for weight in weights:
        target = targets.get(weight.name)
        if target is None or weight.name not in persistent:
            unused.append(weight.name)
            continue
        shape = tuple(getattr(target, "ds_shape", target.shape))
        if shape != tuple(weight.shape):
            raise ValueError(f"{weight.name}: shape {tuple(weight.shape)} where the model has {shape}")
        with torch.no_grad(), (gathered(target) if gathered else nullcontext(True)) as fills:
            if fills:
                target.data.copy_(weight.read())
        filled.add(id(target))
        count += 1
    if unused:
        log.warning("%d weights the model has no place for, not used: %s", len(unused), ", ".join(unused[:5]))
    missing = [n for n, t in targets.items() if n in persistent and id(t) not in filled]
    if strict and missing:
        raise ValueError(f"no weights for {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    return count


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


# ---------------------------------------------------------------------------------------------- tokenizer, loss


def load_tokenizer(spec, cache_dir: str | Path, offline: bool = False, stand_in: bool = False):
    """The recipe's tokenizer, with the image token (and image start/end tokens) added as special tokens if missing.

    A hub tokenizer that cannot be loaded (not on this machine and offline, unknown id) is TokenizerUnavailable,
    naming it; with `stand_in` (benchmarks: the shapes, not the text, matter) the hub is not asked at all and a
    tokenizer not on this machine is replaced by `stand_in_tokenizer`, which has the LLM's vocabulary size."""
    if spec.tokenizer.startswith("builtin:"):
        from data_pipelines.synthetic.tiny_tokenizer import load_or_build_tiny_tokenizer

        name = spec.tokenizer.removeprefix("builtin:")
        tokenizer = load_or_build_tiny_tokenizer(Path(cache_dir) / name, spec.tokenizer)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer, trust_remote_code=spec.llm.trust_remote_code,
                                                      local_files_only=offline or stand_in)
        except (OSError, ValueError) as err:
            if not stand_in:
                raise TokenizerUnavailable(f"model.tokenizer: cannot load {spec.tokenizer} "
                                           f"({str(err).strip().splitlines()[0]})") from None
            tokenizer = stand_in_tokenizer(spec, cache_dir)
    missing = [t for t in (IMAGE_TOKEN, *(spec.image_start_end or ())) if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # right padding is masked out of the loss anyway
    return tokenizer


def stand_in_tokenizer(spec, cache_dir: str | Path):
    """builtin:tiny-ja padded to the LLM config's vocabulary size (with the image tokens kakehashi adds), so a
    model built for it has the real embedding and LM head shapes. `tokenizer.kakehashi_stand_in` is True."""
    from data_pipelines.synthetic.tiny_tokenizer import load_or_build_stand_in_tokenizer

    try:
        vocab_size = llm_config(spec, 0).vocab_size  # the config's own size (0: it gives none)
    except OSError as err:  # a hub config, offline
        raise TokenizerUnavailable(f"model.tokenizer: {spec.tokenizer} is not on this machine, nor model.llm's "
                                   f"config for a stand-in ({str(err).strip().splitlines()[0]})") from None
    if not vocab_size:
        raise TokenizerUnavailable(f"model.tokenizer: {spec.tokenizer} is not on this machine, and model.llm's "
                                   f"config gives no vocab_size for a stand-in of its size")
    specials = [IMAGE_TOKEN, *(spec.image_start_end or ())]
    tokenizer = load_or_build_stand_in_tokenizer(Path(cache_dir) / f"stand-in-{vocab_size}", vocab_size, specials)
    tokenizer.kakehashi_stand_in = True
    log.warning("model.tokenizer %s is not on this machine: a stand-in tokenizer of %d tokens (the LLM's "
                "vocabulary) takes its place; the shapes are real, the text's tokens are not", spec.tokenizer,
                len(tokenizer))
    return tokenizer


DEFAULT_LOSS = ("chunked", 1024)  # ModelSpec's defaults (train/recipe.py), for models built without a recipe


def is_stand_in(tokenizer) -> bool:
    """Whether `load_tokenizer` gave a stand-in for the recipe's tokenizer."""
    return getattr(tokenizer, "kakehashi_stand_in", False)


def set_loss(model: nn.Module, spec) -> None:
    """Record the recipe's loss (model.loss, model.loss_chunk_size) on a built model; its training forward reads it.
    A plain attribute, not a parameter or buffer: it is no part of the weights, the config or the export."""
    model.kakehashi_loss = (spec.loss, spec.loss_chunk_size)


def loss_of(model: nn.Module) -> tuple[str, int]:
    """The loss `set_loss` recorded, or the default (a model loaded from a stage or an export)."""
    return getattr(model, "kakehashi_loss", DEFAULT_LOSS)


class SourceTokens(NamedTuple):
    """Which data source each label came from, for the loss per source (train/engine.py: train_step)."""

    label_sources: torch.Tensor          # [B, T] long: the source index of each label (-1 on padding)
    count: int                           # sources in the stage
    weights: torch.Tensor | None = None  # [count] fp32 loss weights, None when every source weighs 1


def lm_loss_sum(hidden: torch.Tensor, lm_head: nn.Module, labels: torch.Tensor,
                loss: tuple[str, int] = DEFAULT_LOSS, sources: SourceTokens | None = None):
    """(summed next-token loss in fp32, target count) of the LLM's last hidden states [B, T, D] through `lm_head`
    against labels [B, T]: token_loss_sum's contract, without (`chunked`, `liger`) or with (`full`) the whole
    [B, T, V] logits in memory. `loss`: (kind, tokens per chunk).

    With `sources`, a third value: the unweighted loss summed per source [count] (fp64, no gradient), read from the
    same log-probabilities as the loss (no second pass over the head; None under liger, whose fused kernel keeps no
    per-token loss). With `sources.weights`, the loss is sum(weight of the token's source * token loss)."""
    kind, chunk_size = loss
    targets = labels[:, 1:].flatten()
    if sources is None and kind == "full":
        return token_loss_sum(lm_head(hidden), labels)
    if sources is None and kind == "liger":
        return _liger_loss_sum(hidden[:, :-1].flatten(0, 1), lm_head, targets), (targets != -100).sum()
    if sources is None:
        return chunked_loss_sum(hidden[:, :-1].flatten(0, 1), lm_head, targets, chunk_size), (targets != -100).sum()
    token_sources = sources.label_sources[:, 1:].flatten().clamp(min=0)  # [N]; -1 only where the label is ignored
    weights = None if sources.weights is None else sources.weights[token_sources]  # [N] fp32
    if kind == "liger":
        if weights is not None:
            raise RecipeError("recipe", ["model.loss: liger cannot weight sources (loss_weight); use chunked"])
        return _liger_loss_sum(hidden[:, :-1].flatten(0, 1), lm_head, targets), (targets != -100).sum(), None
    if kind == "full":
        total, per_token = _token_losses(lm_head(hidden)[:, :-1].flatten(0, 1), targets, weights)
    else:
        total, per_token = chunked_loss_sum(hidden[:, :-1].flatten(0, 1), lm_head, targets, chunk_size, weights)
    per_source = per_token.new_zeros(sources.count, dtype=torch.float64).index_add_(0, token_sources,
                                                                                     per_token.double())
    return total, (targets != -100).sum(), per_source


def _liger_loss_sum(hidden: torch.Tensor, lm_head: nn.Module, targets: torch.Tensor) -> torch.Tensor:
    if not hidden.is_cuda:
        raise RecipeError("recipe", [f"model.loss: liger runs on CUDA only, not on {hidden.device.type}"])
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    # reads the head's weight directly: the recipe refuses liger with ZeRO-3, where it is partitioned
    fused = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="sum")
    return fused(lm_head.weight, hidden, targets, getattr(lm_head, "bias", None)).float()


def chunked_loss_sum(hidden: torch.Tensor, lm_head: nn.Module, targets: torch.Tensor, chunk_size: int,
                     weights: torch.Tensor | None | bool = False):
    """Summed fp32 cross-entropy of hidden [N, D] -> targets [N], `chunk_size` tokens at a time: each chunk's logits
    live only inside its checkpoint (recomputed in backward), so at most one chunk's [chunk, V] is held.

    `weights` False: the sum only (as always). None or [N] fp32 per-token weights: (the weighted sum, the unweighted
    per-token losses [N] without gradient), both from each chunk's one log-softmax.

    The head is called as a module, so ZeRO-3 gathers its (partitioned) weight for each call; every rank then must
    call it equally often, so under a partitioned head the chunk count is the largest of all ranks' (a rank with
    fewer tokens pads with chunks of one ignored token)."""
    from torch.utils.checkpoint import checkpoint

    count = -(-hidden.shape[0] // chunk_size)
    per_token = weights is not False
    token_weights = weights if per_token and weights is not None else None
    chunks = [(hidden[i:i + chunk_size], targets[i:i + chunk_size],
               None if token_weights is None else token_weights[i:i + chunk_size])
              for i in range(0, hidden.shape[0], chunk_size)]
    padding = (hidden[:1], torch.full_like(targets[:1], -100), None)  # one ignored token: loss 0, gradient 0
    padded = _chunks_on_every_rank(count, lm_head) - count
    chunks += [padding] * padded
    total, losses = hidden.new_zeros((), dtype=torch.float32), []
    for chunk, chunk_targets, chunk_weights in chunks:
        if not per_token:
            total = total + checkpoint(_chunk_loss, lm_head, chunk, chunk_targets, use_reentrant=False)
            continue
        chunk_total, chunk_losses = checkpoint(_chunk_token_losses, lm_head, chunk, chunk_targets, chunk_weights,
                                               use_reentrant=False)
        total = total + chunk_total
        losses.append(chunk_losses)
    if not per_token:
        return total
    return total, torch.cat(losses[:len(losses) - padded])  # [N]


def _chunk_loss(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(lm_head(hidden).float(), targets, ignore_index=-100, reduction="sum")


def _chunk_token_losses(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                        weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    return _token_losses(lm_head(hidden), targets, weights)


def _token_losses(logits: torch.Tensor, targets: torch.Tensor,
                  weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, per-token losses [N] without gradient) of logits [N, V] against targets [N].

    Unweighted, the sum is cross_entropy(reduction="sum") bit for bit: cross_entropy is log_softmax then nll_loss
    (ATen's cross_entropy_loss), and the per-token losses are read from the same log-probabilities (ignored: 0)."""
    log_probs = nn.functional.log_softmax(logits.float(), 1)  # [N, V]
    per_token = nn.functional.nll_loss(log_probs.detach(), targets, ignore_index=-100, reduction="none")  # [N]
    if weights is None:
        total = nn.functional.nll_loss(log_probs, targets, ignore_index=-100, reduction="sum")
    else:
        total = (nn.functional.nll_loss(log_probs, targets, ignore_index=-100, reduction="none") * weights).sum()
    return total, per_token


def _chunks_on_every_rank(count: int, lm_head: nn.Module) -> int:
    """The most chunks any rank has, when the head is ZeRO-3 partitioned over several ranks; else `count`."""
    partitioned = any(hasattr(p, "ds_id") for p in lm_head.parameters())
    if not (partitioned and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return count
    most = torch.tensor([count], device=lm_head.weight.device)
    torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
    return int(most.item())


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token loss in fp32, target count) of logits [B, T, V] against labels [B, T] (-100: not a target).

    Summed, not averaged: the engine normalises over every target token of an optimizer step (all micro-batches,
    all ranks), not per micro-batch."""
    targets = labels[:, 1:]
    loss_sum = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                                           ignore_index=-100, reduction="sum")
    return loss_sum, (targets != -100).sum()
