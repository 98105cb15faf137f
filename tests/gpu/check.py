"""`make gpu-check`: the GPU tier and the real-shape benchmarks on a bare GPU machine with no network, its figures
written as JSON.

  here, with PyPI:       make gpu-wheels      wheels/ <- what the project needs beyond the GPU image (CARRIED)
  there, one GPU:        make gpu-check       python3 tests/gpu/check.py run --wheels wheels --out $OUT
  here, on the CPU:      make gpu-check-dry   the same steps without a GPU (see --dry-run)

The GPU image has PyTorch, transformers, accelerate, peft and the packages of IMAGE_HAS; everything else the project
imports travels as wheels built or downloaded here (`wheels`, for CPython 3.12 on x86-64 Linux), beside the tree.

`run`, step by step (gpu-check.json is rewritten after each, so a run cut short still leaves what it measured):
  1. install the wheels into a private folder (pip --no-index --no-deps --target; nothing of the image changes)
     and put it and the tree on PYTHONPATH for every later step;
  2. record the machine: Python, torch and CUDA, the GPU, the versions of the project's packages, and that the
     project imports;
  3. pytest -m gpu tests/gpu: a bf16 step, ZeRO-3 on NCCL with one GPU, mfu logged and plausible, compile's loss,
     flash_attention_2's packed loss against sdpa (each case in a fresh process; tests/gpu/cases.py);
  4. `kakehashi bench train` (packed, random weights, synthetic data, the stand-in tokenizer where the recipe's is
     not on the machine) on each of BENCHES: Asagi-2B stage 2 at full size, Sarashina2-Vision-8B stage 3 at real
     widths with its LLM cut to 16 of 32 layers (one H200 cannot hold the full model's optimizer state);
     each bounded by what is left of the time budget (default 450 s: the whole run fits in 8 minutes).

--dry-run (a machine without a GPU): step 1 lists the wheels instead of installing them (they are for CPython 3.12),
step 3's tests skip (no CUDA) and the cases of tests/gpu/cases.py run directly on the CPU instead, and step 4 runs
the recipes' tiny twins (DRY_BENCHES) with the same command line. So everything but the GPU itself is exercised.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Distributions the project needs that the GPU image lacks (or, transformers, holds at another version than the one
# tested here: carried so the GPU run uses the tested code; kernels and tomlkit: what transformers 5.25 requires
# beyond the image; simplejpeg: the loader's JPEG decoder, a manylinux wheel). Versions: those installed here, when
# `wheels` runs.
CARRIED = ["deepspeed", "hjson", "pydantic", "pydantic-core", "annotated-types", "typing-inspection",
           "typing-extensions", "webdataset", "braceexpand", "transformers", "kernels", "tomlkit", "simplejpeg"]
# Built here from PyPI's source archive (PyPI has no wheel of it): pure Python, its CUDA ops built at use if ever.
BUILT = {"deepspeed"}
# The GPU image's Python packages (CPython 3.12; the list read off such a machine in 2026-11), by distribution name.
IMAGE_HAS = set("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-ml-py onnx onnx-ir onnxruntime onnxscript opencv-python-headless
optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy
portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel
wrapt xarray xxhash yarl zipp
""".split())
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]

# What step 4 measures on one GPU. `llm_layers`: the depth bench trains the LLM at (real widths), where one GPU
# cannot hold the full model's optimizer state; figures scale by layer count.
BENCHES = [
    {"name": "asagi-2b-stage2", "recipe": "recipes/asagi-2b.yaml", "stage": "2", "steps": 6, "warmup": 2,
     "synthetic": 600, "llm_layers": None, "vision_layers": None, "timeout": 200,
     "set": ["stages.1.global_batch_size=16"]},             # 4 micro-batches of 4 x 2,048 tokens per step
    {"name": "sarashina2-vision-8b-stage3", "recipe": "recipes/sarashina2-vision-8b.yaml", "stage": "3", "steps": 6,
     "warmup": 2, "synthetic": 400, "llm_layers": 16, "vision_layers": None, "timeout": 240,
     "set": ["stages.2.global_batch_size=8"]},              # 4 micro-batches of 2 x 4,096 tokens per step
]
DRY_BENCHES = [  # the same command line on the recipes' CPU twins
    {"name": "tiny-asagi-stage2", "recipe": "recipes/tiny/asagi-2stage.yaml", "stage": "2", "steps": 2, "warmup": 1,
     "synthetic": 40, "llm_layers": 1, "vision_layers": 1, "timeout": 600, "optional_depth": True,
     "set": ["stages.1.global_batch_size=4", "stages.1.micro_batch_size=2"]},
    {"name": "tiny-sarashina-stage3", "recipe": "recipes/tiny/sarashina-3stage.yaml", "stage": "3", "steps": 2,
     "warmup": 1, "synthetic": 40, "llm_layers": 1, "vision_layers": 1, "timeout": 600, "optional_depth": True,
     "set": ["stages.2.global_batch_size=4", "stages.2.micro_batch_size=2"]},
]
CASES = ("bf16", "zero3", "compile", "flash")


# ------------------------------------------------------------------------------------------------------- wheels


def download_wheels(dest: Path) -> list[str]:
    """Fetch (or build) a wheel of each CARRIED distribution, at the version installed here, for CPython 3.12."""
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):
        old.unlink()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    for dist in CARRIED:
        spec = f"{dist}=={importlib.metadata.version(dist)}"
        if dist in BUILT:
            command = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dest), spec]
        else:
            command = [*pip, "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                       "--implementation", "cp", *[f"--platform={p}" for p in PLATFORMS], "-d", str(dest), spec]
        subprocess.run(command, check=True, env={**os.environ, "DS_BUILD_OPS": "0"})
    return sorted(p.name for p in dest.glob("*.whl"))


# ---------------------------------------------------------------------------------------------------------- run


class Report:
    """gpu-check.json, rewritten whole after every step."""

    def __init__(self, out: Path, dry_run: bool, budget: float):
        self.out, self.started, self.budget = out, time.monotonic(), budget
        self.data = {"dry_run": dry_run, "budget_s": budget, "steps": {}}

    def remaining(self) -> float:
        return self.budget - (time.monotonic() - self.started)

    def step(self, name: str, value) -> None:
        self.data["steps"][name] = value
        self.data["seconds"] = round(time.monotonic() - self.started, 1)
        (self.out / "gpu-check.json").write_text(json.dumps(self.data, indent=1) + "\n")
        print(f"gpu-check: {name} done at {self.data['seconds']} s", file=sys.stderr, flush=True)


def prepare(wheels: Path | None, dry_run: bool) -> tuple[dict, dict]:
    """Step 1: the environment every later step runs in, and what was installed (or, dry, would be)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    found = sorted(wheels.glob("*.whl")) if wheels else []
    info = {"wheels": [{"file": w.name, "bytes": w.stat().st_size} for w in found]}
    path = [str(REPO)]
    if found and not dry_run:
        site = Path(tempfile.mkdtemp(prefix="kakehashi-site-"))
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--disable-pip-version-check", "--target", str(site), *map(str, found)],
                       check=True)
        path.insert(0, str(site))
        info["installed_into"] = str(site)
    env["PYTHONPATH"] = os.pathsep.join(path + [p for p in [os.environ.get("PYTHONPATH")] if p])
    env["DS_ACCELERATOR"] = "cpu" if dry_run else "cuda"
    return env, info


MACHINE = """
import importlib.metadata, json, platform, torch
def version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "gpu_memory_bytes": torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None,
        "packages": {n: version(n) for n in ("deepspeed", "transformers", "peft", "pydantic",
                                             "webdataset", "flash-attn", "liger-kernel")}}
import train.engine, train.bench, data_pipelines.batch.loader  # the project imports with what is installed
info["imports_ok"] = True
print(json.dumps(info))
"""


def machine(env: dict) -> dict:
    """Step 2."""
    done = subprocess.run([sys.executable, "-c", MACHINE], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=180)
    if done.returncode:
        return {"imports_ok": False, "error": done.stderr.strip().splitlines()[-5:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def gpu_tests(env: dict, out: Path, timeout: float) -> dict:
    """Step 3: the gpu-marked tests; counts read from pytest's JUnit XML, the whole output in pytest.log."""
    junit = out / "gpu-tests.xml"
    command = [sys.executable, "-m", "pytest", "tests/gpu", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
               f"--junitxml={junit}"]
    try:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=max(timeout, 1))
        log, returncode = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as err:
        log, returncode = f"{err.stdout or ''}{err.stderr or ''}\ntimed out after {timeout:.0f} s", None
    (out / "pytest.log").write_text(log if isinstance(log, str) else log.decode())
    cases = {}
    if junit.is_file():
        for case in ElementTree.parse(junit).getroot().iter("testcase"):
            outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
            cases[case.get("name")] = outcome
    counts = {kind: sum(v == kind for v in cases.values()) for kind in ("passed", "skipped", "failure", "error")}
    return {"returncode": returncode, **counts, "tests": cases}


def run_cases(env: dict, out: Path) -> dict:
    """Dry run only: the cases of tests/gpu/cases.py straight on the CPU, their figures, the logs in cases.log."""
    figures, logs = {}, []
    for case in CASES:
        done = subprocess.run([sys.executable, "-m", "tests.gpu.cases", case], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=900)
        logs.append(f"=== {case} (exit {done.returncode})\n{done.stderr}")
        figures[case] = json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr[-2000:]}
    (out / "cases.log").write_text("\n".join(logs))
    return figures


def bench_supports_depth(env: dict) -> bool:
    """Whether this tree's `bench train` has --llm-layers / --vision-layers (issue 16's item 1, built beside this)."""
    done = subprocess.run([sys.executable, "-m", "train.cli", "bench", "train", "--help"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    return "--llm-layers" in done.stdout and "--vision-layers" in done.stdout


def bench_command(spec: dict, depth_options: bool) -> list[str] | None:
    """The `bench train` command line of one BENCHES entry; None when it needs a reduced depth this bench cannot
    give (the full model would not fit)."""
    command = [sys.executable, "-m", "train.cli", "bench", "train", spec["recipe"], "--stage", spec["stage"],
               "--packing", "on", "--steps", str(spec["steps"]), "--warmup", str(spec["warmup"]),
               "--synthetic", str(spec["synthetic"]), "--json", *[f"--set={s}" for s in spec["set"]]]
    reduced = {"--llm-layers": spec["llm_layers"], "--vision-layers": spec["vision_layers"]}
    reduced = {option: layers for option, layers in reduced.items() if layers is not None}
    if reduced and not depth_options:
        return command if spec.get("optional_depth") else None
    # --llm-layers / --vision-layers: bench train's depth options (issue 16 item 1, written beside this script);
    # only passed where this tree's bench has them (bench_supports_depth)
    return command + [str(part) for option, layers in reduced.items() for part in (option, layers)]


def bench(spec: dict, env: dict, out: Path, depth_options: bool, timeout: float) -> dict:
    """Step 4, one recipe: bench's JSON document, how long it took, and its log in bench-NAME.log."""
    command = bench_command(spec, depth_options)
    if command is None:
        return {"skipped": "needs bench train --llm-layers (the full model does not fit one GPU)"}
    if timeout < 30:
        return {"skipped": f"time budget spent ({timeout:.0f} s left)"}
    started, log = time.monotonic(), out / f"bench-{spec['name']}.log"
    try:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=min(spec["timeout"], timeout))
    except subprocess.TimeoutExpired as err:
        log.write_text(f"{err.stderr or ''}")
        return {"error": f"timed out after {min(spec['timeout'], timeout):.0f} s", "command": command[2:]}
    log.write_text(done.stderr)
    if done.returncode:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1], "command": command[2:]}
    figures = json.loads(done.stdout)
    return {**figures, "seconds": round(time.monotonic() - started, 1), "command": command[2:],
            "peak_mem_gib": round(figures["peak_mem_bytes"] / 2**30, 2),
            "llm_layers": spec["llm_layers"] if "--llm-layers" in command else None}


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = Report(out, args.dry_run, args.budget)
    env, installed = prepare(Path(args.wheels) if args.wheels else None, args.dry_run)
    report.step("install", installed)
    found = machine(env)
    report.step("machine", found)
    no_gpu = not args.dry_run and not found.get("gpu")  # a real run where no GPU (or no working install) is
    tests = gpu_tests(env, out, min(300.0, report.remaining()))
    report.step("gpu_tests", tests)
    if args.dry_run:
        report.step("cases_on_cpu", run_cases(env, out))
    depth_options = bench_supports_depth(env)
    benches = {"depth_options": depth_options}
    for spec in DRY_BENCHES if args.dry_run else BENCHES:
        benches[spec["name"]] = ({"error": "no CUDA device (or the project does not import): see steps.machine"}
                                 if no_gpu else bench(spec, env, out, depth_options, report.remaining()))
        report.step("bench", benches)
    failed = tests["failure"] + tests["error"] + sum("error" in b for b in benches.values() if isinstance(b, dict))
    if args.dry_run:
        failed += sum("error" in c for c in report.data["steps"]["cases_on_cpu"].values())
    report.data["failed"] = failed
    report.step("done", {"failed": failed})
    print(json.dumps(report.data), flush=True)
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tests/gpu/check.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    wheels = commands.add_parser("wheels", help="download / build the wheels the GPU machine needs (network)")
    wheels.add_argument("--dest", default="wheels")
    check = commands.add_parser("run", help="the GPU tests and benchmarks; gpu-check.json in --out")
    check.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu-check")
    check.add_argument("--wheels", default=None, help="folder of wheels to install first (make gpu-wheels)")
    check.add_argument("--budget", type=float, default=None, help="seconds for the whole run (450; dry run 3600)")
    check.add_argument("--dry-run", action="store_true", help="no GPU: skip the GPU tests, bench the tiny twins")
    args = parser.parse_args(argv)
    if args.command == "wheels":
        names = download_wheels(Path(args.dest))
        size = sum((Path(args.dest) / n).stat().st_size for n in names)
        print(f"{len(names)} wheels, {size / 2**20:.1f} MiB in {args.dest}: {' '.join(names)}")
        return 0
    if args.budget is None:
        args.budget = 3600.0 if args.dry_run else 450.0
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
