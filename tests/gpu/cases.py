"""The GPU tier's cases on the tiny LLaVA model, each run in a fresh process: `python -m tests.gpu.cases NAME`
prints one JSON document of its figures on stdout (logs on stderr).

A fresh process per case, so DeepSpeed picks the CUDA accelerator (it chooses once, at import) whatever the test
process imported before, and so each case has its own process group. On a machine without CUDA the same cases run
on the CPU (gloo; `flash` reports itself skipped), which is how `tests/gpu/check.py run --dry-run` proves them
before a GPU is at hand; `tests/gpu/test_gpu.py` holds what they must show on a GPU.

  bf16   three ZeRO-2 bf16 steps: bf16 parameters on the device, finite losses, weights moved, mfu per step
  zero3  three ZeRO-3 bf16 steps on the process group's backend (NCCL on a GPU), then the whole weights gathered
  compile  loss and gradients of torch.compile'd LLM blocks against eager, fp32
  flash  packed loss with flash_attention_2 against sdpa (and sdpa unpacked), bf16; skipped without flash-attn
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import torch

CASES = ("bf16", "zero3", "compile", "flash")


def _tiny_model(seed: int = 0):
    from tests.conftest import TINY_RECIPE
    from tests.train.conftest import IMAGE_TOKEN_ID, VOCAB
    from train.models.llava import LLAVA
    from train.recipe import load_recipe

    recipe = load_recipe(TINY_RECIPE, check_files=False)
    torch.manual_seed(seed)
    return LLAVA.build(recipe.model, LLAVA.config(recipe.model, VOCAB, {"image": IMAGE_TOKEN_ID}))


def _train(zero_stage: int, precision: str, steps: int = 3) -> dict:
    """`steps` optimizer steps of the tiny model (projector + LLM) through setup_stage/train_step and the metrics
    hook, on this process's device; the figures each step logged and what the engine holds afterwards."""
    from tests.train.conftest import make_stage, random_batch
    from train import distributed
    from train.engine import consolidated_state_dict, train_stage
    from train.hooks import stage_hooks
    from train.models.llava import LLAVA
    from train.reporting import MetricsLog

    # lr 1e-2: three Adam steps move every trained weight by more than bf16's spacing near 1.0 (norm weights)
    stage = make_stage(train=["projector", "llm"], lr={"projector": 1e-2, "llm": 1e-2}, steps=steps,
                       global_batch_size=4, micro_batch_size=2, zero_stage=zero_stage, precision=precision)
    model = _tiny_model()
    parts = LLAVA.component_parameters(model)
    before = {name: p.detach().float().clone() for c in stage.train for name, p in parts[c]}
    frozen = {name: p.detach().float().clone() for name, p in parts["vision_encoder"]}
    batches = [random_batch(torch.Generator().manual_seed(i), 2, 64, 30) for i in range(2 * steps)]
    rank, world_size = distributed.init_distributed()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            metrics = Path(tmp) / "metrics.jsonl"
            engine, _ = train_stage(LLAVA, model, stage, iter(batches), rank=rank, world_size=world_size,
                                    hooks=stage_hooks(stage, rank=rank, metrics=MetricsLog(metrics)))
            records = [json.loads(line) for line in metrics.read_text().splitlines()]
        params = list(LLAVA.unwrap(engine.module).parameters())
        weights = consolidated_state_dict(LLAVA, engine, rank)
        backend = torch.distributed.get_backend()
    finally:
        distributed.close()
    moved = sum(not torch.equal(weights[name].float().cpu(), value) for name, value in before.items())
    # frozen weights are stored in bf16 by a bf16 stage: compare them at that precision
    frozen_moved = sum(not torch.equal(weights[name].float().cpu(), value.to(weights[name].dtype).float())
                       for name, value in frozen.items())
    return {
        "device": str(distributed.device()), "backend": backend, "world_size": world_size,
        "zero_stage": zero_stage, "precision": precision, "param_dtype": str(params[0].dtype),
        "losses": [r["loss"] for r in records], "mfu": [r["mfu"] for r in records],
        "tflops_per_device": [r["tflops_per_device"] for r in records],
        "trained_tensors": len(before), "trained_tensors_moved": moved, "frozen_tensors": len(frozen),
        "frozen_tensors_moved": frozen_moved,
        "gathered_finite": all(bool(torch.isfinite(w.float()).all()) for w in weights.values()),
    }


def case_bf16() -> dict:
    return _train(zero_stage=2, precision="bf16")


def case_zero3() -> dict:
    return _train(zero_stage=3, precision="bf16")


def _loss_and_grads(model, batch, device) -> tuple[float, dict]:
    from train.models.llava import LLAVA

    model.train()
    inputs = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor) and k != "num_target_tokens"}
    loss_sum, targets = LLAVA.training_module(model)(**inputs)
    loss = loss_sum / targets
    loss.backward()
    return loss.item(), {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.grad is not None}


def case_compile() -> dict:
    from tests.train.conftest import make_stage, random_batch
    from train.engine import enable_fast_paths
    from train.models.llava import LLAVA
    from train.stages import resolve_stage

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = _tiny_model().to(device)
    batch = random_batch(torch.Generator().manual_seed(1), batch=2, length=40, targets_from=20)
    eager_loss, eager_grads = _loss_and_grads(copy.deepcopy(model), batch, device)
    enable_fast_paths(LLAVA, model, resolve_stage(make_stage(compile=True), 1))
    compiled_loss, compiled_grads = _loss_and_grads(model, batch, device)
    return {"device": str(device), "eager_loss": eager_loss, "compiled_loss": compiled_loss,
            "same_grads": eager_grads.keys() == compiled_grads.keys(),
            "max_grad_diff": max(float((compiled_grads[n] - g).abs().max()) for n, g in eager_grads.items())}


def case_flash() -> dict:
    if importlib.util.find_spec("flash_attn") is None or not torch.cuda.is_available():
        return {"skipped": "flash-attn is not installed" if torch.cuda.is_available() else "needs CUDA"}
    from data_pipelines.batch.collate import collate
    from data_pipelines.batch.pack import collate_packed
    from tests.train.test_packing import make_example
    from train.models.llava import LLAVA

    generator = torch.Generator().manual_seed(0)
    shapes = [(10, True, 6), (25, True, 12), (7, False, 5), (30, True, 20), (3, True, 3)]
    examples = [make_example(generator, f"s{i}", *shape) for i, shape in enumerate(shapes)]
    packed = collate_packed([examples[:3], examples[3:]], pad_token_id=0)
    model = _tiny_model().to("cuda", torch.bfloat16).eval()
    losses = {}
    for attention, batch, extra in (("sdpa", packed, True), ("flash_attention_2", packed, True),
                                    ("sdpa", collate(examples, pad_token_id=0), False)):
        model.set_attn_implementation(attention)
        inputs = {k: batch[k].cuda() for k in ("input_ids", "attention_mask", "labels")}
        with torch.no_grad():
            loss_sum, targets = LLAVA.training_module(model)(
                **inputs, pixel_values=batch["pixel_values"].cuda(),
                position_ids=batch["position_ids"].cuda() if extra else None)
        losses[f"{attention}_{'packed' if extra else 'unpacked'}"] = float(loss_sum / targets)
    return losses


def main(argv: list[str]) -> int:
    import argparse

    from data_pipelines.output import result_json, results_on_stdout

    parser = argparse.ArgumentParser(prog="python -m tests.gpu.cases")
    parser.add_argument("case", choices=CASES)
    case = parser.parse_args(argv).case
    if not torch.cuda.is_available():
        os.environ.setdefault("KAKEHASHI_PEAK_TFLOPS", "1")  # a CPU has no known peak: 1 TFLOP/s, so mfu is logged
    with results_on_stdout():  # DeepSpeed's op builds print on file descriptor 1: stdout holds the figures only
        figures = globals()[f"case_{case}"]()
        figures = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in figures.items()}
        result_json({"case": case, **figures})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
