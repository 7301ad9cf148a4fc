"""Logical-axis sharding of the DiT on 8 simulated CPU devices: presets, partition specs, sharded == single device."""

import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from a1_jax.config import DiTConfig
from a1_jax.errors import UserError
from a1_jax.models import dit
from a1_jax.parallel import activate, axes, load_preset, logical_sharding, logical_specs, make_mesh, shard, shardings
from a1_jax.parity import dit as dit_parity

REPO = pathlib.Path(__file__).resolve().parents[1]
VOCABULARY = {getattr(axes, name) for name in dir(axes) if name.isupper()} - {None}


def test_presets_resolve_the_free_axis():
    assert jax.device_count() == 8
    mesh = make_mesh(load_preset("fsdp_tensor"))
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2, "sequence": 1}
    assert dict(make_mesh(load_preset("fsdp")).shape)["fsdp"] == 8
    assert make_mesh(load_preset("single"), jax.devices()[:1]).size == 1
    with pytest.raises(UserError, match="does not divide"):
        make_mesh(load_preset("fsdp_tensor"), jax.devices()[:3])
    with pytest.raises(UserError, match="unknown mesh preset"):
        load_preset("no_such_preset")


def test_bad_preset_is_a_user_error(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"mesh": {"data": 1, "fsdp": -1, "tensor": 1, "sequence": 1},
                                "rules": [["embed", "model"]]}))
    with pytest.raises(UserError, match="unknown mesh axes"):
        load_preset(path)


def test_every_5b_parameter_has_logical_axes_that_shard_evenly():
    """All 5B leaves are annotated from the vocabulary; under fsdp=4 x tensor=2 every sharded dim divides."""
    config = DiTConfig.from_json(REPO / "configs" / "dit_5b.json")
    boxed = dit.abstract_params(dit.DiT(config), dit.example_inputs(config))
    specs = logical_specs(boxed)  # raises if any leaf carries no logical names
    names = {name for spec in jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
             for name in spec if name is not None}
    assert names <= VOCABULARY, names - VOCABULARY
    assert specs["blocks"]["attn"]["to_q"]["kernel"] == PartitionSpec(axes.LAYERS, axes.EMBED, axes.HEADS)
    mesh = make_mesh(load_preset("fsdp_tensor"))
    rules = load_preset("fsdp_tensor").rules
    placed = shardings(boxed, mesh, rules)
    for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(nn.meta.unbox(boxed)),
                                      jax.tree_util.tree_leaves(placed)):
        for size, mesh_axes in zip(leaf.shape, sharding.spec):
            ways = int(np.prod([mesh.shape[a] for a in np.atleast_1d(mesh_axes)])) if mesh_axes else 1
            assert size % ways == 0, (jax.tree_util.keystr(path), leaf.shape, sharding.spec)
    assert placed["blocks"]["ff"]["proj_in"]["kernel"].spec == PartitionSpec(None, "fsdp", "tensor")


def test_unannotated_parameter_is_refused():
    class Bare(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(x)

    boxed = jax.eval_shape(Bare().init, jax.random.key(0), jnp.ones((1, 2)))["params"]
    with pytest.raises(ValueError, match="without logical axis names"):
        logical_specs(boxed)


def test_sharded_forward_equals_single_device():
    """fsdp=4 x tensor=2: params by logical axes, batch over fsdp, activations constrained inside the model."""
    with open(REPO / "configs" / "dit_tiny.json") as f:
        config = DiTConfig(**{k: v for k, v in json.load(f).items() if not k.startswith("_")})
    model = dit.DiT(config)
    inputs = dit_parity.random_inputs(config, batch=4, seed=0)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), *inputs)["params"])
    expected = jax.jit(model.apply)({"params": params}, *inputs)

    preset = load_preset("fsdp_tensor")
    mesh = make_mesh(preset)
    boxed = dit.abstract_params(model, tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in inputs))
    param_shardings = shardings(boxed, mesh, preset.rules)
    input_shardings = tuple(logical_sharding((axes.BATCH,) + (None,) * (x.ndim - 1), mesh, preset.rules)
                            for x in inputs)
    sharded_params = shard(params, param_shardings)
    sharded_inputs = shard(inputs, input_shardings)
    assert sharded_params["blocks"]["attn"]["to_q"]["kernel"].sharding.spec == PartitionSpec(None, "fsdp", "tensor")
    with activate(mesh, preset.rules):
        forward = jax.jit(model.apply, in_shardings=({"params": param_shardings}, *input_shardings),
                          out_shardings=input_shardings[0])
        got = forward({"params": sharded_params}, *sharded_inputs)
        hlo = forward.lower({"params": sharded_params}, *sharded_inputs).as_text()
    assert len(got.sharding.device_set) == 8
    assert "sharding_constraint" in hlo  # activation constraints reached the program, not only argument shardings
    scale = float(jnp.max(jnp.abs(expected)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=0, atol=1e-5 * scale)
