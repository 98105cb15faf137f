"""`kakehashi submit RECIPE --nodes N ...`: validate a recipe here, render slurm/train.sbatch, hand it to sbatch.

The job runs this machine's interpreter (`sys.executable`, so the same install) in this directory with this
environment (sbatch --export=ALL), one torchrun agent per node (see slurm/train.sbatch). Nothing reaches the
queue unless the recipe loads and every stage's global batch divides over the job's ranks.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

from data_pipelines.output import result
from train.errors import UsageError

TEMPLATE = Path(__file__).resolve().parents[1] / "slurm" / "train.sbatch"
PLACEHOLDER = re.compile(r"@[A-Z_]+@")
DEFAULT_SIGNAL_LEAD = 300  # seconds: one optimizer step plus a checkpoint must fit (Slurm may signal up to 60 s early)


def register(subparsers) -> None:
    """Add `submit` to the CLI's subparsers."""
    submit = subparsers.add_parser("submit", help="submit a training run to Slurm (one torchrun agent per node)")
    submit.add_argument("recipe", help="recipe YAML file")
    submit.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                        help="override a recipe field (repeatable); passed on to the job")
    submit.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    submit.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (default 0: CPU-only nodes)")
    submit.add_argument("--nproc-per-node", type=int,
                        help="training processes per node (default: the GPUs per node, or 1 without GPUs)")
    submit.add_argument("--cpus-per-node", type=int,
                        help="CPUs per node (default: whole nodes, --exclusive with all their memory)")
    submit.add_argument("--partition", help="Slurm partition")
    submit.add_argument("--account", help="Slurm account")
    submit.add_argument("--time", help="time limit, as sbatch takes it (e.g. 24:00:00)")
    submit.add_argument("--signal-lead", type=int, default=DEFAULT_SIGNAL_LEAD, metavar="SECONDS",
                        help=f"checkpoint and requeue this long before the time limit (default {DEFAULT_SIGNAL_LEAD})")
    submit.add_argument("--job-name", help="job name (default: the recipe's name)")
    submit.add_argument("--output", help="run directory (default: runs/<recipe name>)")
    submit.add_argument("--log-dir", help="folder for the job's output (default: slurm-logs beside the run directory)")
    submit.add_argument("--no-export", action="store_true", help="skip the export after the last stage")
    submit.add_argument("--skip-data", action="store_true", help="do not require the shards to exist here")
    submit.add_argument("--sbatch", dest="sbatch_options", action="append", default=[], metavar="OPTION",
                        help="an extra sbatch option for the script, e.g. --sbatch=--qos=high (repeatable)")
    submit.add_argument("--dry-run", action="store_true", help="print the job script instead of submitting it")
    submit.set_defaults(func=cmd_submit)


def processes_per_node(args) -> int:
    if args.nproc_per_node is not None:
        return args.nproc_per_node
    return args.gpus_per_node or 1


def check_arguments(args) -> None:
    if args.nodes < 1:
        raise UsageError(f"--nodes must be at least 1, got {args.nodes}")
    if args.gpus_per_node < 0:
        raise UsageError(f"--gpus-per-node must be 0 or more, got {args.gpus_per_node}")
    if processes_per_node(args) < 1:
        raise UsageError(f"--nproc-per-node must be at least 1, got {args.nproc_per_node}")
    if args.cpus_per_node is not None and args.cpus_per_node < 1:
        raise UsageError(f"--cpus-per-node must be at least 1, got {args.cpus_per_node}")
    if args.signal_lead < 1:
        raise UsageError(f"--signal-lead must be at least 1 second, got {args.signal_lead}")
    for option in args.sbatch_options:
        if not option.startswith("--") or "\n" in option:
            raise UsageError(f"--sbatch {option!r}: expected one long sbatch option such as --qos=high")


def check_batch_sizes(recipe, world_size: int) -> None:
    """The check DeepSpeed would fail on in the queue: each stage's global batch over micro batch x ranks."""
    from train.stages import resolve_stage

    for stage in recipe.stages:
        try:
            resolve_stage(stage, world_size)
        except UsageError as err:
            raise UsageError(f"{err}; change the recipe (--set) or the number of processes") from None


def render(args, recipe, output: Path, log: Path) -> str:
    nproc = processes_per_node(args)
    resources = []
    if args.gpus_per_node:
        resources.append(f"--gpus-per-node={args.gpus_per_node}")
    if args.cpus_per_node:
        resources.append(f"--cpus-per-task={args.cpus_per_node}")  # one task per node
    else:
        resources += ["--exclusive", "--mem=0"]
    for option, value in (("--partition", args.partition), ("--account", args.account), ("--time", args.time)):
        if value:
            resources.append(f"{option}={value}")
    train_args = [str(Path(args.recipe).resolve()), "--output", str(output)]
    for override in args.overrides:
        train_args += ["--set", override]
    if args.no_export:
        train_args.append("--no-export")
    values = {
        "@JOB_NAME@": args.job_name or recipe.name,
        "@NODES@": str(args.nodes),
        "@RESOURCES@": "\n".join(f"#SBATCH {option}" for option in resources),
        "@SIGNAL_LEAD@": str(args.signal_lead),
        "@LOG@": str(log),
        "@WORKDIR@": str(Path.cwd()),
        "@EXTRA@": "\n".join(f"#SBATCH {option}" for option in args.sbatch_options),
        "@PYTHON@": shlex.quote(sys.executable),
        "@NPROC_PER_NODE@": str(nproc),
        "@TRAIN_ARGS@": " ".join(shlex.quote(a) for a in train_args),
    }
    script = TEMPLATE.read_text(encoding="utf-8")
    for placeholder, value in values.items():
        script = script.replace(placeholder, value)
    script = re.sub(r"\n\n+#SBATCH", "\n#SBATCH", script).replace("\n\nset -euo", "\nset -euo")  # empty fields
    left = PLACEHOLDER.findall(script)
    if left:
        raise RuntimeError(f"{TEMPLATE}: unfilled fields {sorted(set(left))}")
    return script


def cmd_submit(args: argparse.Namespace) -> int:
    from train.recipe import load_recipe

    check_arguments(args)
    recipe = load_recipe(args.recipe, args.overrides, check_data=not args.skip_data)  # RecipeError: exit 2
    check_batch_sizes(recipe, args.nodes * processes_per_node(args))
    output = Path(args.output or Path("runs") / recipe.name).resolve()
    log_dir = Path(args.log_dir).resolve() if args.log_dir else output.parent / "slurm-logs"
    log = log_dir / f"{output.name}-%j.out"  # outside the run directory, which must hold only the run
    script = render(args, recipe, output, log)
    if args.dry_run:
        result(script, end="")
        return 0
    log_dir.mkdir(parents=True, exist_ok=True)  # Slurm cannot create it, and the job would fail unseen
    try:
        sbatch = subprocess.run(["sbatch", "--parsable"], input=script, capture_output=True, text=True)
    except FileNotFoundError:
        raise UsageError("sbatch not found: run this on a Slurm login node (or use --dry-run)") from None
    if sbatch.returncode != 0:
        reason = (sbatch.stderr.strip().splitlines() or ["no message"])[-1]
        raise UsageError(f"sbatch refused the job: {reason}")
    job_id = sbatch.stdout.strip().split(";")[0]  # --parsable: JOBID or JOBID;CLUSTER
    result(job_id)
    print(f"submitted job {job_id}: {args.nodes} node(s) x {processes_per_node(args)} process(es), "
          f"run {output}, log {str(log).replace('%j', job_id)}", file=sys.stderr)
    return 0
