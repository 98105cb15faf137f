"""`model.init`: a recipe starts from a whole VLM (a llava-hf-layout checkpoint with SigLIP or CLIP, a checkpoint
in Sarashina2-Vision's layout), trains a stage and exports; frozen weights stay the checkpoint's, the export
computes what trained; a bad `model.init` is one line naming the field."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import LlavaForConditionalGeneration

from tests.conftest import REPO, TINY_RECIPE, kakehashi
from tests.train.test_qwen2vl import SARASHINA
from train.models import model_config
from train.models.llava import LLAVA
from train.models.qwen2vl import QWEN2VL
from train.recipe import load_recipe
from train.run import build_processor

PUBLISHED = json.loads((REPO / "tests" / "fixtures" / "llava-1.5-7b-hf.weights.json").read_text())["weights"]
CLIP = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "image_size": 32, "patch_size": 8, "projection_dim": 32}


def pattern(name: str) -> str:
    import re

    return re.sub(r"\.\d+\.", ".N.", name)


def write_checkpoint(tmp, kind: str):
    """A checkpoint in its family's published layout, random weights from a fixed seed: llava-hf's (siglip, clip)
    or Sarashina2-Vision's (qwen2_vl)."""
    overrides = {"siglip": [], "clip": ["model.vision_encoder.kind=clip", "model.vision_encoder.select_strategy=default"],
                 "qwen2_vl": []}[kind]
    recipe = load_recipe(SARASHINA if kind == "qwen2_vl" else TINY_RECIPE, overrides, check_files=False)
    if kind == "clip":
        recipe.model.vision_encoder.config = CLIP
    family = QWEN2VL if kind == "qwen2_vl" else LLAVA
    processor = build_processor(recipe, tmp / "cache")
    torch.manual_seed(11)
    model = family.build(recipe.model, model_config(recipe.model, processor.tokenizer))
    family.save_export(model, processor, tmp / "checkpoint")
    return tmp / "checkpoint", model


ASAGI_WIDTH = 256  # the projector's width: twice the tiny LLM's 128, as Asagi-8B's (8192 for llm-jp-3-7.2b's 4096)


def asagi_tokenizer(tmp):
    """An LLM tokenizer (builtin:tiny-ja with its <pad> and <image> renamed away: the LLM's own has neither) with
    `<image>` and `<pad>` added as the llava-hf conversion adds them: ids 512 and 513, past the LLM's vocabulary."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    from data_pipelines.synthetic.tiny_tokenizer import load_or_build_tiny_tokenizer

    state = json.loads(load_or_build_tiny_tokenizer(tmp / "tiny-ja").backend_tokenizer.to_str())
    for old, new in (("<pad>", "<|reserved-3|>"), ("<image>", "<|reserved-4|>")):
        state["model"]["vocab"][new] = state["model"]["vocab"].pop(old)
        next(t for t in state["added_tokens"] if t["content"] == old)["content"] = new
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(state)), bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>", clean_up_tokenization_spaces=False)
    tokenizer.add_tokens(AddedToken("<image>", special=True, normalized=False), special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer


def write_asagi_checkpoint(tmp):
    """A checkpoint in the released Asagi layout (MIL-UT/Asagi-*B), random weights from a fixed seed, as a llava-hf
    conversion writes it (transformers' convert_llava_weights_to_hf.py; Asagi's own scripts were not at hand, the
    fields below are the release's config.json's): config.json of model_type llava with `projector_hidden_size` (twice
    the LLM's width), its own vision_feature_layer / select strategy, the ids of the added `<image>` and `<pad>`, and
    an auto_map to the release's remote code; the LLM's vocabulary grown by those two tokens and padded to a multiple
    of 64; bf16 tensors (as released) under llava-hf's names, sharded with an index; the processor's files."""
    from huggingface_hub import save_torch_state_dict
    from transformers import LlamaConfig, LlavaConfig, LlavaProcessor, SiglipVisionConfig

    from train.models.configs import image_processor_class
    from train.models.llava import published_state_dict

    recipe = yaml.safe_load(TINY_RECIPE.read_text())["model"]
    tokenizer = asagi_tokenizer(tmp)
    llm = {k: v for k, v in recipe["llm"]["config"].items() if k != "model_type"}
    vocab = -(-len(tokenizer) // 64) * 64  # 514 -> 576, the conversion's pad_to_multiple_of=64
    vision = SiglipVisionConfig(**recipe["vision_encoder"]["config"], vision_use_head=False)  # as llava-hf's SigLIP
    config = LlavaConfig(vision_config=vision, text_config=LlamaConfig(**llm, vocab_size=vocab),
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                         vision_feature_select_strategy="full", projector_hidden_act="gelu")
    torch.manual_seed(11)
    state = published_state_dict(LlavaForConditionalGeneration(config))  # the LLM-width projector, replaced below
    width, vision, text = ASAGI_WIDTH, config.vision_config.hidden_size, config.text_config.hidden_size
    for name, shape in (("linear_1.weight", (width, vision)), ("linear_1.bias", (width,)),
                        ("linear_2.weight", (text, width)), ("linear_2.bias", (text,))):
        state[f"multi_modal_projector.{name}"] = torch.randn(shape) * 0.02
    out = tmp / "asagi"
    out.mkdir()
    save_torch_state_dict({k: v.to(torch.bfloat16) for k, v in state.items()}, out, max_shard_size="300KB",
                          metadata={"format": "pt"})
    record = {**config.to_dict(), "architectures": ["LlavaForConditionalGeneration"], "projector_hidden_size": width,
              "pad_token_id": tokenizer.pad_token_id, "torch_dtype": "bfloat16", "transformers_version": "4.45.1",
              "auto_map": {"AutoConfig": "configuration_llava.LlavaConfig",
                           "AutoModel": "modeling_llava.LlavaForConditionalGeneration"}}
    (out / "config.json").write_text(json.dumps(record, indent=2))
    size = config.vision_config.image_size
    image_processor = image_processor_class("SiglipImageProcessor")(size={"height": size, "width": size})
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    image_processor.save_pretrained(out)
    return out


def init_recipe(tmp, checkpoint, train, template=None, **model):
    recipe = {"name": f"from-{checkpoint.name}", "model": {"init": str(checkpoint), **model},
              **({"template": template} if template else {}),
              "synthesize": {"out": str(tmp / "shapes"), "samples": 40},
              "stages": [{"name": "tune", "train": train, "lr": {c: 1e-3 for c in train}, "steps": 3,
                          "global_batch_size": 4, "micro_batch_size": 2, "max_length": 96, "zero_stage": 2,
                          "precision": "fp32", "data_workers": 0,
                          "data": [{"shards": str(tmp / "shapes" / "vqa-*.tar"), "task": "vqa"}]}]}
    path = tmp / "init.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["siglip", "clip", "qwen2_vl"])
def test_a_recipe_starts_from_a_published_layout_trains_and_exports(kind, tmp_path):
    checkpoint, source = write_checkpoint(tmp_path, kind)
    if kind != "qwen2_vl":  # the checkpoint is written under llava-hf's published names
        index = load_file(checkpoint / "model.safetensors")
        assert {pattern(n) for n in index if "vision_tower" not in n} <= {pattern(n) for n in PUBLISHED}
    extra = {"vision_encoder": {"min_pixels": 1024, "max_pixels": 4096}} if kind == "qwen2_vl" else {}
    recipe = init_recipe(tmp_path, checkpoint, ["projector"], **extra)
    checked = kakehashi("recipe", "check", recipe, "--json")  # offline, from the checkpoint's files
    assert checked.returncode == 0, checked.stderr[-2000:]
    params = json.loads(checked.stdout)["params"]
    family = QWEN2VL if kind == "qwen2_vl" else LLAVA
    assert params == family.parameter_counts(source)
    done = kakehashi("train", recipe, "--output", tmp_path / "run")
    assert done.returncode == 0, done.stderr[-3000:]

    trained = load_file(tmp_path / "run" / "stages" / "01-tune" / "model.safetensors")
    names = {c: [n for n, _ in ps] for c, ps in family.component_parameters(source).items()}
    before = source.state_dict()
    assert all(torch.equal(trained[n], before[n]) for n in names["vision_encoder"] + names["llm"])  # frozen
    assert not all(torch.equal(trained[n], before[n]) for n in names["projector"])
    exported, _ = family.load_export(tmp_path / "run" / "export")
    assert all(torch.equal(exported.state_dict()[n], trained[n]) for n in trained)


@pytest.mark.parametrize("edit, message", [
    ({"init": "/no/such/checkpoint"}, "model: no such directory: /no/such/checkpoint"),
    ({"llm": {"config": {"hidden_size": 32}}}, "model: llm.config.hidden_size: 32 in the recipe, 128 in model.init"),
    ({"vision_encoder": {"kind": "clip"}}, "model: vision_encoder.kind: 'clip' in the recipe, 'siglip' in model.init"),
    ({"llm": {"path": "/models/llm"}}, "model: llm.path: the weights come from model.init"),
    ({"projector": {"hidden_size": 256}}, "model: projector.hidden_size: 256 in the recipe, 128 in model.init"),
])
def test_a_bad_init_is_one_line_naming_the_field(edit, message, tmp_path):
    checkpoint, _ = write_checkpoint(tmp_path, "siglip")
    recipe = init_recipe(tmp_path, checkpoint, ["projector"], **{k: v for k, v in edit.items() if k != "init"})
    if "init" in edit:
        text = yaml.safe_load(recipe.read_text())
        text["model"]["init"] = edit["init"]
        recipe.write_text(yaml.safe_dump(text))
    done = kakehashi("recipe", "check", recipe, "--skip-data")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert message in done.stderr, done.stderr


def test_a_checkpoint_of_an_unknown_layout_is_refused(tmp_path):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    recipe = init_recipe(tmp_path, tmp_path / "bert", ["projector"])
    done = kakehashi("recipe", "check", recipe, "--skip-data")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "model_type 'bert' is not a layout kakehashi reads (llava, sarashina2_vision, llava_onevision)" in done.stderr


def test_a_checkpoint_whose_tensors_do_not_fit_the_recipe_is_refused_by_check_and_train_naming_them(tmp_path):
    """A checkpoint whose tensors do not fit its own config.json (a projector twice the LLM's width with no
    projector_hidden_size saying so: a config edited by hand, a conversion that lost the field): exit 2 naming each
    tensor and both shapes, in `recipe check` and in `train`, before anything is built."""
    from safetensors.torch import save_file

    checkpoint, _ = write_checkpoint(tmp_path, "siglip")
    weights = load_file(checkpoint / "model.safetensors")
    weights["multi_modal_projector.linear_1.weight"] = torch.zeros(256, 64)
    weights["multi_modal_projector.linear_1.bias"] = torch.zeros(256)
    weights["multi_modal_projector.linear_2.weight"] = torch.zeros(128, 256)
    save_file(weights, checkpoint / "model.safetensors", metadata={"format": "pt"})
    recipe = init_recipe(tmp_path, checkpoint, ["projector"])
    for command in (("recipe", "check", recipe, "--skip-data"), ("train", recipe, "--output", tmp_path / "run")):
        done = kakehashi(*command)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert ("model.init: model.multi_modal_projector.linear_1.bias: shape (256,) in the checkpoint, (128,) in the "
                "model the recipe builds") in done.stderr
        assert "model.multi_modal_projector.linear_2.weight: shape (128, 256) in the checkpoint" in done.stderr


def test_an_asagi_layout_checkpoint_resolves_to_its_own_architecture(tmp_path):
    """model.init of a released-Asagi-layout checkpoint: the recipe takes the projector's width, the feature layer,
    the select strategy and the vision tower from its config.json, the image token from its tokenizer (`<image>`,
    added past the LLM's vocabulary), and `recipe check` counts the projector at its width."""
    from train.models.tokenizers import load_tokenizer

    checkpoint = write_asagi_checkpoint(tmp_path)
    path = init_recipe(tmp_path, checkpoint, ["projector"], template="asagi")
    model = load_recipe(path).model
    assert (model.projector.kind, model.projector.hidden_size) == ("mlp2x_gelu", ASAGI_WIDTH)
    assert (model.vision_encoder.feature_layer, model.vision_encoder.select_strategy) == (-2, "full")
    assert model.vision_encoder.config["vision_use_head"] is False
    config = model_config(model, load_tokenizer(model, tmp_path / "cache"))
    assert (config.image_token_index, config.text_config.vocab_size, config.projector_hidden_size) == (512, 576, 256)
    checked = kakehashi("recipe", "check", path, "--json", "--skip-data")
    assert checked.returncode == 0, checked.stderr[-2000:]
    assert json.loads(checked.stdout)["params"]["projector"] == 64 * 256 + 256 + 256 * 128 + 128


def shards(directory) -> dict:
    return {name: tensor for file in sorted(directory.glob("*.safetensors"))
            for name, tensor in load_file(file).items()}


@pytest.mark.slow
def test_an_asagi_layout_checkpoint_trains_a_stage_and_exports_its_frozen_tensors_bit_identical(tmp_path):
    """The acceptance of issue 24 (3b, 5): `kakehashi train` from the Asagi-layout checkpoint (projector twice the
    LLM's width) trains a projector stage and exports in the llava-hf layout with projector_hidden_size; every frozen
    tensor of the export is the release's bf16 tensor, bit for bit (the export is float32, as kakehashi's are: the
    cast is exact), and the export reads back through kakehashi's loader, not transformers' from_pretrained."""
    checkpoint = write_asagi_checkpoint(tmp_path)
    recipe = init_recipe(tmp_path, checkpoint, ["projector"], template="asagi")
    done = kakehashi("train", recipe, "--output", tmp_path / "run")
    assert done.returncode == 0, done.stderr[-3000:]
    export, released = tmp_path / "run" / "export", shards(checkpoint)
    exported = shards(export)
    assert sorted(exported) == sorted(released)
    projector = [n for n in released if n.startswith("multi_modal_projector.")]
    frozen = [n for n in released if n not in projector]
    assert all(exported[n].dtype == torch.float32 and torch.equal(exported[n], released[n].float()) for n in frozen)
    assert all(torch.equal(exported[n].to(torch.bfloat16).view(torch.int16), released[n].view(torch.int16))
               for n in frozen)
    assert not all(torch.equal(exported[n], released[n].float()) for n in projector)  # it trained
    config = json.loads((export / "config.json").read_text())
    assert (config["projector_hidden_size"], config["image_token_index"], config["vision_feature_layer"],
            config["vision_feature_select_strategy"]) == (ASAGI_WIDTH, 512, -2, "full")
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        LlavaForConditionalGeneration.from_pretrained(export)
    card = (export / "README.md").read_text()  # which loaders hold it, where the weights came from
    assert "library_name: kakehashi" in card and "vLLM's llava cannot hold it" in card
    assert f"- vision encoder: siglip, from model.init {checkpoint}" in card
    assert "- projector: mlp2x_gelu, hidden size 256" in card
    model, _ = LLAVA.load_export(export)
    trained = load_file(tmp_path / "run" / "stages" / "01-tune" / "model.safetensors")
    assert all(torch.equal(model.state_dict()[n], t) for n, t in trained.items())
