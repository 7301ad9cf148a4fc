"""The rule-table importer and the NumPy safetensors reader, on small hand-made checkpoints."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from a1_jax.errors import UserError
from a1_jax.weights import CONV3D, LINEAR, Rule, import_params, open_checkpoint, plan_import

RULES = [
    Rule(r"proj\.weight", "proj/kernel", LINEAR),
    Rule(r"proj\.bias", "proj/bias"),
    Rule(r"blocks\.(?P<layer>\d+)\.fc\.weight", "blocks/fc/kernel", LINEAR, stack="layer"),
    Rule(r"conv\.weight", "conv/kernel", CONV3D),
]
TARGET = {
    "proj": {"kernel": jax.ShapeDtypeStruct((4, 3), jnp.float32), "bias": jax.ShapeDtypeStruct((3,), jnp.float32)},
    "blocks": {"fc": {"kernel": jax.ShapeDtypeStruct((2, 5, 6), jnp.float32)}},
    "conv": {"kernel": jax.ShapeDtypeStruct((3, 3, 3, 2, 8), jnp.float32)},
}


def _state(rng):
    return {
        "proj.weight": rng.standard_normal((3, 4)).astype(np.float32),
        "proj.bias": rng.standard_normal(3).astype(np.float32),
        "blocks.1.fc.weight": rng.standard_normal((6, 5)).astype(np.float32),
        "blocks.0.fc.weight": rng.standard_normal((6, 5)).astype(np.float32),
        "conv.weight": rng.standard_normal((8, 2, 3, 3, 3)).astype(np.float32),
    }


def test_import_transposes_and_stacks_in_index_order():
    state = _state(np.random.default_rng(0))
    params = import_params(state, RULES, TARGET)
    np.testing.assert_array_equal(params["proj"]["kernel"], state["proj.weight"].T)
    np.testing.assert_array_equal(params["blocks"]["fc"]["kernel"][0], state["blocks.0.fc.weight"].T)
    np.testing.assert_array_equal(params["blocks"]["fc"]["kernel"][1], state["blocks.1.fc.weight"].T)
    np.testing.assert_array_equal(params["conv"]["kernel"], state["conv.weight"].transpose(2, 3, 4, 1, 0))


@pytest.mark.parametrize("edit, words", [
    (lambda s: s.pop("proj.bias"), ["1 missing", "proj/bias"]),
    (lambda s: s.pop("blocks.1.fc.weight"), ["blocks/fc/kernel layers [1]"]),
    (lambda s: s.update({"extra.weight": np.zeros(2)}), ["1 unexpected", "extra.weight"]),
    (lambda s: s.update({"blocks.2.fc.weight": np.zeros((6, 5))}), ["unexpected", "blocks.2.fc.weight"]),
    (lambda s: s.update({"proj.weight": np.zeros((3, 5))}), ["mis-shaped", "proj.weight", "(5, 3)", "(4, 3)"]),
])
def test_every_mismatch_is_a_user_error_naming_the_tensor(edit, words):
    state = _state(np.random.default_rng(0))
    edit(state)
    with pytest.raises(UserError) as info:
        import_params(state, RULES, TARGET)
    for word in words:
        assert word in str(info.value)


def test_skip_list_is_explicit_and_reported():
    state = _state(np.random.default_rng(0)) | {"head.weight": np.zeros(1)}
    plan = plan_import({k: v.shape for k, v in state.items()}, RULES, TARGET, skip=[r"head\..*"])
    assert plan.skipped == ["head.weight"]


def test_safetensors_single_sharded_and_bf16(tmp_path):
    rng = np.random.default_rng(1)
    state = _state(rng)
    bf16 = rng.standard_normal((2, 3)).astype(ml_dtypes.bfloat16)
    # Two shards plus an index, the layout diffusers' save_pretrained writes for large models.
    names = sorted(state)
    shards = {"m-00001-of-00002.safetensors": names[:2], "m-00002-of-00002.safetensors": names[2:]}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(tmp_path / file))
    index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps(index))
    checkpoint = open_checkpoint(tmp_path)
    assert sorted(checkpoint) == names
    params = import_params(checkpoint, RULES, TARGET)
    np.testing.assert_array_equal(params["proj"]["bias"], state["proj.bias"])

    # bf16 is written by hand: NumPy's safetensors writer has no bf16.
    raw = bf16.tobytes()
    header = json.dumps({"x": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, len(raw)]}}).encode()
    single = tmp_path / "single" / "w.safetensors"
    single.parent.mkdir()
    single.write_bytes(len(header).to_bytes(8, "little") + header + raw)
    loaded = open_checkpoint(single.parent)["x"]
    assert loaded.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(loaded, bf16)


def test_checkpoint_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        open_checkpoint(tmp_path / "nope")
    with pytest.raises(UserError, match="expected one"):
        open_checkpoint(tmp_path)
    (tmp_path / "bad.safetensors").write_bytes(b"\x05")
    with pytest.raises(UserError, match="not a readable safetensors"):
        open_checkpoint(tmp_path)


def test_random_init_draws_each_parameter_as_its_module_would_seeded_by_path():
    """`init_params` fills the networks on the host with NumPy (no compiled init): the modules' tree, shapes and
    dtypes; zeros, ones and the DiT's sin-cos position start exactly as the modules make them; random leaves with
    the modules' standard deviations (checked against flax's own init of SigLIP); the same seed, the same values."""
    import dataclasses

    from flax.core import meta

    from a1_jax.models import dit
    from a1_jax.parity.pipeline import SMALL_DIT
    from a1_jax.weights import checkpoint

    tiny = checkpoint.ModelConfigs.from_folder(checkpoint.model_config_folder("tiny"))
    configs = dataclasses.replace(tiny, transformer=SMALL_DIT)  # learned positions, as the 5B
    networks = checkpoint.build_networks(configs)
    params, again, other = (checkpoint.init_params(networks, seed) for seed in (0, 0, 1))
    abstract = meta.unbox(checkpoint.abstract_params(networks))
    assert jax.tree.structure(params) == jax.tree.structure(abstract)
    for value, shape in zip(jax.tree.leaves(params), jax.tree.leaves(abstract)):
        assert value.shape == shape.shape and value.dtype == shape.dtype
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)))
    kernels = [(a, b) for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(other))
               if "kernel" in jax.tree_util.keystr(path)]
    assert kernels and not any(np.array_equal(a, b) for a, b in kernels)
    table = params["transformer"]["patch_embed"]["pos_embedding"]
    np.testing.assert_array_equal(table, dit.learned_position_start(SMALL_DIT, table.shape[-1]).astype(np.float32))

    siglip = networks.siglip
    pixels = jnp.zeros((1, siglip.config.image_size, siglip.config.image_size, 3))
    flax_init = jax.jit(lambda key: meta.unbox(siglip.init(key, pixels))["params"])(jax.random.key(0))
    for (path, theirs), ours in zip(jax.tree_util.tree_flatten_with_path(flax_init)[0],
                                    jax.tree.leaves(params["siglip"])):
        theirs, ours = np.asarray(theirs), np.asarray(ours)
        if np.ptp(theirs) == 0:  # zeros, ones
            np.testing.assert_array_equal(ours, theirs, err_msg=jax.tree_util.keystr(path))
        else:
            assert abs(ours.std() / theirs.std() - 1) < 0.1, (jax.tree_util.keystr(path), ours.std(), theirs.std())
            assert abs(ours.mean()) < 0.2 * ours.std()
