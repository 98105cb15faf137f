"""LoRA / DoRA through peft: adapters only train, merge exactly, and the export stays a plain LLaVA."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, kakehashi
from tests.train.conftest import make_stage, random_batch, short_recipe, torchrun, with_eval
from train.lora import inject_adapters, merged_state_dict
from train.models.llava import LLAVA, LlavaForTraining
from train.recipe import load_recipe
from train.stages import plan_stage

LORA_RECIPE = REPO / "recipes" / "tiny" / "asagi-lora.yaml"


@pytest.mark.slow
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_merged_weights_compute_what_the_adapters_did(tiny_model, dora):
    recipe = load_recipe(LORA_RECIPE, check_files=False)
    config = tiny_model.config
    stage = make_stage(train=["projector", "llm"], lr={"projector": 1e-3, "llm": 1e-3},
                       lora={"llm": {"rank": 4, "alpha": 8, "dora": dora}})
    table = plan_stage(LLAVA, tiny_model, stage).table
    assert 0 < table["llm"]["trainable"] < 0.05 * (table["llm"]["trainable"] + table["llm"]["frozen"])
    assert all(("lora_" in n) == p.requires_grad for n, p in tiny_model.named_parameters() if "language_model" in n)
    with torch.no_grad():  # adapters start as a no-op (B = 0); make them matter
        for name, param in tiny_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    batch = random_batch(torch.Generator().manual_seed(0), 2, 40, 20)
    inputs = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    with torch.no_grad():
        with_adapters = LlavaForTraining(tiny_model.eval()).logits(*inputs)
        merged, adapters = merged_state_dict(LLAVA, tiny_model.state_dict(),
                                             lambda: LLAVA.build(recipe.model, config, load_weights=False), stage)
        plain = LLAVA.build(recipe.model, config, load_weights=False)
        plain.load_state_dict(merged)  # strict: no adapter keys left
        merged_logits = LlavaForTraining(plain.eval()).logits(*inputs)
    assert adapters and all("lora_" in k for k in adapters)
    assert torch.allclose(merged_logits, with_adapters, atol=1e-5), (merged_logits - with_adapters).abs().max()


def test_lora_must_be_on_a_trained_component(tiny_recipe_text):
    from train.recipe import RecipeError, parse_recipe

    text = tiny_recipe_text.replace("    train: [projector]\n", "    train: [projector]\n    lora: {llm: {rank: 4}}\n", 1)
    with pytest.raises(RecipeError) as caught:
        parse_recipe(text, check_files=False)
    assert any("lora.llm is set but the stage freezes llm" in p for p in caught.value.problems)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("lora")
    result = kakehashi("train", LORA_RECIPE, "--output", workdir / "run", cwd=workdir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return workdir / "run"


def test_tiny_lora_recipe_trains_few_llm_parameters_and_exports_plain_llava(lora_run):
    summary = json.loads((lora_run / "stages" / "02-lora" / "summary.json").read_text())
    llm_total = summary["trainable"]["llm"] + summary["frozen"]["llm"]
    assert 0 < summary["trainable"]["llm"] < 0.05 * llm_total
    adapters = load_file(lora_run / "stages" / "02-lora" / "adapters" / "adapter_model.safetensors")
    assert adapters and all("lora_A" in k or "lora_B" in k for k in adapters)
    assert (lora_run / "stages" / "02-lora" / "adapters" / "llm" / "adapter_config.json").is_file()
    assert not any("lora_" in k or "base_layer" in k for k in load_file(lora_run / "export" / "model.safetensors"))
    from transformers import LlavaForConditionalGeneration

    exported = LlavaForConditionalGeneration.from_pretrained(lora_run / "export").state_dict()
    before = load_file(lora_run / "stages" / "01-captions" / "model.safetensors")
    embed = "model.language_model.embed_tokens.weight"
    assert torch.equal(exported[embed], before[embed])  # not a LoRA target: frozen, bit-identical
    q_proj = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(exported[q_proj], before[q_proj])  # the merged adapter moved it


def test_merged_lora_export_answers_the_colour_question(lora_run):
    from train.shapes_eval import shapes_accuracy

    report = shapes_accuracy(lora_run / "export", samples=100, seed=77)
    assert report["colour_accuracy"] >= 0.8, report


@pytest.fixture(scope="module")
def lora_zero3_run(tmp_path_factory):
    """The tiny LoRA recipe, shortened, on 2 ranks under ZeRO-3, with periodic eval in the LoRA stage (5 eval
    samples per source over 2 ranks in micro-batches of 2: one rank's share runs out and pads a forward)."""
    tmp = tmp_path_factory.mktemp("lora-zero3")
    recipe = with_eval(short_recipe(tmp, zero_stage=3, steps=(2, 4), samples=100, source=LORA_RECIPE),
                       eval_samples=5, micro_batch_size=2)
    result = torchrun(recipe, tmp / "run")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp / "run"


def training_model_with_adapters(run):
    """The stage-2 model as it trained: stage-1 base weights under the LoRA targets, its adapters, the rest as saved."""
    from transformers import LlavaConfig

    recipe = load_recipe(run / "recipe.yaml", check_files=False)
    stage = recipe.stages[1]
    model = LLAVA.build(recipe.model, LlavaConfig.from_pretrained(run / "stages" / "02-lora"), load_weights=False)
    inject_adapters(LLAVA, model, stage)
    before = load_file(run / "stages" / "01-captions" / "model.safetensors")
    after = load_file(run / "stages" / "02-lora" / "model.safetensors")
    adapters = load_file(run / "stages" / "02-lora" / "adapters" / "adapter_model.safetensors")
    state = {}
    for key in model.state_dict():
        if "lora_" in key:
            state[key] = adapters[key]
        elif ".base_layer." in key:  # frozen under the adapter: must still be the stage-1 weight
            state[key] = before[key.replace(".base_layer.", ".")]
        else:
            state[key] = after[key]
    model.load_state_dict(state)
    return model.eval()


def test_lora_under_zero3_on_two_ranks_exports_what_it_trained(lora_zero3_run):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from train.periodic_eval import build_periodic_eval

    run = lora_zero3_run
    exported = LlavaForConditionalGeneration.from_pretrained(run / "export").eval()
    weights = exported.state_dict()
    assert not any("lora_" in k or "base_layer" in k for k in weights)
    before = load_file(run / "stages" / "01-captions" / "model.safetensors")
    assert torch.equal(weights["model.language_model.embed_tokens.weight"], before["model.language_model.embed_tokens.weight"])
    q_proj = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(weights[q_proj], before[q_proj])  # the merged adapter moved it

    processor = AutoProcessor.from_pretrained(run / "export")
    recipe = load_recipe(run / "recipe.yaml", check_files=False)
    sample = build_periodic_eval(recipe, 1, processor, rank=0, world_size=1).eval_set.vqa[0]
    content = [{"type": "image"}, {"type": "text", "text": sample.question}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(images=sample.images, text=text + sample.reference, return_tensors="pt")
    with torch.no_grad():
        export_logits = exported(**inputs).logits
        trained_logits = LlavaForTraining(training_model_with_adapters(run)).logits(
            inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])
    assert torch.allclose(export_logits, trained_logits, atol=1e-5), (export_logits - trained_logits).abs().max()


def test_periodic_eval_on_two_zero3_ranks_equals_one_process_on_the_final_weights(lora_zero3_run):
    """Split over 2 ranks (one padding a forward), all-reduced: the same losses as one process on all samples."""
    import json

    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from train.periodic_eval import build_periodic_eval

    run = lora_zero3_run
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r.get("kind") == "eval"]
    assert [(r["stage"], r["step"]) for r in evals] == [("lora", 2), ("lora", 4)]
    assert all(r["eval_vqa_samples"] == 2 and 0 <= r["eval_rouge_l_chars_f1"] <= 1 for r in evals)
    recipe = load_recipe(run / "recipe.yaml", check_files=False)
    evaluator = build_periodic_eval(recipe, 1, AutoProcessor.from_pretrained(run / "export"), rank=0, world_size=1)
    assert [len(v) for v in evaluator.eval_set.sources.values()] == [5, 5]
    exported = LlavaForConditionalGeneration.from_pretrained(run / "export")
    recomputed = evaluator.run(LlavaForTraining(exported), 4)
    for key in ("eval_loss/caption", "eval_loss/vqa", "eval_loss"):
        assert recomputed[key] == pytest.approx(evals[-1][key], rel=1e-5), key


def test_periodic_eval_leaves_two_rank_zero3_training_unchanged(lora_zero3_run, tmp_path):
    import yaml

    from tests.train.conftest import losses

    recipe = yaml.safe_load((lora_zero3_run / "recipe.yaml").read_text())
    recipe["stages"][1].update(eval_every=0, eval_data=[])
    path = tmp_path / "no-eval.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True))
    result = torchrun(path, tmp_path / "run", "--no-export")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    without = losses(tmp_path / "run")
    assert len(without) == 6 and without == losses(lora_zero3_run)
