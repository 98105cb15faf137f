"""A stage's model as training builds it (train/build.py): in the stage's precision, its weights read one tensor at a
time, and under ZeRO-3 partitioned as it is built, so each rank holds about its share of the model, never all of it.
No timings: memory is read as each rank's peak resident size (VmHWM) before and after the build."""

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import TINY_RECIPE
from tests.ranks import run_on_ranks
from tests.train.conftest import IMAGE_TOKEN_ID, VOCAB

# the tiny recipe with a wider, deeper LLM (about 55M parameters, 220 MB in fp32): large enough that a rank holding
# the whole model would show in its peak resident size, no single tensor above 1% of it
WIDE = ["model.llm.config.hidden_size=512", "model.llm.config.intermediate_size=1536",
        "model.llm.config.num_hidden_layers=16", "model.llm.config.num_attention_heads=8",
        "model.llm.config.num_key_value_heads=8"]


def recipe_and_config(overrides=()):
    from train.models.llava import LLAVA
    from train.recipe import load_recipe

    recipe = load_recipe(TINY_RECIPE, list(overrides), check_files=False)
    return recipe, LLAVA.config(recipe.model, VOCAB, {"image": IMAGE_TOKEN_ID})


def write_stage_dir(directory, overrides=()) -> dict:
    """A stage directory's weights (model.safetensors) of a plain random build; returns them."""
    from train.models.llava import LLAVA

    recipe, config = recipe_and_config(overrides)
    torch.manual_seed(1)
    state = {k: v.clone() for k, v in LLAVA.build(recipe.model, config).state_dict().items()}
    directory.mkdir()
    save_file(state, directory / "model.safetensors")
    return state


def test_safetensors_weights_reads_each_tensor_as_saved(tmp_path):
    from train.models.weights import safetensors_weights

    saved = {"a": torch.randn(3, 5), "b": torch.randn(7).bfloat16(), "c": torch.arange(6).reshape(2, 3),
             "d": torch.zeros(0, 4), "e": torch.tensor([True, False])}
    save_file(saved, tmp_path / "w.safetensors")
    weights = {w.name: w for w in safetensors_weights(tmp_path / "w.safetensors")}
    assert weights.keys() == saved.keys()
    for name, value in saved.items():
        assert weights[name].shape == tuple(value.shape)
        read = weights[name].read()
        assert read.dtype == value.dtype and torch.equal(read, value), name


def test_a_bf16_stage_is_built_in_bf16_from_the_previous_stage_directory(tmp_path):
    from train.build import build_stage_model
    from train.models.llava import LLAVA

    state = write_stage_dir(tmp_path / "previous")
    recipe, config = recipe_and_config(["stages.1.precision=bf16"])
    model = build_stage_model(LLAVA, recipe.model, config, recipe.stages[1], 1, tmp_path / "previous")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32  # the build's dtype does not leak out
    for name, value in model.state_dict().items():
        expected = state[name].to(value.dtype)
        assert torch.equal(value, expected), name


def test_a_bad_shape_in_the_weights_is_refused_before_anything_is_read(tmp_path):
    from train.build import build_stage_model
    from train.models.llava import LLAVA

    write_stage_dir(tmp_path / "previous", ["model.llm.config.intermediate_size=200"])
    recipe, config = recipe_and_config()
    with pytest.raises(ValueError, match="mlp.*shape"):
        build_stage_model(LLAVA, recipe.model, config, recipe.stages[1], 1, tmp_path / "previous")


def peak_resident_bytes() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


TIED = ["model.llm.config.tie_word_embeddings=true"]


def _build_zero3(rank, world_size, previous, tied):
    """On each rank: a random-init ZeRO-3 build of the tiny model (its gathered embedding's spread, and the imports
    out of the way), the tiny model with tied embeddings from `tied` (still tied?), then the wide model from
    `previous`: the peak resident size before and after, this rank's share of the parameters, and whether every
    gathered weight equals the file's."""
    from pathlib import Path

    import deepspeed

    from train.build import build_stage_model
    from train.models.llava import LLAVA
    from train.models.weights import safetensors_weights

    recipe, config = recipe_and_config(["stages.1.zero_stage=3"])
    torch.manual_seed(0)
    tiny = build_stage_model(LLAVA, recipe.model, config, recipe.stages[1], world_size, None)
    embeddings = tiny.get_input_embeddings().weight
    with deepspeed.zero.GatheredParameters([embeddings]):
        spread = float(embeddings.detach().std())
    del tiny
    recipe, config = recipe_and_config(["stages.1.zero_stage=3", *TIED])
    model = build_stage_model(LLAVA, recipe.model, config, recipe.stages[1], world_size, Path(tied))
    still_tied = model.lm_head.weight is model.get_input_embeddings().weight
    del model

    recipe, config = recipe_and_config(["stages.1.zero_stage=3", *WIDE])
    before = peak_resident_bytes()
    model = build_stage_model(LLAVA, recipe.model, config, recipe.stages[1], world_size, Path(previous))
    after = peak_resident_bytes()
    local = sum(p.ds_tensor.numel() for p in model.parameters())
    full = sum(p.ds_numel for p in model.parameters())
    params = dict(model.named_parameters())
    differing = []
    for weight in safetensors_weights(Path(previous) / "model.safetensors"):
        if weight.name in params:
            with deepspeed.zero.GatheredParameters([params[weight.name]]):
                if not torch.equal(params[weight.name].data, weight.read()):
                    differing.append(weight.name)
    return {"spread": spread, "tied": still_tied, "growth": after - before, "local": local, "full": full, "differing": differing}


def test_zero3_builds_each_rank_only_its_partition_of_the_model(tmp_path, monkeypatch):
    # glibc raises its mmap threshold as large blocks are freed, after which freed module-sized blocks stay in the
    # heap (reused, but counted in the peak): a fixed threshold makes the peak what the build holds
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    state = write_stage_dir(tmp_path / "previous", WIDE)
    full_bytes = sum(v.numel() * v.element_size() for v in state.values())
    write_stage_dir(tmp_path / "tied", TIED)
    results = run_on_ranks(_build_zero3, str(tmp_path / "previous"), str(tmp_path / "tied"))
    for rank, result in enumerate(results):
        assert result["tied"], rank  # transformers ties them in post_init, which zero.Init's build defers
        assert 0.015 < result["spread"] < 0.025, rank  # transformers' init (std 0.02), drawn after partitioning
        assert result["differing"] == [], rank
        assert result["full"] * 4 == full_bytes
        # half the model each, up to the padding of each parameter's last partition
        assert result["full"] / 2 <= result["local"] < result["full"] / 2 + len(state), rank
        # a rank that built the whole model would grow by at least full_bytes; each holds half (plus a tensor)
        assert result["growth"] < 0.7 * full_bytes, (rank, result["growth"], full_bytes)


def _build_zero3_exact(rank, world_size, previous, precision, fp16_supported):
    """On each rank: the tiny model's ZeRO-3 build from `previous` in `precision`, with the accelerator saying
    `fp16_supported` (DeepSpeed chose zero.Init's dtype from that answer, whatever dtype it was given); the names
    of the parameters whose gathered value is not the file's in the stage dtype, and the dtypes held."""
    from pathlib import Path

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from train.build import build_stage_model
    from train.models.llava import LLAVA
    from train.models.weights import safetensors_weights

    type(get_accelerator()).is_fp16_supported = lambda self: fp16_supported
    recipe, config = recipe_and_config(["stages.1.zero_stage=3", f"stages.1.precision={precision}"])
    model = build_stage_model(LLAVA, recipe.model, config, recipe.stages[1], world_size, Path(previous))
    params = dict(model.named_parameters())
    differing = []
    for weight in safetensors_weights(Path(previous) / "model.safetensors"):
        with deepspeed.zero.GatheredParameters([params[weight.name]]):
            value = params[weight.name].data
            if not torch.equal(value, weight.read().to(value.dtype)):
                differing.append(weight.name)
    return {"differing": differing, "dtypes": sorted({str(p.ds_tensor.dtype) for p in params.values()})}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("fp16_supported", [False, True], ids=["no-fp16-accelerator", "fp16-accelerator"])
def test_a_zero3_build_holds_the_files_weights_exactly_in_the_stage_dtype(tmp_path, precision, fp16_supported):
    # compared with the file, not with another build: a build that rounds through bf16 differs from the file even
    # where every build rounds the same way (DeepSpeed's zero.Init dtype bug rounded fp32 builds on CPUs without fp16)
    write_stage_dir(tmp_path / "previous")
    results = run_on_ranks(_build_zero3_exact, str(tmp_path / "previous"), precision, fp16_supported)
    expected = "torch.float32" if precision == "fp32" else "torch.bfloat16"
    for rank, result in enumerate(results):
        assert result == {"differing": [], "dtypes": [expected]}, rank


ASAGI_WIDTH = ["model.projector.hidden_size=256"]  # twice the tiny LLM's width, as the released Asagi 8B / 14B


def _build_zero3_wide_projector(rank, world_size, previous):
    """On each rank: a random-init ZeRO-3 build with a projector of its own width (its gathered shapes and the
    spread of transformers' init, run by finish_partitioned after the build), then one from `previous`: whether each
    gathered projector tensor equals the file's."""
    from pathlib import Path

    import deepspeed

    from train.build import build_stage_model
    from train.models.llava import LLAVA
    from train.models.weights import safetensors_weights

    recipe, config = recipe_and_config(["stages.1.zero_stage=3", *ASAGI_WIDTH])
    torch.manual_seed(0)
    linear_1 = build_stage_model(LLAVA, recipe.model, config, recipe.stages[1], world_size,
                                 None).model.multi_modal_projector.linear_1
    with deepspeed.zero.GatheredParameters([linear_1.weight, linear_1.bias]):
        random = (tuple(linear_1.weight.shape), float(linear_1.weight.std()), float(linear_1.bias.abs().max()))
    model = build_stage_model(LLAVA, recipe.model, config, recipe.stages[1], world_size, Path(previous))
    params = dict(model.named_parameters())
    equal = {}
    for weight in safetensors_weights(Path(previous) / "model.safetensors"):
        if weight.name.startswith("model.multi_modal_projector."):
            with deepspeed.zero.GatheredParameters([params[weight.name]]):
                equal[weight.name] = torch.equal(params[weight.name].data, weight.read())
    return {"random": random, "equal": equal}


def test_zero3_builds_a_projector_of_its_own_width(tmp_path):
    write_stage_dir(tmp_path / "previous", ASAGI_WIDTH)
    for rank, result in enumerate(run_on_ranks(_build_zero3_wide_projector, str(tmp_path / "previous"))):
        shape, spread, bias = result["random"]
        assert shape == (256, 64) and 0.015 < spread < 0.025 and bias == 0.0, (rank, result)  # transformers' init
        assert len(result["equal"]) == 4 and all(result["equal"].values()), (rank, result)
