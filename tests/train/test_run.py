import pytest

from tests.conftest import REPO, TINY_RECIPE
from train.data import stage_loader
from train.models import model_config
from train.recipe import UsageError, dump_recipe, load_recipe
from train.run import build_processor, synthesize_missing_data
from train.rundir import RunDir


def test_a_run_from_before_a_new_recipe_field_is_the_same_recipe_and_another_recipe_is_refused(tmp_path):
    recipe = load_recipe(TINY_RECIPE, check_files=False)
    run = tmp_path / "run"
    run.mkdir()
    older = dump_recipe(recipe).replace("  packing: true\n", "")  # stored before `packing` existed
    assert older != dump_recipe(recipe)
    (run / "recipe.yaml").write_text(older)
    RunDir(run).prepare(recipe, force=False, resume="auto")
    assert (run / "recipe.yaml").read_text() == dump_recipe(recipe)
    with pytest.raises(UsageError, match="holds a run of a different recipe"):
        RunDir(run).prepare(load_recipe(TINY_RECIPE, ["seed=1"], check_files=False), force=False, resume="auto")


@pytest.mark.parametrize("path", sorted((REPO / "recipes" / "tiny").glob("*.yaml")), ids=lambda p: p.stem)
@pytest.mark.parametrize("packing", [True, False])
def test_every_tiny_recipes_loader_follows_the_stage_packing_switch(path, packing, tmp_path):
    synthesized = load_recipe(path, check_files=False).synthesize.out  # where the recipe's shards are written
    recipe = load_recipe(path, [f"synthesize.out={tmp_path}/data", "synthesize.samples=40",
                                f"stages.0.packing={str(packing).lower()}", "stages.0.data_workers=0"],
                         check_files=False)
    for source in recipe.stages[0].data:
        source.shards = str(source.shards).replace(str(REPO / synthesized), f"{tmp_path}/data").replace(
            str(synthesized), f"{tmp_path}/data")
    synthesize_missing_data(recipe)
    processor = build_processor(recipe, tmp_path)
    batch = next(stage_loader(recipe, 0, processor, model_config(recipe.model, processor.tokenizer), rank=0, world_size=1))
    rows = batch["input_ids"].shape[0]
    assert ("position_ids" in batch) == packing
    assert batch["num_samples"] > rows if packing else batch["num_samples"] == rows
