"""Acceptance: the tiny Sarashina twin (Qwen2-VL encoder) trains its three stages under torchrun, 2 processes, ZeRO-3,
to an export in our format that loads back with the training model's logits; frozen parts stay bit-identical; its
last stage evaluates periodically (dynamic-resolution eval samples, generation in lockstep across the ranks)."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.train.conftest import torchrun
from tests.train.test_qwen2vl import SARASHINA

pytestmark = pytest.mark.slow  # the twin's three stages under torchrun


@pytest.fixture(scope="module")
def twin_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sarashina")
    recipe = yaml.safe_load(SARASHINA.read_text())
    recipe["synthesize"].update(out=str(tmp / "shapes"), samples=60)
    for stage in recipe["stages"]:
        stage.update(steps=3, zero_stage=3, data_workers=0)
        for source in stage["data"]:
            source["shards"] = source["shards"].replace("data/tiny-shapes", str(tmp / "shapes"))
    recipe["stages"][2].update(eval_every=3, eval_samples=3, eval_generate=2,  # 3 samples: one rank pads a forward
                               eval_data=[{"shards": s["shards"], "task": s["task"]} for s in recipe["stages"][2]["data"]])
    path = tmp / "sarashina-zero3.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True))
    result = torchrun(path, tmp / "run")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp / "run", result.stdout


def stage_weights(run, name):
    return load_file(run / "stages" / name / "model.safetensors")


def test_three_stages_train_their_components_only(twin_run):
    run, stdout = twin_run
    assert "stage 3/3 instruct: 3 steps" in stdout
    projector, vision, instruct = (stage_weights(run, n) for n in ("01-projector", "02-vision", "03-instruct"))
    summaries = [json.loads((run / "stages" / n / "summary.json").read_text())
                 for n in ("01-projector", "02-vision", "03-instruct")]
    assert [sorted(c for c, n in s["trainable"].items() if n) for s in summaries] == [
        ["projector"], ["projector", "vision_encoder"], ["llm", "projector"]]

    def same(a, b, prefix):
        return all(torch.equal(a[k], b[k]) for k in a if k.startswith(prefix))

    def changed(a, b, prefix):
        return any(not torch.equal(a[k], b[k]) for k in a if k.startswith(prefix))

    assert same(projector, vision, "llm.") and changed(projector, vision, "visual.merger.")
    # stage 2 unfreezes the last of 3 blocks only: blocks 0 and 1 and the patch embed stay bit-identical
    assert same(projector, vision, "visual.blocks.0.") and same(projector, vision, "visual.blocks.1.")
    assert same(projector, vision, "visual.patch_embed.") and changed(projector, vision, "visual.blocks.2.")
    assert same(vision, instruct, "visual.patch_embed.") and same(vision, instruct, "visual.blocks.")
    assert changed(vision, instruct, "llm.") and changed(vision, instruct, "norm.")


def test_export_loads_without_remote_code_and_matches_the_trained_weights(twin_run):
    from PIL import Image

    from train.benchmarks.generate import answer
    from train.chat import load_export
    from train.models.qwen2vl import QWEN2VL, Qwen2VLVisionLMConfig
    from train.recipe import load_recipe

    run, _ = twin_run
    assert not list((run / "export").glob("*.bin")) and not list((run / "export").glob("*.py"))
    model, processor = load_export(run / "export")
    recipe = load_recipe(run / "recipe.yaml", check_files=False)
    trained = QWEN2VL.build(recipe.model, Qwen2VLVisionLMConfig.from_pretrained(run / "stages" / "03-instruct"),
                          load_weights=False)
    trained.load_state_dict(stage_weights(run, "03-instruct"))
    trained.eval()
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "この図形は何色ですか？"}]}],
        add_generation_prompt=True)
    assert prompt.startswith("### Human: <image>")
    inputs = processor(images=[Image.new("RGB", (48, 64), "red")], text=prompt)
    with torch.no_grad():
        assert torch.equal(model.logits(**inputs), trained.logits(**inputs))
    assert isinstance(answer(model, processor, [Image.new("RGB", (64, 64), "blue")], "何色?", 4), str)


def test_kakehashi_eval_scores_the_export(twin_run):
    from tests.conftest import kakehashi

    run, _ = twin_run
    shards = sorted((run.parent / "shapes").glob("vqa-*.tar"))[:1] + sorted((run.parent / "shapes").glob("captions-*.tar"))[:1]
    done = kakehashi("eval", run / "export", "--data", *shards, "--max-samples", "6", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["samples"] == 6 and report["bad_samples"] == 0 and report["vqa_samples"] == 6
    assert 0 < report["loss"] < 20 and set(report["loss_by_source"]) == {"synth-shapes"}  # the samples' own source field
    assert 0 <= report["exact_match"] <= 1 and 0 <= report["rouge_l_chars_f1"] <= 1


def test_periodic_eval_on_two_zero3_ranks_equals_one_process_on_the_stage_weights(twin_run):
    """The eval samples come through the training loader's own path (per-image token counts, start/end tokens), the
    2 ranks generate in lockstep, and their all-reduced losses equal one process's on the final weights."""
    from train.models.qwen2vl import QWEN2VL
    from train.periodic_eval import build_periodic_eval
    from train.recipe import load_recipe

    run, _ = twin_run
    (record,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line).get("kind") == "eval"]
    assert (record["stage"], record["step"], record["eval_vqa_samples"]) == ("instruct", 3, 2)
    assert 0 <= record["eval_rouge_l_chars_f1"] <= 1
    recipe = load_recipe(run / "recipe.yaml", check_files=False)
    processor = QWEN2VL.load_processor(run / "processor")
    evaluator = build_periodic_eval(recipe, 2, processor, rank=0, world_size=1)
    trained = QWEN2VL.load_stage(run / "stages" / "03-instruct")
    start, end = (processor.tokenizer.convert_tokens_to_ids(t) for t in recipe.model.image_start_end)
    for example in evaluator.eval_set.sources["vqa"]:  # as training encodes them, not a re-implementation
        ids = example.input_ids
        image_tokens = int(example.image_grid_thw.prod(-1).sum()) // 4  # 2 x 2 merge
        assert ids.count(start) == ids.count(end) == len(example.image_grid_thw) and image_tokens > 0
        assert ids.count(trained.config.image_token_index) == image_tokens
    recomputed = evaluator.run(trained.train(), 3)
    for key in ("eval_loss/caption", "eval_loss/vqa", "eval_loss"):
        assert recomputed[key] == pytest.approx(record[key], rel=1e-5), key


def test_the_export_has_sarashina2_visions_released_layout(twin_run):
    """Field by field what SGLang's sarashina2_vision.py and llama.cpp's conversion/sarashina2.py read."""
    from safetensors import safe_open

    run, _ = twin_run
    config = json.loads((run / "export" / "config.json").read_text())
    assert (config["architectures"], config["model_type"]) == (["Sarashina2VisionForCausalLM"], "sarashina2_vision")
    assert config["text_config"]["model_type"] == "llama" and config["vision_config"]["model_type"] == "qwen2_vl"
    assert config["vision_config"]["hidden_size"] == config["text_config"]["hidden_size"]  # the merger's output
    tokenizer_files = {p.name for p in (run / "export").iterdir()}
    assert {"tokenizer.model", "tokenizer_config.json", "preprocessor_config.json", "chat_template.jinja"} <= tokenizer_files
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run / "export")
    assert tokenizer.convert_ids_to_tokens(
        [config["image_token_index"], config["start_image_token_index"], config["end_image_token_index"]]) == [
        "<image>", "<|vision_start|>", "<|vision_end|>"]
    with safe_open(str(run / "export" / "model.safetensors"), "pt") as weights:
        names = set(weights.keys())
    prefixes = ("visual.patch_embed.", "visual.blocks.", "visual.merger.ln_q.", "visual.merger.mlp.0.",
                "visual.merger.mlp.2.", "norm.", "llm.model.", "llm.lm_head.")
    assert all(n.startswith(prefixes) for n in names) and all(any(n.startswith(p) for n in names) for p in prefixes)
    block = {n.split(".", 3)[3] for n in names if n.startswith("visual.blocks.0.")}
    assert block == {f"{m}.{p}" for m in ("norm1", "norm2", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
                     for p in ("weight", "bias")}


def test_llama_cpps_converter_writes_the_text_gguf_and_the_mmproj(twin_run, tmp_path_factory):
    """convert_hf_to_gguf.py (from the llama-cpp-python sdist on PyPI) takes the export as it is: the text model
    (vocabulary from tokenizer.model) and the vision projector, every tensor with its shape."""
    from safetensors.torch import load_file

    from tests.interop.llama_cpp import convert, converter, read_gguf

    run, _ = twin_run
    root = converter(tmp_path_factory.getbasetemp() / "llama-cpp")
    out = tmp_path_factory.mktemp("gguf")
    text, mmproj = convert(root, run / "export", out / "text.gguf"), convert(root, run / "export", out / "mmproj.gguf",
                                                                               mmproj=True)
    assert text.returncode == 0 and mmproj.returncode == 0, text.stderr[-3000:] + mmproj.stderr[-3000:]
    weights = load_file(run / "export" / "model.safetensors")
    text_gguf = read_gguf(root, out / "text.gguf")
    shapes = {t.name: [int(d) for d in reversed(t.shape)] for t in text_gguf.tensors}  # GGUF lists dims innermost first
    assert shapes["token_embd.weight"] == list(weights["llm.model.embed_tokens.weight"].shape)
    assert shapes["output.weight"] == list(weights["llm.lm_head.weight"].shape)
    assert len(shapes) == sum(n.startswith("llm.") for n in weights)
    vocab = text_gguf.fields["tokenizer.ggml.tokens"]
    assert len(vocab.data) == weights["llm.model.embed_tokens.weight"].shape[0]
    vision = {t.name for t in read_gguf(root, out / "mmproj.gguf").tensors}
    assert {"mm.0.weight", "mm.2.weight", "v.patch_embd.weight", "v.post_ln.weight"} <= vision
    assert sum(n.startswith("v.blk.") for n in vision) == 3 * 16  # 3 blocks, q/k/v split from qkv


def test_kakehashi_chats_with_the_export(twin_run, tmp_path):
    from PIL import Image

    from tests.conftest import kakehashi

    run, _ = twin_run
    Image.new("RGB", (64, 48), "red").save(tmp_path / "red.png")
    done = kakehashi("chat", run / "export", "--image", tmp_path / "red.png", "--prompt", "この図形は何色ですか？",
                     "--max-new-tokens", "4")
    assert done.returncode == 0 and done.stdout.strip(), done.stderr[-2000:]
