"""The distributed pieces on a real 2-rank gloo group in-process (tests/ranks.py), without a whole training:
all-reduced step figures, the guarded optimizer's agreement on a non-finite gradient, lockstep generation, and
periodic eval split over ranks."""

import pytest
import torch
import yaml

from tests.conftest import TINY_RECIPE
from tests.ranks import run_on_ranks


def _sums(rank, world_size):
    from train import distributed

    return distributed.all_reduce_sum(rank + 1), distributed.all_reduce_sum([rank, 10.0 * rank, 1])


def test_all_reduce_sum_adds_numbers_and_lists_over_the_ranks():
    assert run_on_ranks(_sums) == [(3.0, [1.0, 10.0, 2.0])] * 2


def _guarded_step(rank, world_size, poison_rank):
    from train.stages import GuardedAdamW

    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 2)
    before = [p.detach().clone() for p in layer.parameters()]
    optimizer = GuardedAdamW(layer.parameters(), lr=0.1)
    layer(torch.ones(1, 4)).sum().backward()
    if rank == poison_rank:
        layer.weight.grad[0, 0] = float("nan")
    optimizer.step()
    return optimizer.overflow, all(torch.equal(a, b) for a, b in zip(before, layer.parameters()))


def test_a_non_finite_gradient_on_one_rank_skips_the_step_on_every_rank():
    assert run_on_ranks(_guarded_step, 1) == [(True, True), (True, True)]  # skipped everywhere, weights untouched
    assert run_on_ranks(_guarded_step, -1) == [(False, False), (False, False)]  # the same step applies when finite


def _qwen_generation(rank, world_size, synced, new_tokens):
    from tests.train.test_qwen2vl import SARASHINA, images, text_with_images
    from train.models.qwen2vl import QWEN2VL
    from train.recipe import load_recipe

    recipe = load_recipe(SARASHINA, check_files=False)
    torch.manual_seed(0)
    model = QWEN2VL.build(recipe.model, QWEN2VL.config(recipe.model, 300, {"image": 4})).eval()
    pixels, grid = images([[1, 4, 4]], seed=rank)
    input_ids = text_with_images([4], length=20, seed=rank)
    first = model.generate(input_ids, torch.ones_like(input_ids), pixels, grid, max_new_tokens=1)[0, -1].item()
    model.llm.generation_config.eos_token_id = first if rank == 0 else -1  # rank 0 stops at once, rank 1 never
    output = model.generate(input_ids, torch.ones_like(input_ids), pixels, grid, max_new_tokens=new_tokens,
                            synced_gpus=synced)
    return output[0, input_ids.shape[1]:].tolist()


def test_lockstep_generation_runs_every_rank_to_the_end_and_changes_no_answer():
    """Under ZeRO-3 each forward gathers parameters collectively: a rank that stopped early keeps stepping."""
    synced = run_on_ranks(_qwen_generation, True, 5)
    alone = [run_on_ranks(_qwen_generation, False, 5, world_size=1)[0]]  # rank 0's prompt in a world of one
    assert len(synced[0]) == 1 and len(synced[1]) == 5  # rank 0 answered one token, then kept rank 1 company
    assert synced[0] == alone[0]


def _eval_losses(rank, world_size, data, cache):
    from train.models import model_config
    from train.models.llava import LLAVA
    from train.periodic_eval import build_periodic_eval
    from train.recipe import parse_recipe
    from train.run import build_processor

    recipe = yaml.safe_load(TINY_RECIPE.read_text())
    stage = recipe["stages"][1]
    stage.update(eval_every=1, eval_samples=5, eval_generate=0, micro_batch_size=2, global_batch_size=4,
                 eval_data=[{"shards": f"{data}/captions-*.tar", "task": "caption"},
                            {"shards": f"{data}/vqa-*.tar", "task": "vqa"}])
    recipe = parse_recipe(yaml.safe_dump(recipe, allow_unicode=True), check_files=False)
    processor = build_processor(recipe, cache)
    evaluator = build_periodic_eval(recipe, 1, processor, rank=rank, world_size=world_size)
    torch.manual_seed(0)
    model = LLAVA.build(recipe.model, model_config(recipe.model, processor.tokenizer))
    return evaluator.losses(LLAVA.training_module(model))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from data_pipelines.synthetic.synth import synthesize

    out = tmp_path_factory.mktemp("shapes")
    synthesize(out, samples=12, seed=0, samples_per_shard=6, image_size=32)
    return out


def test_periodic_eval_losses_split_over_two_ranks_equal_one_process(shapes, tmp_path):
    """5 samples per source over 2 ranks of micro-batch 2: rank 1 pads a forward; the all-reduced sums are whole."""
    two = run_on_ranks(_eval_losses, str(shapes), str(tmp_path / "cache"))
    (one,) = run_on_ranks(_eval_losses, str(shapes), str(tmp_path / "cache"), world_size=1)
    assert two[0] == two[1] and set(one) == {"eval_loss/caption", "eval_loss/vqa", "eval_loss"}
    for key, value in one.items():
        assert two[0][key] == pytest.approx(value, rel=1e-6), key
