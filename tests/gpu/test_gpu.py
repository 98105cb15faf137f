"""The GPU tier (marked `gpu`: skipped without CUDA, so CI's CPU machines pass it by). Each test runs one case of
tests/gpu/cases.py in a fresh process with DeepSpeed on the CUDA accelerator; `tests/gpu/check.py` (make gpu-check)
runs them on a bare GPU machine, followed by `bench train` on the real-shape recipes."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.gpu


def run_case(name: str) -> dict:
    env = {**os.environ, "DS_ACCELERATOR": "cuda"}  # tests/conftest.py defaults it to cpu for the rest of the suite
    done = subprocess.run([sys.executable, "-m", "tests.gpu.cases", name], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def assert_trained(figures: dict, zero_stage: int):
    assert figures["device"].startswith("cuda") and figures["param_dtype"] == "torch.bfloat16"
    assert figures["zero_stage"] == zero_stage and figures["precision"] == "bf16"
    assert len(figures["losses"]) == 3 and all(loss is not None and 0 < loss < 20 for loss in figures["losses"])
    assert figures["trained_tensors_moved"] == figures["trained_tensors"] > 0
    assert figures["frozen_tensors_moved"] == 0 and figures["gathered_finite"]


def test_a_bf16_step_trains_on_the_gpu():
    assert_trained(run_case("bf16"), zero_stage=2)


@pytest.fixture(scope="module")
def zero3():
    return run_case("zero3")


def test_zero3_trains_on_nccl_with_one_gpu(zero3):
    assert_trained(zero3, zero_stage=3)
    assert zero3["backend"] == "nccl" and zero3["world_size"] == 1


def test_mfu_is_logged_and_plausible(zero3):
    # the tiny model keeps a GPU mostly idle, so its MFU is small; what is checked is that the peak was found (by
    # device name) and the figure is a fraction
    assert all(0 < mfu < 1 for mfu in zero3["mfu"]), zero3["mfu"]
    assert all(t > 0 for t in zero3["tflops_per_device"])


def test_compiled_llm_blocks_give_the_eager_loss_and_gradients():
    figures = run_case("compile")
    assert figures["device"].startswith("cuda")
    assert figures["compiled_loss"] == pytest.approx(figures["eager_loss"], abs=1e-4)
    assert figures["same_grads"] and figures["max_grad_diff"] < 1e-3


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn is not installed")
def test_flash_attention_2_packed_loss_equals_sdpa():
    figures = run_case("flash")
    # bf16 kernels with different accumulation orders: equal to bf16 precision of a loss near ln(vocabulary)
    assert figures["flash_attention_2_packed"] == pytest.approx(figures["sdpa_packed"], abs=2e-2)
    assert figures["sdpa_packed"] == pytest.approx(figures["sdpa_unpacked"], abs=2e-2)
