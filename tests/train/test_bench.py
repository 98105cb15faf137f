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


def test_bench_train_refuses_an_unknown_stage_in_one_line():
    done = kakehashi("bench", "train", TINY_RECIPE, "--stage", "7", "--packing", "on")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == "kakehashi: error: --stage 7: the recipe's stages are 1..2 (align, instruct)"


def test_bench_train_refuses_a_missing_recipe_before_starting_runs(tmp_path):
    done = kakehashi("bench", "train", tmp_path / "missing.yaml")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "cannot read recipe" in done.stderr and "bench run with" not in done.stderr
