"""Load an export through its family's own loader (plain transformers for LLaVA); answers come from
train/benchmarks/generate.py `answer`."""

from __future__ import annotations

from train.models import family_of_export


def load_export(model_dir):
    """An export (any family's format) -> (model in eval mode, processor)."""
    return family_of_export(model_dir).load_export(model_dir)
