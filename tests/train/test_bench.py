import argparse
import json
import subprocess

import pytest

from tests.conftest import REPO, TINY_RECIPE, kakehashi
from tests.train.conftest import short_recipe
from train.errors import TokenizerUnavailable, UsageError
from train.models import family_for, model_config
from train.models.tokenizers import load_tokenizer
from train.recipe import load_recipe


@pytest.mark.slow
def test_bench_train_reports_packed_against_unpacked_on_the_same_stage():
    done = kakehashi("bench", "train", TINY_RECIPE, "--stage", "instruct", "--steps", "3", "--warmup", "1",
                     "--synthetic", "80", "--peak-tflops", "0.5", "--json", env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)  # stdout holds the one JSON document
    packed, unpacked = report["packed"], report["unpacked"]
    assert packed["packing"] is True and unpacked["packing"] is False
    assert packed["stage"] == unpacked["stage"] == "instruct" and packed["steps"] == unpacked["steps"] == 3
    assert packed["nonpad_fraction"] >= 0.95 > unpacked["nonpad_fraction"]
    for run in (packed, unpacked):
        assert run["tokens_per_s"] > 0 and run["samples_per_s"] > 0 and run["peak_mem_bytes"] > 2**20
        assert run["mfu"] == pytest.approx(run["tflops_per_device"] / 0.5) and run["mfu"] > 0  # achieved / peak
    assert report["tokens_per_s_ratio"] == round(packed["tokens_per_s"] / unpacked["tokens_per_s"], 2)


@pytest.mark.slow
def test_bench_train_baseline_trainer_reports_ours_over_the_trainer_per_round_and_of_medians():
    """Runs and reports the fields; no timing asserted (the machine's load decides those)."""
    done = kakehashi("bench", "train", TINY_RECIPE, "--stage", "instruct", "--baseline", "trainer", "--steps", "2",
                     "--warmup", "1", "--synthetic", "80", "--json", env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    baseline = report["baseline"]
    assert baseline["name"] == "transformers.Trainer" and baseline["rounds"] == 1
    for mode, packing in (("unpacked", False), ("packed", True)):
        ours, trainer = report[mode], baseline[mode]
        assert ours["runner"] == "ours" and trainer["runner"] == "trainer"
        assert ours["packing"] is trainer["packing"] is packing and ours["steps"] == trainer["steps"] == 2
        assert trainer["tokens_per_s"] > 0 and trainer["samples_per_s"] > 0 and trainer["mfu"] is None
        # the same batches: the same share of real tokens
        assert trainer["nonpad_fraction"] == pytest.approx(ours["nonpad_fraction"])
    ratios = baseline["ours_over_baseline"]
    assert set(ratios) == {"unpacked", "packed", "packed_vs_trainer_unpacked"}
    unpacked = ratios["unpacked"]
    assert unpacked["tokens_per_s_ratio"] == round(report["unpacked"]["tokens_per_s"]
                                                   / baseline["unpacked"]["tokens_per_s"], 2)
    assert len(unpacked["round_ratios"]) == len(unpacked["round_samples_ratios"]) == 1
    assert unpacked["median_round_ratio"] == unpacked["round_ratios"][0]
    assert ratios["packed_vs_trainer_unpacked"]["round_ratios"] == [
        round(report["packed"]["tokens_per_s"] / baseline["unpacked"]["tokens_per_s"], 2)]


@pytest.mark.slow
def test_bench_train_on_a_preference_stage_runs_trls_dpo_trainer_on_the_same_pairs():
    """The MPO stage against TRL's DPOTrainer (its MPO losses), unpacked: the same pairs (real-token share, pairs
    per step); no timing asserted."""
    done = kakehashi("bench", "train", REPO / "recipes" / "tiny" / "asagi-mpo.yaml", "--stage", "prefer",
                     "--baseline", "trainer", "--steps", "2", "--warmup", "1", "--synthetic", "40", "--json",
                     env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    baseline = report["baseline"]
    assert baseline["name"] == "trl.DPOTrainer" and set(baseline["ours_over_baseline"]) == {"unpacked"}
    trainer = baseline["unpacked"]
    assert report["packing"] is trainer["packing"] is False and report["steps"] == trainer["steps"] == 2
    assert trainer["nonpad_fraction"] == pytest.approx(report["nonpad_fraction"])
    # pairs per second: 16 pairs a step in both
    assert trainer["samples_per_s"] * trainer["seconds"] == pytest.approx(report["samples_per_s"] * report["seconds"])


@pytest.mark.parametrize("stage", ["7", "²"])  # "²" passes str.isdigit() but not int()
def test_bench_train_refuses_an_unknown_stage_in_one_line(stage):
    done = kakehashi("bench", "train", TINY_RECIPE, "--stage", stage, "--packing", "on")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == f"kakehashi: error: --stage {stage}: the recipe's stages are 1..2 (align, instruct)"


def test_bench_train_refuses_a_missing_recipe_before_starting_runs(tmp_path):
    done = kakehashi("bench", "train", tmp_path / "missing.yaml")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "cannot read recipe" in done.stderr and "bench run with" not in done.stderr


ASAGI_2B = REPO / "recipes" / "asagi-2b.yaml"
SARASHINA_8B = REPO / "recipes" / "sarashina2-vision-8b.yaml"


def test_a_tokenizer_not_on_this_machine_has_a_stand_in_of_the_llms_vocabulary(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # read once, when huggingface_hub is imported: without this the hub is still asked (and, with no network, retried
    # with back-off for ~45 s) before the stand-in is made
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    recipe = load_recipe(ASAGI_2B, check_data=False)
    tokenizer = load_tokenizer(recipe.model, tmp_path, stand_in=True)
    assert tokenizer.kakehashi_stand_in and len(tokenizer) == 99_584  # recipes/configs/llm-jp-3-1.8b.json
    config = model_config(recipe.model, tokenizer)
    assert config.text_config.vocab_size == 99_584 and config.image_token_index == tokenizer.convert_tokens_to_ids(
        "<image>")
    assert tokenizer.decode(tokenizer("赤い丸<image>", add_special_tokens=False).input_ids) == "赤い丸<image>"
    sarashina = load_recipe(SARASHINA_8B, check_data=False)  # image start/end tokens among the ids, not added after
    tokenizer = load_tokenizer(sarashina.model, tmp_path, stand_in=True)
    assert len(tokenizer) == model_config(sarashina.model, tokenizer).text_config.vocab_size == 102_400
    with pytest.raises(TokenizerUnavailable, match=r"^model.tokenizer: cannot load llm-jp/llm-jp-3-1.8b-instruct"):
        load_tokenizer(recipe.model, tmp_path)  # anything but a benchmark needs the real one


@pytest.mark.parametrize("recipe_path", [ASAGI_2B, SARASHINA_8B])
def test_reduce_depth_keeps_the_widths_and_cuts_the_layers(recipe_path):
    recipe = load_recipe(recipe_path, check_data=False)
    family = family_for(recipe.model)
    config = family.config(recipe.model, 1000, {"image": 999})
    widths = (config.text_config.hidden_size, config.vision_config.hidden_size)
    family.reduce_depth(config, llm_layers=2, vision_layers=3)
    assert config.text_config.num_hidden_layers == 2 and getattr(config.vision_config, family.vision_depth_field) == 3
    assert (config.text_config.hidden_size, config.vision_config.hidden_size) == widths
    with pytest.raises(UsageError, match="1..2"):
        family.reduce_depth(config, llm_layers=5)


def test_bench_train_passes_depth_to_its_child_runs_and_says_stand_in(monkeypatch, capsys):
    from train import bench

    argvs = []

    def child(argv, **kwargs):
        argvs.append(argv)
        run = {"tokens_per_s": 1.0, "samples_per_s": 1.0, "tokenizer": "stand-in"}
        return subprocess.CompletedProcess(argv, 0, stdout=json.dumps(run), stderr="")

    monkeypatch.setattr(bench.subprocess, "run", child)
    args = argparse.Namespace(recipe=str(ASAGI_2B), stage="2", packing="both", steps=1, warmup=0, rounds=1,
                              synthetic=4, peak_tflops=None, overrides=["stages.1.micro_batch_size=2"],
                              llm_layers=2, vision_layers=1, json=True, baseline=None, tensor_memory=False,
                              runner="ours")
    assert bench.cmd_bench_train(args) == 0
    assert len(argvs) == 2
    for argv in argvs:
        assert argv[argv.index("--llm-layers") + 1] == "2" and argv[argv.index("--vision-layers") + 1] == "1"
        assert "--set=stages.1.micro_batch_size=2" in argv
    assert json.loads(capsys.readouterr().out)["tokenizer"] == "stand-in"


def test_bench_train_help_names_the_depth_options():
    done = kakehashi("bench", "train", "--help")
    assert done.returncode == 0 and "--llm-layers" in done.stdout and "--vision-layers" in done.stdout


def test_train_with_a_tokenizer_not_on_this_machine_is_one_line(tmp_path):
    recipe = short_recipe(tmp_path, samples=8)
    done = kakehashi("train", recipe, "--output", tmp_path / "run", "--set", "model.tokenizer=nobody/not-here",
                     env={"HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith("kakehashi: error: model.tokenizer: cannot load "
                                                           "nobody/not-here (")


@pytest.mark.slow
def test_bench_train_at_reduced_depth_with_a_stand_in_tokenizer():
    done = kakehashi("bench", "train", TINY_RECIPE, "--stage", "2", "--steps", "1", "--warmup", "0", "--synthetic",
                     "8", "--packing", "on", "--llm-layers", "1", "--vision-layers", "1", "--json",
                     "--set", "model.tokenizer=nobody/not-here", "--set", "model.llm.config.vocab_size=700",
                     env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    run = json.loads(done.stdout)
    assert (run["tokenizer"], run["vocab_size"], run["llm_layers"], run["vision_layers"]) == ("stand-in", 700, 1, 1)
    assert "stand-in tokenizer" in done.stderr


def test_bench_train_refuses_a_depth_of_zero_before_starting_runs():
    done = kakehashi("bench", "train", ASAGI_2B, "--llm-layers", "0")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines()[-1].endswith("--llm-layers and --vision-layers must be >= 1, --warmup >= 0")


@pytest.mark.slow
def test_bench_train_builds_a_zero3_stage_as_kakehashi_train_does(tmp_path):
    # one factory (train/build.py build_stage): the bench's model is partitioned as it is built, in the stage's
    # dtype, exactly as the run's, so its memory figures are what a run of the stage holds
    recipe = short_recipe(tmp_path, zero_stage=3, steps=(1, 1))
    built_line = "stage instruct: model built in torch.float32, partitioned over 1 ranks (ZeRO-3)"
    bench = kakehashi("bench", "train", recipe, "--stage", "instruct", "--packing", "on", "--runner", "ours",
                      "--steps", "1", "--warmup", "1", "--synthetic", "40", "--json")
    assert bench.returncode == 0, bench.stderr[-2000:]
    assert json.loads(bench.stdout)["zero_stage"] == 3 and built_line in bench.stderr
    train = kakehashi("train", recipe, "--output", tmp_path / "run", "--no-export")
    assert train.returncode == 0, train.stderr[-2000:]
    assert built_line in train.stderr
