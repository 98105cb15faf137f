import json

import pytest

from tests.conftest import TINY_RECIPE, kakehashi


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


def test_bench_train_refuses_an_unknown_stage_in_one_line():
    done = kakehashi("bench", "train", TINY_RECIPE, "--stage", "7", "--packing", "on")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == "kakehashi: error: --stage 7: the recipe's stages are 1..2 (align, instruct)"


def test_bench_train_refuses_a_missing_recipe_before_starting_runs(tmp_path):
    done = kakehashi("bench", "train", tmp_path / "missing.yaml")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "cannot read recipe" in done.stderr and "bench run with" not in done.stderr
