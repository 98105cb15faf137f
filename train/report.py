"""`kakehashi report RUN_DIR`: per-stage plots from metrics.jsonl and a markdown summary; the export's model card."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

PLOTTED = {  # metrics.jsonl field -> axis label; a field a run never logged (e.g. mfu before issue 5) is left out
    "loss": "loss",
    "lr": "learning rate",
    "grad_norm": "gradient norm",
    "tokens_per_s": "real tokens / s",
    "mfu": "model FLOPs utilisation",
}


def read_metrics(run_dir: Path) -> dict[str, list[dict]]:
    """Records per stage in step order; a step logged twice (before a kill, after the resume) keeps the last."""
    by_step: dict[tuple[str, int], dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        by_step[(record["stage"], record["step"])] = record
    stages: dict[str, list[dict]] = {}
    for (stage, _), record in sorted(by_step.items(), key=lambda item: item[0][1]):
        stages.setdefault(stage, []).append(record)
    return stages


def stage_summaries(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run_dir / "stages").glob("*/summary.json"))]


def write_plots(run_dir: Path, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    written = []
    for stage, records in read_metrics(run_dir).items():
        fields = [f for f in PLOTTED if any(r.get(f) is not None for r in records)]
        figure, axes = plt.subplots(len(fields), 1, figsize=(7, 2.2 * len(fields)), sharex=True, squeeze=False)
        for axis, field in zip(axes[:, 0], fields):
            points = [(r["step"], r[field]) for r in records if r.get(field) is not None]
            axis.plot([s for s, _ in points], [v for _, v in points], linewidth=1.2)
            axis.set_ylabel(PLOTTED[field])
            axis.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("optimizer step")
        figure.suptitle(f"stage {stage}")
        figure.tight_layout()
        path = out / f"{stage}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    return written


def stage_table(run_dir: Path) -> str:
    """Markdown table: one row per finished stage, from its summary.json."""
    lines = ["| stage | trains | steps | loss first -> last | seconds | samples | "
             "real tokens/s | bad samples | skipped steps |", "|---|---|---|---|---|---|---|---|---|"]
    for s in stage_summaries(run_dir):
        trains = ", ".join(c for c, n in s["trainable"].items() if n)
        lines.append(f"| {s['stage']} | {trains} | {s['steps']} | {s['first_loss']:.4f} -> {s['final_loss']:.4f} | "
                     f"{s['seconds']:.1f} | {s['samples']} | {s['tokens'] / max(s['seconds'], 1e-9):,.0f} | "
                     f"{s['bad_samples']} | {s.get('skipped_steps', 0)} |")
    return "\n".join(lines) + "\n"


def summary_markdown(run_dir: Path) -> str:
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8"))
    return f"# {recipe['name']}\n\n" + stage_table(run_dir)


def model_card(run_dir: Path) -> str:
    """README.md for an export: architecture, the stages and their data, results; regenerated, never hand-edited."""
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8"))
    model = recipe["model"]
    describe = lambda c: model[c].get("path") or f"random init from an inline {model[c].get('config', {}).get('model_type', 'architecture')} config"  # noqa: E731
    lines = [
        "---", "library_name: transformers", "pipeline_tag: image-text-to-text", "language: [ja]", "tags: [llava, kakehashi]", "---",
        f"# {recipe['name']}", "",
        "A `LlavaForConditionalGeneration` trained with [kakehashi](https://github.com/) from one recipe; it loads with "
        "plain transformers (`LlavaForConditionalGeneration`, `AutoProcessor`), no `trust_remote_code`.", "",
        "## Architecture", "",
        f"- vision encoder: {model['vision_encoder'].get('kind', 'siglip')}, {describe('vision_encoder')}",
        f"- projector: {model.get('projector', {}).get('kind', 'mlp2x_gelu')}",
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
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    plots = write_plots(run_dir, out)
    markdown = summary_markdown(run_dir) + "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in plots) + "\n"
    (out / "summary.md").write_text(markdown, encoding="utf-8")
    return out
