import pytest

from train.recipe import UsageError, dump_recipe, load_recipe
from train.run import prepare_output
from tests.conftest import TINY_RECIPE


def test_a_run_from_before_a_new_recipe_field_is_the_same_recipe_and_another_recipe_is_refused(tmp_path):
    recipe = load_recipe(TINY_RECIPE, check_files=False)
    run = tmp_path / "run"
    run.mkdir()
    older = dump_recipe(recipe).replace("  packing: true\n", "")  # stored before `packing` existed
    assert older != dump_recipe(recipe)
    (run / "recipe.yaml").write_text(older)
    prepare_output(run, recipe, force=False, resume="auto")
    assert (run / "recipe.yaml").read_text() == dump_recipe(recipe)
    with pytest.raises(UsageError, match="holds a run of a different recipe"):
        prepare_output(run, load_recipe(TINY_RECIPE, ["seed=1"], check_files=False), force=False, resume="auto")
