"""What a stage reports while it runs: metrics.jsonl (and wandb), and a progress bar or progress lines."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from train.recipe import Stage


class MetricsLog:
    """metrics.jsonl (rank 0), plus wandb when the recipe configures it."""

    def __init__(self, path: Path, wandb_run=None):
        self.path, self.wandb_run = path, wandb_run

    def write(self, record: dict) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({f"{record['stage']}/{k}": v for k, v in record.items() if k != "stage"})


class Progress:
    """A progress bar with loss and ETA on a terminal; a line every ~10% of the stage otherwise."""

    def __init__(self, stage: Stage, enabled: bool, initial: int = 0):
        self.stage, self.enabled, self.start, self.initial = stage, enabled, time.perf_counter(), initial
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=stage.steps, initial=initial, desc=stage.name, unit="step", dynamic_ncols=True)

    def update(self, step: int, loss: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}")
            return
        every = max(1, self.stage.steps // 10)
        if step % every == 0 or step == self.stage.steps:
            elapsed = time.perf_counter() - self.start
            eta = elapsed / max(1, step - self.initial) * (self.stage.steps - step)
            print(f"  [{self.stage.name}] step {step}/{self.stage.steps}  loss {loss:.4f}  eta {eta:.0f}s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
