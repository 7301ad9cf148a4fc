"""The TPU splash-attention kernel against the XLA kernel on CPU, through Pallas' interpret mode.

fp32. Error = `max|Δ| / max|reference|` of the attention output and of its gradients w.r.t. q, k and v. Splash is
held to 1e-6 (about 8 fp32 ulps of the largest entry) against a float64 NumPy reference, and to 2e-6 against the
fp32 XLA kernel: both fp32 kernels are within 1e-6 of the float64 truth (measured: splash ≤ 8.6e-7, XLA ≤ 4.7e-7;
they sum differently: splash block by block with an online softmax), so they are within 2e-6 of each other.
Lengths are not multiples of the 128 block, so padded keys must be masked; head_dim 72 (SigLIP) and 64 (DiT) are
padded to 128.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from a1_jax.config import DiTConfig
from a1_jax.models import dit, layers
from a1_jax.parallel import activate, axes, load_preset, logical_sharding, make_mesh, shard, shardings, splash
from a1_jax.parity import dit as dit_parity

REPO = pathlib.Path(__file__).resolve().parents[1]
TO_FLOAT64 = 1e-6
TO_XLA = 2e-6


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def random_qkv(batch, length, heads, head_dim, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((batch, length, heads, head_dim)), jnp.float32) for _ in range(3))


def loss_weights(shape):
    """Weights of the scalar loss `sum(sin(out) * w)`: every output element counts differently (a plain sum would
    hide layout errors)."""
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape) / np.prod(shape)


def loss_of(attend):
    return lambda q, k, v: jnp.sum(jnp.sin(attend(q, k, v)) * loss_weights(q.shape))


def xla_attention(q, k, v):
    return layers.attention(q, k, v, kernel="xla")


def float64_attention(q, k, v):
    """Softmax attention (scale head_dim^-1/2) and the gradients of `loss_of` w.r.t. q, k, v, in float64 NumPy."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    scale = q.shape[-1] ** -0.5
    logits = np.einsum("bqnd,bknd->bnqk", q, k) * scale
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.einsum("bnqk,bknd->bqnd", p, v)
    d_out = np.cos(out) * loss_weights(out.shape)
    d_p = np.einsum("bqnd,bknd->bnqk", d_out, v)
    d_logits = p * (d_p - np.sum(d_p * p, axis=-1, keepdims=True))
    return out, (np.einsum("bnqk,bknd->bqnd", d_logits, k) * scale,
                 np.einsum("bnqk,bqnd->bknd", d_logits, q) * scale, np.einsum("bnqk,bqnd->bknd", p, d_out))


def assert_matches_xla(attend, q, k, v, *inputs_placed):
    """Forward and d/d(q, k, v) of `attend` on `inputs_placed` (default q, k, v) equal the XLA kernel's and the
    float64 truth within the stated tolerances."""
    placed = inputs_placed or (q, k, v)
    got = jax.jit(attend)(*placed)
    grads = jax.jit(jax.grad(loss_of(attend), argnums=(0, 1, 2)))(*placed)
    xla = (xla_attention(q, k, v), jax.grad(loss_of(xla_attention), argnums=(0, 1, 2))(q, k, v))
    truth = float64_attention(q, k, v)
    for name, g, x, t in zip(("out", "dq", "dk", "dv"), (got, *grads), (xla[0], *xla[1]), (truth[0], *truth[1])):
        assert rel_err(g, t) <= TO_FLOAT64, name
        assert rel_err(g, x) <= TO_XLA, name
    return got


@pytest.fixture
def local_shapes(monkeypatch):
    """Records the q and k shapes each device's kernel call sees (at trace time)."""
    seen = []
    original = splash._local_kernel

    def spy(q, k, v, **kw):
        seen.append((q.shape, k.shape))
        return original(q, k, v, **kw)

    monkeypatch.setattr(splash, "_local_kernel", spy)
    return seen


def test_splash_matches_xla_with_padded_length_and_head_dim(local_shapes):
    """No mesh: 300 tokens in 128-blocks (3 blocks, 84 padded keys), head_dim 72 -> 128, batch·heads merged."""
    q, k, v = random_qkv(batch=2, length=300, heads=2, head_dim=72)
    with splash.interpret():
        assert_matches_xla(lambda q, k, v: splash.splash_attention(q, k, v, scale=72 ** -0.5, block=128), q, k, v)
    assert local_shapes[0] == ((2, 2, 384, 128), (2, 2, 384, 128))


def test_splash_heads_shard_over_tensor_under_shard_map(local_shapes):
    """fsdp=4 x tensor=2: each device runs the kernel on its 1 example and 2 of the 4 heads; result as XLA's."""
    preset = load_preset("fsdp_tensor")
    mesh = make_mesh(preset)
    q, k, v = random_qkv(batch=4, length=200, heads=4, head_dim=64, seed=1)
    placement = logical_sharding((axes.BATCH, axes.LENGTH, axes.HEADS, None), mesh, preset.rules)
    with splash.interpret(), activate(mesh, preset.rules):
        got = assert_matches_xla(lambda q, k, v: layers.attention(q, k, v, kernel="splash"), q, k, v,
                                 *shard((q, k, v), (placement,) * 3))
    assert local_shapes[0] == ((1, 2, 256, 128), (1, 2, 256, 128))
    assert got.sharding.spec == placement.spec and len(got.sharding.device_set) == 8


def test_splash_shards_queries_over_sequence_and_replicates_an_uneven_batch(local_shapes, tmp_path):
    """length -> sequence: each device takes half the (padded) queries and all keys. A batch of 3 does not divide
    fsdp=2, so it stays whole on every device instead of failing."""
    path = tmp_path / "seq.json"
    path.write_text(json.dumps({"mesh": {"data": 1, "fsdp": 2, "tensor": 2, "sequence": 2},
                                "rules": [["batch", ["data", "fsdp"]], ["heads", "tensor"], ["length", "sequence"]]}))
    preset = load_preset(path)
    mesh = make_mesh(preset)
    q, k, v = random_qkv(batch=3, length=200, heads=4, head_dim=64, seed=2)
    with splash.interpret(), activate(mesh, preset.rules):
        attend = jax.jit(lambda q, k, v: splash.splash_attention(q, k, v, scale=0.125, block=128))
        got = attend(q, k, v)
    assert local_shapes[0] == ((3, 2, 128, 128), (3, 2, 256, 128))
    assert rel_err(got, xla_attention(q, k, v)) <= TO_XLA
    assert rel_err(got, float64_attention(q, k, v)[0]) <= TO_FLOAT64


def test_splash_dit_forward_and_gradient_equal_xla():
    """The tiny DiT, scanned and fully rematerialised, on fsdp=4 x tensor=2: splash (interpret) == xla, forward and
    parameter gradients within TO_XLA (measured: 1.5e-7 forward, 6.5e-7 worst gradient leaf)."""
    config = DiTConfig.from_json(REPO / "configs" / "dit_tiny.json")
    inputs = dit_parity.random_inputs(config, batch=4, seed=0)
    preset = load_preset("fsdp_tensor")
    mesh = make_mesh(preset)
    models = {kernel: dit.DiT(config, remat="full", attention_kernel=kernel) for kernel in ("xla", "splash")}
    boxed = dit.abstract_params(models["xla"], tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in inputs))
    params = shard(jax.tree_util.tree_map(lambda x: x.value, jax.jit(models["xla"].init)(
        jax.random.key(0), *inputs)["params"], is_leaf=lambda x: hasattr(x, "value")),
        shardings(boxed, mesh, preset.rules))
    results = {}
    with splash.interpret(), activate(mesh, preset.rules):
        for kernel, model in models.items():
            def loss(p, model=model):
                out = model.apply({"params": p}, *inputs)
                return jnp.mean(jnp.square(out)), out

            results[kernel] = jax.jit(jax.grad(loss, has_aux=True))(params)
    (grads, out), (want_grads, want_out) = results["splash"], results["xla"]
    assert rel_err(out, want_out) <= TO_XLA
    errors = jax.tree_util.tree_map(rel_err, grads, want_grads)
    assert max(jax.tree_util.tree_leaves(errors)) <= TO_XLA, errors


def test_auto_kernel_is_splash_on_tpu(monkeypatch):
    calls = []
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    monkeypatch.setattr(splash, "splash_attention", lambda q, k, v, scale: calls.append(scale) or q)
    q = jnp.ones((1, 4, 2, 64))
    layers.attention(q, q, q)
    assert calls == [0.125]


def test_splash_off_tpu_needs_interpret_mode():
    q = jnp.ones((1, 4, 2, 64))
    with pytest.raises(ValueError, match="runs on TPU only"):
        layers.attention(q, q, q, kernel="splash")
