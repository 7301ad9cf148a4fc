"""Primitives shared by every model: attention dispatch, fp32 norms, Dense/Conv with logical axes.

Numerics: norms and softmax run in fp32 whatever the compute dtype, then cast back; parameters are created in
`param_dtype` and cast to the compute `dtype` at use.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from a1_jax.parallel import axes

Dtype = Any

ATTENTION_KERNELS = ("auto", "xla", "cudnn", "splash")


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, kernel: str = "auto",
              scale: float | None = None) -> jax.Array:
    """Bidirectional attention over `[batch, length, heads, head_dim]`; one dispatcher for every model.

    `auto`: cuDNN flash attention on GPU where it applies, XLA otherwise. `xla`/`cudnn` force one.
    `splash`: the TPU splash kernel (hook: wired when TPU support lands).
    """
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"unknown attention kernel {kernel!r}; choose from {ATTENTION_KERNELS}")
    if kernel == "splash":
        raise NotImplementedError("the TPU splash-attention kernel is not wired yet; use 'auto' or 'xla'")
    implementation = {"auto": None, "xla": "xla", "cudnn": "cudnn"}[kernel]
    if kernel == "auto" and not (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)):
        implementation = "xla"  # cuDNN wants half precision on GPU; fp32 and CPU take the XLA path
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=implementation)


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
