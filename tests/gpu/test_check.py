"""tests/gpu/check.py (make gpu-check) on a machine without a GPU: what travels to the GPU machine covers what the
project imports, the benchmark command lines, and a dry run of the whole script."""

import ast
import importlib.metadata
import json
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.gpu import check

# imported only for wandb logging, `data convert hf` and the benchmark scorers (train/benchmarks/metrics.py, imported
# inside its functions), and trl by `bench train --baseline trainer` on a preference stage: not on the GPU check's path
OPTIONAL = {"wandb", "datasets", "rouge_score", "emoji", "fugashi", "liger_kernel", "trl"}


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_modules() -> set[str]:
    found = set()
    for folder in ("train", "data_pipelines", "tests/gpu"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    found |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"train", "data_pipelines", "tests", "__future__"} - OPTIONAL


def test_the_gpu_image_and_the_carried_wheels_hold_every_package_the_project_imports():
    available = {normalized(n) for n in check.IMAGE_HAS | set(check.CARRIED)}
    distributions = importlib.metadata.packages_distributions()
    missing = {module: distributions.get(module) for module in imported_modules()
               if not {normalized(d) for d in distributions.get(module, [module])} & available}
    assert not missing, missing


def test_what_the_carried_wheels_need_is_there_too():
    from packaging.requirements import Requirement

    # the GPU image's interpreter (CPython 3.12, x86-64 Linux): requirements behind other markers do not apply there
    image = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
             "platform_machine": "x86_64", "platform_system": "Linux", "extra": ""}
    available = {normalized(n) for n in check.IMAGE_HAS | set(check.CARRIED)}
    for dist in check.CARRIED:
        requirements = [Requirement(r) for r in importlib.metadata.requires(dist) or []]
        needs = [r.name for r in requirements if r.marker is None or r.marker.evaluate(image)]
        assert {normalized(n) for n in needs} <= available, (dist, needs)


def test_bench_depth_options_are_passed_only_where_bench_train_has_them():
    asagi, sarashina = check.BENCHES
    assert "--llm-layers" not in check.bench_command(asagi, depth_options=True)  # Asagi-2B fits at full depth
    assert check.bench_command(sarashina, depth_options=False) is None  # would not fit: skipped, not run whole
    command = check.bench_command(sarashina, depth_options=True)
    assert command[command.index("--llm-layers") + 1] == "16" and "--vision-layers" not in command
    assert command[3:6] == ["bench", "train", "recipes/sarashina2-vision-8b.yaml"] and "--json" in command
    tiny = check.DRY_BENCHES[0]
    assert "--llm-layers" not in check.bench_command(tiny, depth_options=False)  # tiny twins run whole either way


@pytest.mark.slow
def test_the_dry_run_goes_through_every_step_on_the_cpu(tmp_path):
    done = subprocess.run([sys.executable, "tests/gpu/check.py", "run", "--dry-run", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert report == json.loads(done.stdout) and report["dry_run"] and report["failed"] == 0
    steps = report["steps"]
    assert steps["machine"]["imports_ok"] and steps["machine"]["gpu"] is None
    tests = steps["gpu_tests"]
    assert tests["returncode"] == 0 and tests["passed"] == 0 and tests["failure"] == tests["error"] == 0
    assert tests["skipped"] == len(tests["tests"]) == 5  # every gpu test, skipped cleanly without CUDA
    cases = steps["cases_on_cpu"]
    assert cases["flash"] == {"case": "flash", "skipped": "needs CUDA"}
    for name in ("bf16", "zero3"):
        assert cases[name]["trained_tensors_moved"] == cases[name]["trained_tensors"] > 0, cases[name]
        assert all(0 < mfu < 1 for mfu in cases[name]["mfu"])  # against a stated 1 TFLOP/s peak on CPU
    assert cases["compile"]["compiled_loss"] == pytest.approx(cases["compile"]["eager_loss"], abs=1e-4)
    for spec in check.DRY_BENCHES:
        figures = steps["bench"][spec["name"]]
        assert figures["tokens_per_s"] > 0 and figures["packing"] and figures["steps"] == spec["steps"], figures
