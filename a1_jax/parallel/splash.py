"""TPU splash attention (Pallas) behind `layers.attention(kernel="splash")`, split over the mesh with `shard_map`.

The kernel (`jax.experimental.pallas.ops.tpu.splash_attention`) takes `[heads, length, head_dim]`, does not scale q,
and needs every length to be a whole number of its blocks. This wrapper takes the models' `[batch, length, heads,
head_dim]` and keeps the result exact:
- q is scaled here (in fp32, cast back);
- lengths are padded to whole blocks (`_blocks`); padded keys are masked with segment ids (real keys 0, padding 1, every query
  0), padded query rows are computed and dropped;
- head_dim is zero-padded to a multiple of 128 (the TPU lane width, what the kernel is tuned for; TPU memory tiles
  pad a 64-wide minor axis to 128 anyway): zero features add nothing to `q·k`, and the zero columns of `v` give
  output columns that are dropped. Padding and slicing are linear, so gradients are exact.
Batch and heads merge into the kernel's one heads axis (all share the same full mask and segment ids).

Under an active mesh (`parallel.activate`) the kernel runs under `shard_map`: batch and heads are split as the
logical-axis rules place `batch` and `heads` (the layout `layers.split_heads` already gives q/k/v, so nothing moves),
and queries along `length` when a rule maps it (keys and values then gather whole: each query still sees every key).
A mesh axis that does not divide its dimension is left out of that dimension (those devices repeat the work rather
than fail). Each device runs the kernel on its own examples and heads.

Off TPU the kernel runs only in Pallas' interpret mode (`with splash.interpret():` or `interpret=True`); the CPU
tests use it.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as sa
from jax.sharding import PartitionSpec

from a1_jax.parallel import axes
from a1_jax.parallel.mesh import as_tuple, dividing_axes

# Largest query and key block: maxtext's default for long sequences (the 5B geometry's 18279 tokens: 36 x 512).
BLOCK = 512
_LANES = 128  # TPU lane width: block sizes and the padded head_dim are multiples of it

_interpret = False


@contextlib.contextmanager
def interpret(enabled: bool = True) -> Iterator[None]:
    """Runs splash attention traced inside this context in Pallas' interpret mode (any backend, slow)."""
    global _interpret
    previous, _interpret = _interpret, enabled
    try:
        yield
    finally:
        _interpret = previous


def on_tpu() -> bool:
    """Whether the program being traced runs on TPU: the active mesh's devices decide (so a CPU host compiling
    ahead of time for a TPU topology gets the TPU kernel), else the default backend."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return (device.platform if device is not None else jax.default_backend()) == "tpu"


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _blocks(length: int, block: int) -> tuple[int, int]:
    """(block size, padded length) for `length` tokens in blocks of at most `block`: as few blocks as possible, of
    equal size rounded up to 128, so padding stays under 128 per block (SigLIP's 729 tokens: 2 x 384, not 2 x 512)."""
    count = -(-length // block)
    size = _round_up(-(-length // count), _LANES)
    return size, count * size


def _local_kernel(q: jax.Array, k: jax.Array, v: jax.Array, *, keys: int, q_block: int, kv_block: int,
                  interpret: bool) -> jax.Array:
    """The kernel on one device's `[batch, heads, length, head_dim]` blocks; keys past `keys` are padding."""
    batch, heads, q_len, dim = q.shape
    kv_len = k.shape[2]
    # Separate dq and dk/dv backward kernels: the fused one keeps a [key blocks, heads, length, head_dim] buffer of
    # partial dq sums in the input dtype (bf16), 4.8 GB of temporaries per device instead of 1.0 GB for the 5B
    # geometry's attention (1 example x 24 heads per v5p chip; AOT compile).
    block_sizes = sa.BlockSizes(block_q=q_block, block_kv=kv_block, block_kv_compute=kv_block,
                                block_q_dkv=q_block, block_kv_dkv=kv_block, block_kv_dkv_compute=kv_block,
                                block_q_dq=q_block, block_kv_dq=kv_block, use_fused_bwd_kernel=False)
    mask = sa.MultiHeadMask([sa.FullMask((q_len, kv_len))] * (batch * heads))
    kernel = sa.make_splash_mha(mask, block_sizes=block_sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
    segment_ids = None
    if keys < kv_len:
        segment_ids = sa.SegmentIds(q=jnp.zeros((q_len,), jnp.int32),
                                    kv=(jnp.arange(kv_len) >= keys).astype(jnp.int32))
    merge = lambda x: x.reshape(batch * heads, *x.shape[2:])
    return kernel(merge(q), merge(k), merge(v), segment_ids=segment_ids).reshape(batch, heads, q_len, dim)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, block: int = BLOCK,
                     interpret: bool | None = None) -> jax.Array:
    """Softmax attention over `[batch, length, heads, head_dim]` (q) and `[batch, keys, heads, head_dim]` (k, v).

    `block`: the largest query/key block (a multiple of 128). `interpret`: Pallas interpret mode; default: on inside
    `splash.interpret()`, else off. Off TPU (`on_tpu()`) without interpret mode this is a ValueError.
    """
    interpret = _interpret if interpret is None else interpret
    if not interpret and not on_tpu():
        raise ValueError("the splash attention kernel runs on TPU only; use another attention kernel, or Pallas "
                         "interpret mode (splash.interpret()) to test it")
    if block % _LANES:
        raise ValueError(f"splash block size must be a multiple of {_LANES}, got {block}")
    batch, q_len, heads, dim = q.shape
    kv_len = k.shape[1]

    mesh = jax.sharding.get_abstract_mesh()
    batch_axes = head_axes = length_axes = ()
    if not mesh.empty:
        sizes = dict(mesh.shape)
        on_batch, on_length, on_heads = nn.logical_to_mesh_axes((axes.BATCH, axes.LENGTH, axes.HEADS),
                                                                nn.get_logical_axis_rules())
        batch_axes, head_axes = dividing_axes(batch, on_batch, sizes), dividing_axes(heads, on_heads, sizes)
        length_axes = tuple(a for a in as_tuple(on_length) if sizes[a] > 1)  # padding makes these divide
    q_shards = math.prod(mesh.shape[a] for a in length_axes)

    q_block, q_shard_padded = _blocks(-(-q_len // q_shards), block)
    kv_block, kv_padded = _blocks(kv_len, block)
    q_padded, dim_padded = q_shards * q_shard_padded, _round_up(dim, _LANES)
    layout = lambda x, length: jnp.pad(x.transpose(0, 2, 1, 3),
                                       ((0, 0), (0, 0), (0, length - x.shape[1]), (0, dim_padded - dim)))
    q = layout((q.astype(jnp.float32) * scale).astype(q.dtype), q_padded)
    k, v = layout(k, kv_padded), layout(v, kv_padded)

    local = lambda q, k, v: _local_kernel(q, k, v, keys=kv_len, q_block=q_block, kv_block=kv_block,
                                          interpret=interpret)
    if not mesh.empty:
        q_spec = PartitionSpec(batch_axes or None, head_axes or None, length_axes or None, None)
        kv_spec = PartitionSpec(batch_axes or None, head_axes or None, None, None)
        # check_vma=False: the kernel's pallas_calls declare their outputs without the mesh axes they vary over.
        local = jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec,
                              check_vma=False)
    return local(q, k, v)[:, :, :q_len, :dim].transpose(0, 2, 1, 3)
