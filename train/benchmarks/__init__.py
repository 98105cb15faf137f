"""Japanese VLM benchmarks from local files, scored as llm-jp-eval-mm (`eval-mm`) scores them: one module per task
family (vqa.py: JA-VG-VQA-500 and JA-VLM-Bench-in-the-Wild; heron.py; jmmmu.py; jdocqa.py), the metrics
(metrics.py), the judge (judge.py), batched generation (generate.py) and `kakehashi eval --task` (run.py)."""

from __future__ import annotations

from train.benchmarks.base import Task
from train.benchmarks.heron import JapaneseHeronBench
from train.benchmarks.jdocqa import JDocQA
from train.benchmarks.jmmmu import Jmmmu
from train.benchmarks.vqa import JaVgVqa500, JaVlmBenchInTheWild
from train.errors import UsageError

TASKS: dict[str, Task] = {task.name: task for task in (JaVgVqa500(), JaVlmBenchInTheWild(), JapaneseHeronBench(),
                                                      Jmmmu(), JDocQA())}


def task_named(name: str) -> Task:
    if name not in TASKS:
        raise UsageError(f"unknown benchmark task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]
