"""The memory plan (train/memory.py): the estimate's arithmetic per ZeRO stage on hand-computed cases, `recipe check
--gpus/--gpu-memory` (text, --json, bad values), and the estimate against `bench train`'s measured peak."""

import json
import re
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import REPO, TINY_RECIPE, kakehashi
from train import memory
from train.memory import PREFETCH_BUCKET, REDUCE_BUCKET, Shapes, TensorPeak, compare, estimate, parse_size

SHAPES = Shapes(llm_layers=2, llm_hidden=8, llm_intermediate=16, vocab=10, vision_layers=3, vision_hidden=4,
                vision_intermediate=8, vision_tokens_per_image=5, image_tokens_per_image=2)
PARAMS = {"vision_encoder": 300, "projector": 100, "llm": 600}   # P = 1000
TRAINED = {"vision_encoder": 0, "projector": 100, "llm": 600}    # T = 700


def stage(**fields):
    defaults = dict(name="s", precision="bf16", zero_stage=2, micro_batch_size=2, global_batch_size=8, max_length=4,
                    max_grad_norm=1.0, gradient_checkpointing=False, vision_encoder_last_blocks=None,
                    objective="sft", preference=None)
    return SimpleNamespace(**{**defaults, **fields})


# hand-computed, 4 GPUs, bf16 (b = 2), P = 1000, T = 700:
# weights P*b (/4 at ZeRO-3); gradients T*b at ZeRO-0/1, fp32 partition 4T/4 from ZeRO-2; optimizer 12T (/4 from
# ZeRO-1); buffers: the reduce bucket in bf16 from ZeRO-1, ZeRO-3 adds its prefetch bucket and one LLM layer
# (4*8*8 + 3*8*16 = 640 values)
@pytest.mark.parametrize("zero, weights, gradients, optimizer, buffers", [
    (0, 2000, 1400, 8400, 0),
    (1, 2000, 1400, 2100, REDUCE_BUCKET * 2),
    (2, 2000, 700, 2100, REDUCE_BUCKET * 2),
    (3, 500, 700, 2100, REDUCE_BUCKET * 2 + (PREFETCH_BUCKET + 640) * 2),
])
def test_states_by_zero_stage(zero, weights, gradients, optimizer, buffers):
    got = estimate(SHAPES, PARAMS, TRAINED, stage(zero_stage=zero), gpus=4)
    assert (got.weights, got.gradients, got.optimizer, got.buffers) == (weights, gradients, optimizer, buffers)
    assert got.buffers_alongside  # the LLM trains: the bucket comes at the start of the backward pass
    assert got.total == weights + gradients + optimizer + buffers + got.activations + got.logits


@pytest.mark.parametrize("reference, copy_bytes", [("copy", 500), ("adapters", 0)])
def test_a_preference_stage_holds_its_reference_copy_and_two_rows_per_pair(reference, copy_bytes):
    sft = estimate(SHAPES, PARAMS, TRAINED, stage(zero_stage=3), gpus=4)
    spec = SimpleNamespace(reference=reference)
    dpo = estimate(SHAPES, PARAMS, TRAINED, stage(zero_stage=3, objective="dpo", preference=spec), gpus=4)
    assert dpo.reference == copy_bytes  # the weights again, partitioned as the policy's (P*b / 4)
    assert (dpo.activations, dpo.logits) == (2 * sft.activations, 2 * sft.logits)  # chosen and rejected rows
    assert dpo.total == sft.total + copy_bytes + sft.activations + sft.logits


def test_fp32_zero0_keeps_no_master_copy():
    got = estimate(SHAPES, PARAMS, TRAINED, stage(zero_stage=0, precision="fp32"), gpus=1)
    assert (got.weights, got.gradients, got.optimizer) == (4000, 2800, 8 * 700)


def test_one_gpu_estimates_fp32_zero2_as_the_zero0_it_runs():
    one = estimate(SHAPES, PARAMS, TRAINED, stage(zero_stage=2, precision="fp32"), gpus=1)
    assert one.zero_stage == 0 and one.as_dict() == {
        **estimate(SHAPES, PARAMS, TRAINED, stage(zero_stage=0, precision="fp32"), gpus=1).as_dict(), "zero_stage": 0}
    assert estimate(SHAPES, PARAMS, TRAINED, stage(zero_stage=2, precision="fp32"), gpus=2).zero_stage == 2
    assert estimate(SHAPES, PARAMS, TRAINED, stage(zero_stage=2), gpus=1).zero_stage == 2  # bf16 keeps ZeRO


def test_activations_and_logits():
    # 2 x 4 = 8 tokens; a trained LLM layer saves 8 * (12*8 + 4*16) values of 2 bytes = 2560 bytes
    got = estimate(SHAPES, PARAMS, TRAINED, stage(), gpus=1)
    assert got.activations == 2 * 2560
    assert got.activations_checkpointed == 2 * 8 * 8 * 2 + 2560  # layer inputs, plus one layer recomputed
    assert got.logits == 8 * 10 * (2 + 4 + 4)
    assert estimate(SHAPES, PARAMS, TRAINED, stage(), gpus=1, loss_chunk=3).logits == 3 * 10 * 10
    checkpointed = estimate(SHAPES, PARAMS, TRAINED, stage(gradient_checkpointing=["llm"]), gpus=1)
    assert checkpointed.activations == got.activations_checkpointed


def test_a_frozen_llm_saves_less_and_a_trained_vision_encoder_adds_its_blocks():
    frozen = estimate(SHAPES, PARAMS, {"projector": 100}, stage(), gpus=1)
    assert frozen.activations == 2 * int(2560 * memory.FROZEN_SHARE)
    # the bucket comes after the frozen LLM's backward, when its activations are freed: the larger of the two counts
    assert not frozen.buffers_alongside
    assert frozen.total == frozen.weights + frozen.gradients + frozen.optimizer + max(
        frozen.buffers, frozen.activations + frozen.logits)
    vision = estimate(SHAPES, PARAMS, {**TRAINED, "vision_encoder": 300}, stage(vision_encoder_last_blocks=2),
                      gpus=1)
    # 8 tokens / 2 per image = 4 images of 5 patches; a block saves 20 * (12*4 + 4*8) values of 2 bytes = 3200
    assert vision.activations == 2 * 2560 + 2 * 3200


def test_fits_keeps_a_tenth_free():
    total = estimate(SHAPES, PARAMS, TRAINED, stage(zero_stage=0), gpus=1).total
    assert estimate(SHAPES, PARAMS, TRAINED, stage(zero_stage=0), gpus=1, gpu_memory=int(total / 0.9) + 1).fits
    assert not estimate(SHAPES, PARAMS, TRAINED, stage(zero_stage=0), gpus=1, gpu_memory=total).fits


def test_parse_size():
    assert parse_size("80GB") == 80 * 10**9 and parse_size("80 GiB") == 80 * 2**30 and parse_size("1.5tb") == 1.5e12
    for bad in ("banana", "80", "-1GB", "GB", "0GB"):
        with pytest.raises(ValueError, match="is not a size"):
            parse_size(bad)


def test_tensor_peak_counts_live_storages_once():
    weight = torch.zeros(1000)  # 4000 bytes, there before
    with TensorPeak() as peak:
        peak.track([weight])
        a = torch.ones(2000)       # +8000
        view = a[:10]              # a view: nothing new
        del a, view                # freed
        b = torch.ones(500)        # +2000
    assert peak.peak == 12000 and peak.bytes == 6000
    del b


def test_compare_reads_the_right_peak():
    estimate_ = {"total": 2_100, "buffers": 1_000, "buffers_alongside": True}
    cpu = compare({"peak_tensor_bytes": 2_000, "peak_mem_kind": "process_rss", "peak_mem_bytes": 9}, estimate_)
    assert cpu["total"]["ratio"] == 1.05 and cpu["without_buffers"] == {
        "measured": 1_000, "estimated": 1_100, "ratio": 1.1, "within": True}
    gpu = compare({"peak_mem_kind": "cuda_allocated", "peak_mem_bytes": 3_000}, estimate_)
    assert gpu["without_buffers"]["within"] is False
    with pytest.raises(ValueError, match="--tensor-memory"):
        compare({"peak_mem_kind": "process_rss", "peak_mem_bytes": 1}, estimate_)
    assert set(compare({"peak_tensor_bytes": 2_000}, {**estimate_, "buffers_alongside": False})) == {"total"}


ASAGI = REPO / "recipes" / "asagi-2b.yaml"


def test_recipe_check_prints_the_plan_per_stage_and_json_gives_the_same_numbers():
    text = kakehashi("recipe", "check", ASAGI, "--skip-data", "--gpus", "8", "--gpu-memory", "80GB")
    assert text.returncode == 0, text.stderr[-2000:]
    plans = re.findall(r"memory per GPU: ([\d.,]+) GiB of 74.51 GiB \(10% kept free\) -> (fits|DOES NOT FIT)",
                       text.stdout)
    assert len(plans) == 2 and "states" in text.stdout and "activations" in text.stdout and "logits" in text.stdout
    done = kakehashi("recipe", "check", ASAGI, "--skip-data", "--gpus", "8", "--gpu-memory", "80GB", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["gpus"] == 8 and report["gpu_memory"] == 80 * 10**9
    for (total, verdict), stage_ in zip(plans, report["stages"]):
        plan = stage_["memory"]
        assert f"{plan['total'] / 2**30:,.2f}" == total and plan["fits"] == (verdict == "fits")
        rest = (plan["buffers"] + plan["activations"] + plan["logits"] if plan["buffers_alongside"]
                else max(plan["buffers"], plan["activations"] + plan["logits"]))
        assert plan["total"] == plan["weights"] + plan["gradients"] + plan["optimizer"] + rest


def test_the_plan_counts_a_projector_of_its_own_width():
    """projector.hidden_size 256 (twice the LLM's 128): the projector's real parameters, in `params` and in the
    memory of a stage that trains it (fp32 on one GPU: 4 bytes per weight and per gradient)."""
    done = kakehashi("recipe", "check", TINY_RECIPE, "--skip-data", "--gpus", "1", "--json",
                     "--set", "model.projector.hidden_size=256")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    projector = 64 * 256 + 256 + 256 * 128 + 128
    assert report["params"]["projector"] == projector
    align = report["stages"][0]["memory"]  # trains the projector only
    assert (align["weights"], align["gradients"]) == (4 * sum(report["params"].values()), 4 * projector)


@pytest.mark.parametrize("flags, message", [
    (["--gpus", "0"], "--gpus must be at least 1, got 0"),
    (["--gpus", "8", "--gpu-memory", "banana"], "--gpu-memory: 'banana' is not a size such as 80GB or 80GiB"),
    (["--gpu-memory", "80GB"], "--gpu-memory needs --gpus"),
    # what submit and the run refuse (train/stages.py resolve_stage): 256 rows do not divide over 16 x 3
    (["--gpus", "3"], "stage pretrain: global_batch_size 256 is not a multiple of micro_batch_size x ranks = 16 x 3"),
])
def test_recipe_check_refuses_bad_values_in_one_line(flags, message):
    done = kakehashi("recipe", "check", ASAGI, "--skip-data", *flags)
    assert done.returncode == 2 and done.stdout == "" and len(done.stderr.strip().splitlines()) == 1
    assert done.stderr.startswith("kakehashi: error: " + message)


def measured_against_estimate(recipe, stage: int, *overrides: str) -> dict:
    """`bench train --tensor-memory` of a stage, packed (full rows: the estimate's worst case), two steps of our engine
    on one process (the optimizer's moments exist from the first update on), against `recipe check --gpus 1`."""
    sets = [f"--set={o}" for o in overrides]
    bench = kakehashi("bench", "train", recipe, "--stage", str(stage), "--packing", "on", "--steps", "1",
                      "--warmup", "1", "--tensor-memory", "--json", *sets, env={"OMP_NUM_THREADS": "1"})
    assert bench.returncode == 0, bench.stderr[-2000:]
    check = kakehashi("recipe", "check", recipe, "--gpus", "1", "--json", *sets)
    assert check.returncode == 0, check.stderr[-2000:]
    return compare(json.loads(bench.stdout), json.loads(check.stdout)["stages"][stage - 1]["memory"])


@pytest.mark.slow
def test_the_estimate_is_within_a_fifth_of_the_measured_peak_for_the_tiny_recipe():
    """Whole and without DeepSpeed's fixed reduction bucket (2 GB in fp32, which would hide a tiny model)."""
    result = measured_against_estimate(TINY_RECIPE, 2)
    assert set(result) == {"total", "without_buffers"}
    assert all(row["within"] for row in result.values()), result


REAL_WIDTH = REPO / "tests" / "fixtures" / "asagi-real-width.yaml"


@pytest.mark.slow
@pytest.mark.parametrize("stage, overrides", [
    (1, ["model.llm.config.vocab_size=99584"]),  # projector only, the real vocabulary's logits (~4.7 GB of RSS)
    (2, []),                                     # projector + the LLM layer trained (~3.2 GB of RSS)
])
def test_the_estimate_is_within_a_fifth_of_the_measured_peak_at_real_width(stage, overrides):
    result = measured_against_estimate(REAL_WIDTH, stage, *overrides)
    assert all(row["within"] for row in result.values()), result
