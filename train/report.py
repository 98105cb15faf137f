"""`kakehashi report RUN_DIR`: per-stage plots from metrics.jsonl and a markdown summary; the export's model card."""

from __future__ import annotations

import json
from pathlib import Path

from train.rundir import RunDir

PLOTTED = {  # metrics.jsonl field -> axis label; a field a run never logged is left out
    "loss": "loss",
    "lr": "learning rate",
    "grad_norm": "gradient norm",
}


THROUGHPUT = {  # mfu is null (no known peak, e.g. on CPU) or absent (older runs): its panel is then left out
    "tokens_per_s": "real tokens / s",
    "tflops_per_device": "model TFLOP/s per device",
    "mfu": "model FLOPs utilisation",
}
EVAL_SCORES = {"eval_exact_match": "eval exact match", "eval_rouge_l_chars_f1": "eval ROUGE-L (chars, F1 0-1)"}


def read_metrics(run_dir: Path, kind: str = "train") -> dict[str, list[dict]]:
    """Records of one kind (train, or eval from periodic evaluation) per stage in step order; a step logged twice
    (before a kill, after the resume) keeps the last."""
    by_step: dict[tuple[str, int], dict] = {}
    for line in RunDir(run_dir).metrics.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record.get("kind", "train") == kind:
            by_step[(record["stage"], record["step"])] = record
    stages: dict[str, list[dict]] = {}
    for (stage, _), record in sorted(by_step.items(), key=lambda item: item[0][1]):
        stages.setdefault(stage, []).append(record)
    return stages


def _plot_panels(path: Path, title: str, panels: list[tuple[str, dict[str, list[tuple[int, float]]]]]) -> Path:
    """One PNG of stacked panels sharing the step axis; a panel is (y label, {line label: [(step, value)]})."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(panels), 1, figsize=(7, 2.2 * len(panels)), sharex=True, squeeze=False)
    for axis, (label, lines) in zip(axes[:, 0], panels):
        for name, points in lines.items():
            axis.plot([s for s, _ in points], [v for _, v in points], linewidth=1.2,
                      marker="." if len(points) < 30 else None, label=name)
        if len(lines) > 1:
            axis.legend(fontsize=8)
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("optimizer step")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _points(records: list[dict], field: str) -> list[tuple[int, float]]:
    return [(r["step"], r[field]) for r in records if r.get(field) is not None]


def write_plots(run_dir: Path, out: Path) -> list[Path]:
    """Per stage: STAGE.png (training curves: loss, each source's loss when logged, lr, gradient norm),
    STAGE-throughput.png (tokens/s, and MFU when logged), and
    STAGE-eval.png (periodic eval: loss per source, exact match, ROUGE-L) when the stage evaluated."""
    written = []
    evals = read_metrics(run_dir, "eval")
    for stage, records in read_metrics(run_dir).items():
        written.append(_plot_panels(out / f"{stage}.png", f"stage {stage}", training_panels(records)))
        throughput = [f for f in THROUGHPUT if _points(records, f)]  # mfu is null when the FLOPs are unknown
        if throughput:
            written.append(_plot_panels(out / f"{stage}-throughput.png", f"stage {stage}: throughput",
                                        [(THROUGHPUT[f], {f: _points(records, f)}) for f in throughput]))
        if stage in evals:
            written.append(_plot_panels(out / f"{stage}-eval.png", f"stage {stage}: periodic eval",
                                        eval_panels(evals[stage])))
    return written


def training_panels(records: list[dict]) -> list[tuple[str, dict]]:
    """STAGE.png's panels: loss, the loss of each source when logged (a source is absent from the steps it gave no
    target to), learning rate, gradient norm."""
    panels = [(PLOTTED[f], {f: _points(records, f)}) for f in PLOTTED if _points(records, f)]
    sources = sorted({k for r in records for k in r if k.startswith("loss/")})
    if sources:
        panels.insert(1, ("loss per source", {k.removeprefix("loss/"): _points(records, k) for k in sources}))
    return panels


def benchmark_fields(records: list[dict]) -> list[str]:
    """eval/<benchmark>/<metric> fields of periodic eval (train/benchmarks/periodic.py), sample counts left out."""
    return sorted({k for r in records for k in r if k.startswith("eval/") and not k.endswith("/samples")})


def eval_panels(records: list[dict]) -> list[tuple[str, dict]]:
    sources = sorted({k for r in records for k in r if k.startswith("eval_loss/")})
    panels = [("eval loss", {k.removeprefix("eval_loss/"): _points(records, k) for k in sources})] if sources else []
    panels += [(label, {f: _points(records, f)}) for f, label in EVAL_SCORES.items() if _points(records, f)]
    return panels + [(f.removeprefix("eval/"), {f.removeprefix("eval/"): _points(records, f)})
                     for f in benchmark_fields(records)]


def eval_table(run_dir: Path) -> str:
    """Markdown table of each stage's last periodic eval; empty when no stage evaluated."""
    last = {stage: records[-1] for stage, records in read_metrics(run_dir, "eval").items()}
    if not last:
        return ""
    lines = ["| stage | step | eval loss | per source | exact match | ROUGE-L | benchmarks (eval-mm scale) |",
             "|---|---|---|---|---|---|---|"]
    number = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    for stage, r in last.items():
        sources = ", ".join(f"{k.removeprefix('eval_loss/')} {v:.4f}" for k, v in r.items()
                            if k.startswith("eval_loss/"))
        benchmarks = ", ".join(f"{k.removeprefix('eval/')} {r[k]:.4f}" for k in benchmark_fields([r]))
        scores = f"{number(r.get('eval_exact_match'))} | {number(r.get('eval_rouge_l_chars_f1'))}"
        lines.append(f"| {stage} | {r['step']} | {number(r.get('eval_loss'))} | {sources} | {scores} | "
                     f"{benchmarks or '-'} |")
    return "\n## Periodic eval (last)\n\n" + "\n".join(lines) + "\n"


def stage_table(run_dir: Path) -> str:
    """Markdown table: one row per finished stage, from its summary.json."""
    lines = ["| stage | trains | steps | loss first -> last | seconds | samples | "
             "real tokens/s | bad samples | skipped steps |", "|---|---|---|---|---|---|---|---|---|"]
    for s in RunDir(run_dir).stage_summaries():
        trains = ", ".join(c for c, n in s["trainable"].items() if n)
        lines.append(f"| {s['stage']} | {trains} | {s['steps']} | {s['first_loss']:.4f} -> {s['final_loss']:.4f} | "
                     f"{s['seconds']:.1f} | {s['samples']} | {s['tokens'] / max(s['seconds'], 1e-9):,.0f} | "
                     f"{s['bad_samples']} | {s.get('skipped_steps', 0)} |")
    return "\n".join(lines) + "\n"


def summary_markdown(run_dir: Path) -> str:
    recipe = RunDir(run_dir).stored_recipe()
    return f"# {recipe['name']}\n\n" + stage_table(run_dir) + eval_table(run_dir)


def model_card(run_dir: Path) -> str:
    """README.md for an export: architecture, the stages and their data, results; regenerated, never hand-edited."""
    from train.models import family_for
    from train.recipe import load_recipe

    parsed = load_recipe(RunDir(run_dir).recipe_file, check_files=False)
    card, recipe = family_for(parsed.model).card(parsed.model), parsed.model_dump(mode="json")
    model = recipe["model"]

    def describe(component: str) -> str:
        source = model[component]
        if model["init"]:  # the inline config is the checkpoint's; the weights are its too
            return f"from model.init {model['init']['path']}"
        if source["path"]:
            return source["path"]
        config = source["config"]
        return f"random init from {config}" if isinstance(config, str) else \
            f"random init from an inline {config.get('model_type', 'architecture')} config"

    lines = [
        "---", f"library_name: {card['library_name']}", "pipeline_tag: image-text-to-text", "language: [ja]",
        f"tags: [{', '.join([*card['tags'], 'kakehashi'])}]", "---",
        f"# {recipe['name']}", "",
        f"Trained with [kakehashi](https://github.com/) from one recipe. {card['format']}", "",
        "## Architecture", "",
        f"- vision encoder: {model['vision_encoder']['kind']}, {describe('vision_encoder')}",
        f"- projector: {model['projector']['kind']}"
        + (f", hidden size {model['projector']['hidden_size']}" if model["projector"].get("hidden_size") else ""),
        f"- LLM: {describe('llm')}",
        f"- chat template: {recipe['template']}", "",
        "## Stages", "",
    ]
    for stage in recipe["stages"]:
        sources = ", ".join(f"{d['task']} `{d['shards']}` (weight {d['weight']})" for d in stage["data"])
        lines.append(f"- **{stage['name']}**: trains {', '.join(stage['train'])}; {stage['steps']} steps x "
                     f"{stage['global_batch_size']} samples; data: {sources}")
    lines += ["", "## Results", "", stage_table(run_dir)]
    return "\n".join(lines)


def write_report(run_dir: Path) -> Path:
    out = RunDir(run_dir).report
    out.mkdir(exist_ok=True)
    plots = write_plots(run_dir, out)
    markdown = summary_markdown(run_dir) + "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in plots) + "\n"
    (out / "summary.md").write_text(markdown, encoding="utf-8")
    return out
