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

    assert same(projector, vision, "llm.") and changed(projector, vision, "vision.merger.")
    # stage 2 unfreezes the last of 3 blocks only: blocks 0 and 1 and the patch embed stay bit-identical
    assert same(projector, vision, "vision.blocks.0.") and same(projector, vision, "vision.blocks.1.")
    assert same(projector, vision, "vision.patch_embed.") and changed(projector, vision, "vision.blocks.2.")
    assert same(vision, instruct, "vision.patch_embed.") and same(vision, instruct, "vision.blocks.")
    assert changed(vision, instruct, "llm.") and changed(vision, instruct, "projector_norm.")


def test_export_loads_without_remote_code_and_matches_the_trained_weights(twin_run):
    from PIL import Image

    from train.chat import answer, load_export
    from train.models.qwen2vl import QWEN2VL, Qwen2VLVisionLMConfig
    from train.recipe import load_recipe

    run, _ = twin_run
    assert json.loads((run / "export" / "config.json").read_text())["model_type"] == "kakehashi_qwen2vl"
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
    assert 0 <= report["exact_match"] <= 1 and 0 <= report["rouge_l"] <= 1


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
    assert 0 <= record["eval_rouge_l"] <= 1
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
