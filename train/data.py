"""A stage's data loader, from the recipe and the model family (which says what the loader does with images)."""

from __future__ import annotations

from data_pipelines.batch.loader import MixtureLoader, SourceSpec
from train.models import family_for
from train.recipe import DataSource, Recipe


def source_specs(sources: list[DataSource]) -> list[SourceSpec]:
    return [SourceSpec(shards=source.patterns, weight=source.weight, task=source.task, name=source.name or f"source{i}")
            for i, source in enumerate(sources)]


def stage_loader(recipe: Recipe, index: int, processor, config, *, rank: int, world_size: int,
                 sources: list[SourceSpec] | None = None, num_workers: int | None = None) -> MixtureLoader:
    """Stage `index`'s MixtureLoader over its `data` (or over `sources`), rank `rank` of `world_size`."""
    stage = recipe.stages[index]
    image_processor = processor.image_processor
    image_inputs = family_for(recipe.model).image_inputs(config, processor)  # the export's processor does the same
    return MixtureLoader(
        sources or source_specs(stage.data), tokenizer=processor.tokenizer, template=recipe.template,
        image_mean=tuple(image_processor.image_mean), image_std=tuple(image_processor.image_std),
        max_length=stage.max_length, micro_batch_size=stage.micro_batch_size, seed=recipe.seed + index, rank=rank,
        world_size=world_size, num_workers=stage.data_workers if num_workers is None else num_workers,
        bad_sample_limit=stage.bad_sample_limit, packing=stage.packing,
        max_images_per_sample=stage.max_images_per_sample, **image_inputs)
