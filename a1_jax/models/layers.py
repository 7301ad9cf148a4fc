"""Primitives shared by every model: attention dispatch, fp32 norms, Dense with logical axes, RoPE and
sinusoidal position/timestep encodings.

Numerics: norms and softmax run in fp32 whatever the compute dtype, then cast back; parameters are created in
`param_dtype` and cast to the compute `dtype` at use.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from a1_jax.parallel import axes, splash

Dtype = Any

# `nn.remat` policies by name, shared by every scanned model.
REMAT_POLICIES = {
    "none": None,  # keep every activation (inference, or memory to spare)
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block in the backward pass
    "dots_saveable": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs, recompute the elementwise rest
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep only weight matmuls, not attention
}

ATTENTION_KERNELS = ("auto", "xla", "cudnn", "blockwise", "splash")

# Query rows per block of the blockwise kernel: a 1024 x keys fp32 logits block stays cache-friendly on CPU.
_QUERY_BLOCK = 1024
# `auto` (off the cuDNN path) switches to the blockwise kernel from this many logits per (batch, head): below it
# the one-shot XLA kernel is as fast and its [B, N, T, S] logits are small.
_BLOCKWISE_MIN_LOGITS = 1 << 20


def _blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """Exact softmax attention, one (batch, head, query block) at a time: never materialises [B, N, T, S] logits.

    Every query row still sees all keys, so this is plain attention (not an online-softmax approximation of it);
    logits, softmax and accumulation are fp32.
    """
    batch, length, heads, dim = q.shape
    keys = k.shape[1]
    blocks = -(-length // _QUERY_BLOCK)
    block = -(-length // blocks)  # balanced blocks: at most `blocks - 1` padded rows
    per_head = lambda x, rows: x.transpose(0, 2, 1, 3).reshape(batch * heads, rows, dim)
    q_blocks = per_head(jnp.pad(q, ((0, 0), (0, blocks * block - length), (0, 0), (0, 0))), blocks * block)
    q_blocks = q_blocks.reshape(batch * heads, blocks, block, dim)

    def one_head(args: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
        qh, kh, vh = args

        def one_block(qb: jax.Array) -> jax.Array:
            logits = jnp.einsum("td,sd->ts", qb, kh, preferred_element_type=jnp.float32) * scale
            weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
            out = jnp.einsum("ts,sd->td", weights.astype(vh.dtype), vh, preferred_element_type=jnp.float32)
            return (out / jnp.sum(weights, axis=-1, keepdims=True)).astype(q.dtype)  # normalise T x D, not T x S

        return jax.lax.map(one_block, qh)

    out = jax.lax.map(one_head, (q_blocks, per_head(k, keys), per_head(v, keys)))
    return out.reshape(batch, heads, blocks * block, dim)[:, :, :length].transpose(0, 2, 1, 3)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, kernel: str = "auto",
              scale: float | None = None) -> jax.Array:
    """Bidirectional attention over `[batch, length, heads, head_dim]`; one dispatcher for every model.

    `auto`: on TPU the splash kernel; on GPU in half precision, cuDNN flash attention where it applies (XLA
    otherwise); elsewhere the blockwise kernel for long sequences (it never materialises `[B, N, T, S]` logits) and
    XLA for short ones. `xla`/`cudnn`/`blockwise`/`splash` force one (`splash` off TPU needs
    `parallel.splash.interpret()`). Softmax is fp32 in every kernel.
    """
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"unknown attention kernel {kernel!r}; choose from {ATTENTION_KERNELS}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if kernel == "auto" and splash.on_tpu():
        kernel = "splash"
    if kernel == "splash":
        return splash.splash_attention(q, k, v, scale=scale)  # heads split over the mesh under shard_map
    if kernel == "auto":
        if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
            return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=None)  # cuDNN, else XLA
        kernel = "blockwise" if q.shape[1] * k.shape[1] >= _BLOCKWISE_MIN_LOGITS else "xla"
    if kernel == "blockwise":
        return _blockwise_attention(q, k, v, scale)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=kernel)


def split_heads(x: jax.Array, heads: int) -> jax.Array:
    """`[batch, length, heads·head_dim]` -> `[batch, length, heads, head_dim]`, sharded like the attention inputs."""
    split = x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads)
    return nn.with_logical_constraint(split, (axes.BATCH, axes.LENGTH, axes.HEADS, None))


class LayerNorm(nn.Module):
    """LayerNorm computed in fp32 (torch semantics: biased variance, eps inside the sqrt), cast back."""

    epsilon: float = 1e-5
    use_scale: bool = True
    use_bias: bool = True
    param_dtype: Dtype = jnp.float32
    axis_name: str | None = axes.NORM

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
        features = x.shape[-1]
        init = nn.with_logical_partitioning
        if self.use_scale:
            y = y * self.param("scale", init(nn.initializers.ones, (self.axis_name,)), (features,),
                               self.param_dtype).astype(jnp.float32)
        if self.use_bias:
            y = y + self.param("bias", init(nn.initializers.zeros, (self.axis_name,)), (features,),
                               self.param_dtype).astype(jnp.float32)
        return y.astype(dtype)


def dense(features: int, logical_axes: Sequence[str | None], *, use_bias: bool = True, dtype: Dtype = None,
          param_dtype: Dtype = jnp.float32, name: str | None = None,
          kernel_init: Any = nn.initializers.lecun_normal()) -> nn.Dense:
    """`nn.Dense` whose kernel carries `logical_axes` (input, output) and bias the output axis."""
    init = nn.with_logical_partitioning
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
                    kernel_init=init(kernel_init, tuple(logical_axes)),
                    bias_init=init(nn.initializers.zeros, (logical_axes[-1],)))


# --- Position and timestep encodings -------------------------------------------------------------------------------
# Tables that depend only on static geometry are built with NumPy at trace time (they become constants of the
# compiled program); anything that depends on traced values (timesteps) is computed with jnp in fp32.


def timestep_embedding(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
                       max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of (possibly fractional) timesteps `[batch]` -> `[batch, dim]` in fp32.

    Frequencies `exp(-ln(max_period) * k / (dim/2 - freq_shift))`; `[sin, cos]`, or `[cos, sin]` when flipped (the
    CogVideoX order). An odd `dim` gets one zero column, as diffusers pads it.
    """
    half = dim // 2
    exponent = -jnp.log(jnp.float32(max_period)) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    angles = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    parts = [jnp.cos(angles), jnp.sin(angles)] if flip_sin_to_cos else [jnp.sin(angles), jnp.cos(angles)]
    if dim % 2:
        parts.append(jnp.zeros_like(angles[:, :1]))
    return jnp.concatenate(parts, axis=-1)


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """`[sin | cos]` embedding of `positions` `[n]` -> `[n, dim]`, frequencies `1/10000^(k/(dim/2))`, in float64."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding width must be even, got {dim}")
    omega = 1.0 / 10000.0 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(np.asarray(positions, np.float64).reshape(-1), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_3d(dim: int, frames: int, height: int, width: int, *, spatial_scale: float = 1.0,
              temporal_scale: float = 1.0) -> np.ndarray:
    """3-D sin-cos table `[frames*height*width, dim]` in (frame, row, col) order, float64.

    The first quarter of the width encodes time; the other three quarters encode space, their first half from the
    column coordinate and their second half from the row coordinate (the layout of CogVideoX's table).
    """
    if dim % 16:
        raise ValueError(f"3-D sin-cos embedding width must be divisible by 16, got {dim}")
    spatial, temporal = 3 * dim // 4, dim // 4
    rows, cols = np.meshgrid(np.arange(height, dtype=np.float32) / np.float32(spatial_scale),
                             np.arange(width, dtype=np.float32) / np.float32(spatial_scale), indexing="ij")
    space = np.concatenate([sincos_1d(spatial // 2, cols), sincos_1d(spatial // 2, rows)], axis=1)  # [h*w, 3d/4]
    time = sincos_1d(temporal, np.arange(frames, dtype=np.float32) / np.float32(temporal_scale))  # [f, d/4]
    time = np.broadcast_to(time[:, None, :], (frames, height * width, temporal))
    space = np.broadcast_to(space[None], (frames, height * width, spatial))
    return np.concatenate([time, space], axis=-1).reshape(frames * height * width, dim)


def rope_1d(dim: int, positions: np.ndarray, theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """RoPE cos/sin `[n, dim]` for `positions` `[n]`, each frequency repeated for its (even, odd) feature pair.

    Computed in float32 like the reference, so the tables agree with it to the last bit or two.
    """
    if dim % 2:
        raise ValueError(f"RoPE width must be even, got {dim}")
    freqs = np.float32(1.0) / np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    angles = np.outer(np.asarray(positions, np.float32), freqs).astype(np.float32)
    return np.repeat(np.cos(angles), 2, axis=1), np.repeat(np.sin(angles), 2, axis=1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates adjacent feature pairs `(x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin)` in fp32, cast back.

    `x`: `[..., length, heads, head_dim]`; `cos`/`sin`: `[length, head_dim]` (pair-repeated, as `rope_1d` makes them).
    A row with cos=1, sin=0 leaves its token exactly unchanged.
    """
    dtype = x.dtype
    x = x.astype(jnp.float32)
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    cos, sin = cos[:, None, :].astype(jnp.float32), sin[:, None, :].astype(jnp.float32)
    return (x * cos + rotated * sin).astype(dtype)
