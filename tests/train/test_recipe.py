import json

import pytest

from tests.conftest import REPO, TINY_RECIPE, kakehashi
from train.recipe import RecipeError, dump_recipe, load_recipe, parse_recipe


def problems_of(text, overrides=(), check_files=True):
    with pytest.raises(RecipeError) as caught:
        parse_recipe(text, "bad.yaml", overrides, check_files=check_files)
    return caught.value.problems


def test_tiny_recipe_is_valid():
    recipe = load_recipe(TINY_RECIPE)
    assert [s.name for s in recipe.stages] == ["align", "instruct"]
    assert recipe.stages[0].train == ["projector"] and recipe.stages[1].train == ["projector", "llm"]
    assert recipe.stages[1].lr.llm == pytest.approx(1e-3)


def test_yaml_syntax_error_names_the_line(tiny_recipe_text):
    broken = tiny_recipe_text.replace("seed: 0\n\nmodel:", "seed: [0\n\nmodel:", 1)
    (problem,) = problems_of(broken)
    assert problem.startswith("YAML syntax error at line ")


@pytest.mark.parametrize(
    "old, new, expected",
    [
        ("seed: 0\n", "seed: 0\nlearning_rate: 1\n", "learning_rate: unknown key (line 6)"),
        ("    steps: 60\n", "    steps: sixty\n", "stages.0.steps: Input should be a valid integer"),
        ("lr: {projector: 2.0e-3}", "lr: {projector: -2.0e-3}", "stages.0.lr.projector: Input should be greater than 0"),
        ("train: [projector]\n", "train: []\n", "stages.0.train: stage trains nothing"),
        ("  llm:\n    config:\n", "  llm:\n    path: ./no/such/llm\n    config:\n", "model.llm.path: no such file or directory: ./no/such/llm"),
        ("lr: {projector: 2.0e-3}", "lr: {projector: 2.0e-3, llm: 1.0e-4}", "stages.0: lr.llm is set but the stage freezes llm"),
        ("  projector:\n", "  projector:\n    hidden_size: 0\n", "model.projector.hidden_size: Input should be greater than 0"),
        ("  projector:\n", "  projector:\n    hidden_size: true\n", "model.projector.hidden_size: Input should be a valid integer"),
        ("  projector:\n", "  projector:\n    hidden_size: 256.0\n", "model.projector.hidden_size: Input should be a valid integer"),
    ],
    ids=["unknown-key", "wrong-type", "negative-lr", "trains-nothing", "missing-file", "lr-for-frozen",
         "projector-width-zero", "projector-width-bool", "projector-width-float"],
)
def test_each_bad_case_names_its_field(tiny_recipe_text, old, new, expected):
    assert old in tiny_recipe_text
    problems = problems_of(tiny_recipe_text.replace(old, new, 1))
    assert any(p.startswith(expected) for p in problems), problems


def test_no_stages(tiny_recipe_text):
    head = tiny_recipe_text.split("stages:")[0]
    problems = problems_of(head + "stages: []\n")
    assert any(p.startswith("stages: List should have at least 1 item") for p in problems), problems


def test_every_problem_is_listed_at_once(tiny_recipe_text):
    text = tiny_recipe_text.replace("seed: 0\n", "seed: zero\n", 1).replace("train: [projector]", "train: []")
    problems = problems_of(text, overrides=["stages.1.steps=-5"])
    assert {p.split(":")[0] for p in problems} >= {"seed", "stages.0.train", "stages.1.steps"}


def test_missing_shards_are_reported_unless_synthesized(tiny_recipe_text):
    without_synth = tiny_recipe_text.replace("synthesize:", "unused_synth:").replace("unused_synth:", "# synth:")
    without_synth = without_synth.replace("  out: data/tiny-shapes\n  samples: 3000\n  seed: 0\n  image_size: 64\n", "")
    problems = problems_of(without_synth.replace("data/tiny-shapes", "/nonexistent/shapes"))
    assert any(p.startswith("stages.0.data.0.shards: no shard matches") for p in problems), problems


def test_overrides_reach_any_field(tiny_recipe_text):
    recipe = parse_recipe(tiny_recipe_text, overrides=["stages.1.save_every=10", "model.llm.config.num_hidden_layers=3",
                                                       "stages.0.precision=bf16"])
    assert recipe.stages[1].save_every == 10
    assert recipe.model.llm.config["num_hidden_layers"] == 3
    assert recipe.stages[0].precision == "bf16"
    # "²" is a digit to str.isdigit() but not a number to int()
    problems = problems_of(tiny_recipe_text, overrides=["stages.7.steps=1", "nonsense", "stages.².steps=1"])
    assert problems[0].startswith("--set stages.7.steps: stages.7 is not an index")
    assert problems[1].startswith("--set 'nonsense': expected dotted.path=value")
    assert problems[2].startswith("--set stages.².steps: stages.² is not an index")


def test_trust_remote_code_needs_a_pinned_revision(tiny_recipe_text):
    text = tiny_recipe_text.replace("  llm:\n    config:\n", "  llm:\n    trust_remote_code: true\n    config:\n", 1)
    problems = problems_of(text)
    assert any(p.startswith("model.llm: trust_remote_code needs `revision` pinned") for p in problems), problems


def test_resolved_recipe_round_trips(tiny_recipe_text):
    recipe = parse_recipe(tiny_recipe_text, overrides=["stages.0.steps=7"])
    assert parse_recipe(dump_recipe(recipe)) == recipe


# ---------------------------------------------------------------------------------------------- the command


def test_recipe_check_json_counts_parameters_per_stage():
    result = kakehashi("recipe", "check", TINY_RECIPE, "--json", "--set", "stages.1.save_every=10")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    vision, llm_hidden = 64, 128
    # mlp2x_gelu by hand: Linear(64 -> 128) + Linear(128 -> 128), with biases
    assert report["params"]["projector"] == vision * llm_hidden + llm_hidden + llm_hidden * llm_hidden + llm_hidden
    assert report["params"]["vision_encoder"] > 0 and report["params"]["llm"] > report["params"]["projector"]
    align, instruct = report["stages"]
    assert align["name"] == "align" and align["trainable"] == {"vision_encoder": 0, "projector": report["params"]["projector"], "llm": 0}
    assert instruct["trainable"]["llm"] == report["params"]["llm"] and instruct["trainable"]["vision_encoder"] == 0


def test_recipe_check_text_report():
    result = kakehashi("recipe", "check", TINY_RECIPE)
    assert result.returncode == 0, result.stderr
    assert "recipe tiny-asagi-2stage: OK" in result.stdout and "stage 2 instruct" in result.stdout


def test_bad_recipe_exits_2_listing_every_problem_without_traceback(tmp_path, tiny_recipe_text):
    bad = tmp_path / "bad.yaml"
    bad.write_text(tiny_recipe_text.replace("train: [projector]", "train: []").replace("seed: 0", "seed: x", 1))
    for command in (("recipe", "check", bad), ("train", bad, "--output", tmp_path / "run")):
        result = kakehashi(*command, "--set", "stages.0.lr.projector=-1")
        assert result.returncode == 2
        assert "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert lines[0] == f"kakehashi: error: {bad}: 3 problem(s)"
        assert {line.split(":")[0].strip() for line in lines[1:]} == {"seed", "stages.0.train", "stages.0.lr.projector"}
    assert not (tmp_path / "run").exists()


def test_missing_recipe_file_is_one_line():
    result = kakehashi("recipe", "check", REPO / "no-such-recipe.yaml")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cannot read recipe" in result.stderr


def test_watchdog_and_collective_timeout_are_recipe_fields_checked_up_front(tmp_path, tiny_recipe_text):
    recipe = parse_recipe(tiny_recipe_text, overrides=["stages.1.watchdog_s=0", "collective_timeout_s=120"])
    assert (recipe.stages[0].watchdog_s, recipe.stages[1].watchdog_s, recipe.collective_timeout_s) == (1800, 0, 120)
    problems = problems_of(tiny_recipe_text, overrides=["stages.0.watchdog_s=-1", "collective_timeout_s=0"])
    assert any(p.startswith("stages.0.watchdog_s: Input should be greater than or equal to 0") for p in problems)
    assert any(p.startswith("collective_timeout_s: Input should be greater than 0") for p in problems)
    result = kakehashi("recipe", "check", TINY_RECIPE, "--set", "stages.1.watchdog_s=soon")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "stages.1.watchdog_s: Input should be a valid integer" in result.stderr


MPO_RECIPE = REPO / "recipes" / "tiny" / "asagi-mpo.yaml"


@pytest.mark.parametrize("overrides, expected", [
    (["stages.1.data.0.task=preference"], "stages.1: data.0: task preference needs objective dpo or mpo"),
    (["stages.2.data.0.task=vqa"], "stages.2: data.0: objective mpo trains on pairs; task vqa is not "
                                   "preference"),
    (["stages.2.packing=true"], "stages.2: packing: a mpo stage runs one pair per row"),
    (["stages.2.preference.beta=0"], "stages.2.preference.beta: Input should be greater than 0"),
    (["stages.2.preference.loss=hinge", "stages.2.preference.label_smoothing=0.1"],
     "stages.2: preference.label_smoothing applies to loss sigmoid, not hinge"),
    (["stages.2.preference.reference=adapters"], "stages.2: preference.reference: adapters needs every "
                                                 "trained component to train through LoRA; projector, llm"),
    (["stages.2.objective=dpo", "stages.2.preference.mpo.quality=0.5"],
     "stages.2: preference.mpo is set but objective is dpo"),
    (["stages.1.preference.beta=0.2"], "stages.1: preference is set but objective is sft"),
    (["stages.2.objective=ppo"], "stages.2.objective: Input should be 'sft', 'dpo' or 'mpo'"),
])
def test_a_preference_stage_is_checked_field_by_field(overrides, expected):
    problems = problems_of(MPO_RECIPE.read_text(), overrides, check_files=False)
    assert any(p.startswith(expected) for p in problems), problems


def test_a_preference_stage_gets_trls_defaults_and_round_trips():
    recipe = load_recipe(MPO_RECIPE, ["stages.2.preference=null"], check_files=False)
    spec = recipe.stages[2].preference
    assert (spec.beta, spec.loss, spec.reference) == (0.1, "sigmoid", "copy")
    assert (spec.mpo.preference, spec.mpo.quality, spec.mpo.generation) == (0.8, 0.2, 1.0)  # InternVL's MPO
    assert parse_recipe(dump_recipe(recipe), check_files=False) == recipe
