"""CogVideoX causal 3D VAE (`AutoencoderKLCogVideoX`), also the pose guider's architecture.

Public layout is channels-last: videos are `[batch, frames, height, width, 3]` in [-1, 1], latents
`[batch, latent_frames, height / 8, width / 8, latent_channels]` (5B geometry). Multiply a latent by
`config.scaling_factor` before the DiT and divide by it before `decode`, as the reference pipeline does.

Numerics follow diffusers' `AutoencoderKLCogVideoX` (installed 0.42.1; identical in these paths to 0.32.2):

* Causal convolutions pad time with k-1 copies of the first frame, or with the last k-1 (padded) input frames of the
  previous chunk (the "conv cache"); space is zero-padded.
* The encoder sees 8-frame chunks (the first one 8 + T mod 8), the decoder 2-latent-frame chunks (first 2 + T mod 2).
  GroupNorm statistics are per chunk, so this chunking is part of the function, not an optimisation. The model's
  methods run one chunk (`x, cache -> y, cache`); `encode` / `decode` below drive the chunks from Python, one jitted
  call each, so peak memory is one chunk's whatever the video length and only two chunk shapes (first, steady) are
  ever compiled.
* Optional spatial tiling (`tiling=True`) reproduces `enable_tiling()`: overlapping tiles, one at a time, each with
  its own frame chunking, blended with linear ramps against already-blended neighbours, then cropped. Tiling changes
  the numbers (GroupNorm statistics are per tile), and the release tiles. `tiling="auto"` tiles only when one
  untiled frame chunk would exceed `TILING_BUDGET_BYTES` per activation: the 5B VAE at the release's 480x720 canvas
  tiles as the release does (84 MiB for one bf16 frame), the tiny one runs untiled (a 9-frame decoder chunk is
  47 MiB in fp32: a third less work than its 9 overlapping tiles, and one compiled program per chunk shape instead
  of four). Parity checks pass `tiling=True` or `False` explicitly.
* GroupNorm runs in fp32 whatever the compute `dtype`; parameters are created in `param_dtype`, used in `dtype`.
"""

from __future__ import annotations

import functools
import operator
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from a1_jax.config import VAEConfig
from a1_jax.parallel import axes

Dtype = Any
Cache = Any  # nested dict of [batch, k-1, height, width, channels] arrays, one per causal 3x3x3 conv

ENCODE_CHUNK_FRAMES = 8  # diffusers num_sample_frames_batch_size
DECODE_CHUNK_FRAMES = 2  # diffusers num_latent_frames_batch_size
TILE_OVERLAP_HEIGHT = 1 / 6  # diffusers tile_overlap_factor_height
TILE_OVERLAP_WIDTH = 1 / 5  # diffusers tile_overlap_factor_width
LOGVAR_RANGE = (-30.0, 20.0)
TILING_BUDGET_BYTES = 64 * 2 ** 20  # tiling="auto": the largest activation one untiled frame chunk may have


# ----------------------------------------------------------------------------------------------------------------
# Pure helpers


def resize_nearest(x: jax.Array, size: tuple[int, int, int]) -> jax.Array:
    """Nearest resize of `[B, T, H, W, C]` to `size` (T, H, W) with torch's index rule floor(i * in / out)."""
    for axis, out in zip((1, 2, 3), size):
        n = x.shape[axis]
        if n == out:
            continue
        scale = np.float32(n / out)  # torch computes the ratio and the product in fp32
        index = np.minimum(np.floor(np.arange(out, dtype=np.float32) * scale).astype(np.int64), n - 1)
        if out % n == 0 and np.array_equal(index, np.arange(out) // (out // n)):
            x = jnp.repeat(x, out // n, axis=axis)  # the same rows; a broadcast is cheaper than a gather
        else:
            x = jnp.take(x, index, axis=axis)
    return x


def upsampled_conv_kernels(kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A 3x3 kernel `[3, 3, in, out]` (padding 1) -> per output row parity, the 3x3 kernel `[3, 3, in, 2 * out]` that,
    on the input itself, makes the two column phases (column parity, out) of that conv on the input's nearest x2
    upsample.

    Output row 2i reads upsampled rows 2i-1, 2i, 2i+1 = input rows i-1, i, i (taps w0, w1 + w2); row 2i+1 reads input
    rows i, i, i+1 (taps w0 + w1, w2); columns alike; zero padding of the upsample is zero padding of the input. The
    same function at 1/4 of the pixels with no upsampled copy (exact up to the rounding of the summed taps, in fp32)."""
    def phase_taps(w: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:  # taps over input offsets -1, 0, +1
        w0, w1, w2 = (jnp.take(w, i, axis=axis) for i in range(3))
        zero = jnp.zeros_like(w0)
        return jnp.stack([w0, w1 + w2, zero], axis=axis), jnp.stack([zero, w0 + w1, w2], axis=axis)

    def columns(row: jax.Array) -> jax.Array:  # [3, 3, in, out] -> [3, 3, in, 2 * out], (column parity, out)
        return jnp.concatenate(phase_taps(row, 1), axis=-1).astype(kernel.dtype)

    return tuple(columns(row) for row in phase_taps(kernel.astype(jnp.float32), 0))


def conv_of_upsampled(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """The 3x3 conv (padding 1) of the nearest x2 upsample of frames `[N, H, W, in]`, `[N, 2H, 2W, out]`, computed on
    `x` (`upsampled_conv_kernels`). Each row parity's (column parity, out) channels are its output rows already (a
    reshape); the two parities interleave as whole rows (no per-pixel transpose, which XLA:CPU ran at <1 GB/s)."""
    n, h, w, _ = x.shape
    rows = [jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
            for k in upsampled_conv_kernels(kernel)]
    out = kernel.shape[-1]
    return jnp.stack([r.reshape(n, h, 2 * w, out) for r in rows], axis=2).reshape(n, 2 * h, 2 * w, out)


def chunk_sizes(frames: int, chunk: int) -> tuple[int, int, int]:
    """diffusers' frame batching: (first chunk, size of each later chunk, number of later chunks).

    `max(T // chunk, 1)` batches; the first takes the remainder too, so T = first + rest * count.
    """
    batches = max(frames // chunk, 1)
    if batches == 1:
        return frames, chunk, 0
    first = chunk + frames % chunk
    return first, chunk, batches - 1


def decoded_frames(latent_frames: int, config: VAEConfig) -> int:
    """Frames the decoder makes of `latent_frames` in one chunk (odd: frame 0 is not stretched in time)."""
    ratio = 2 ** config.temporal_compress_level
    return 1 + (latent_frames - 1) * ratio if latent_frames % 2 else latent_frames * ratio


def decoding_prefix(latent_frames: int, frames: int, config: VAEConfig) -> int:
    """The fewest leading latents of `latent_frames` whose decode is exactly the first `frames` frames of decoding
    them all: a prefix that ends on one of the full decode's chunk boundaries (GroupNorm statistics and the causal
    conv cache are per chunk, so a prefix chunked differently would be another function). All of them if none is
    enough."""
    first, size, count = chunk_sizes(latent_frames, DECODE_CHUNK_FRAMES)
    for end in (first + size * i for i in range(count + 1)):
        if decoded_frames(first, config) + (end - first) // size * decoded_frames(size, config) >= frames:
            return end
    return latent_frames


def chunk_activation_bytes(config: VAEConfig, frames: int, height: int, width: int, dtype: Dtype) -> int:
    """The largest activation of one untiled chunk of `frames` pixel frames at height x width (an upper bound: every
    level's width at that level's resolution, before time compression)."""
    widest = max(channels * frames * -(-height // 2 ** i) * -(-width // 2 ** i)
                 for i, channels in enumerate(config.block_out_channels))
    return widest * jnp.dtype(dtype).itemsize


def _blend_weights(extent: int, axis: int) -> jax.Array:
    """Linear ramp y / extent (y = 0 .. extent-1), shaped to broadcast along `axis` of a [B, T, H, W, C] array."""
    ramp = np.array([y / extent for y in range(extent)], dtype=np.float64).astype(np.float32)
    shape = [1] * 5
    shape[axis] = extent
    return jnp.asarray(ramp.reshape(shape))


def blend(previous: jax.Array, tile: jax.Array, extent: int, axis: int) -> jax.Array:
    """Fades the last `extent` rows/columns of `previous` into the first of `tile` (diffusers blend_v / blend_h)."""
    extent = min(previous.shape[axis], tile.shape[axis], extent)
    if extent <= 0:
        return tile
    w = _blend_weights(extent, axis).astype(tile.dtype)
    head = jax.lax.slice_in_dim(tile, 0, extent, axis=axis)
    tail = jax.lax.slice_in_dim(previous, previous.shape[axis] - extent, previous.shape[axis], axis=axis)
    mixed = tail * (1 - w) + head * w
    return jax.lax.concatenate([mixed, jax.lax.slice_in_dim(tile, extent, tile.shape[axis], axis=axis)], axis)


def tile_plan(tile_in: tuple[int, int], tile_out: tuple[int, int]) -> dict[str, tuple[int, int]]:
    """`tiled` arguments for input tiles `tile_in` that map to output tiles `tile_out` (diffusers' arithmetic:
    strides from the input tile and the overlap factors, blend extents and crops from the output tile)."""
    overlap = (TILE_OVERLAP_HEIGHT, TILE_OVERLAP_WIDTH)
    blend_extent = tuple(int(t * f) for t, f in zip(tile_out, overlap))
    return {"tile": tile_in, "stride": tuple(int(t * (1 - f)) for t, f in zip(tile_in, overlap)),
            "blend_extent": blend_extent, "keep": tuple(t - b for t, b in zip(tile_out, blend_extent))}


def tiled(fn: Callable[[jax.Array], jax.Array], x: jax.Array, tile: tuple[int, int], stride: tuple[int, int],
          blend_extent: tuple[int, int], keep: tuple[int, int]) -> jax.Array:
    """diffusers' tiled_encode/tiled_decode over [B, T, H, W, C]: `fn` per overlapping tile, blended, cropped.

    Tiles start every `stride` in the input and run one at a time (so memory is one tile's); outputs are blended
    against the tile above and then the tile to the left, both already blended (diffusers mutates them in place),
    and each keeps its top-left `keep` rows/columns.
    """
    height, width = x.shape[2], x.shape[3]
    rows = [[fn(x[:, :, i:i + tile[0], j:j + tile[1]]) for j in range(0, width, stride[1])]
            for i in range(0, height, stride[0])]
    out_rows = []
    for i, row in enumerate(rows):
        for j in range(len(row)):
            if i > 0:
                row[j] = blend(rows[i - 1][j], row[j], blend_extent[0], axis=2)
            if j > 0:
                row[j] = blend(row[j - 1], row[j], blend_extent[1], axis=3)
        out_rows.append(jnp.concatenate([t[:, :, :keep[0], :keep[1]] for t in row], axis=3))
    return jnp.concatenate(out_rows, axis=2)


# ----------------------------------------------------------------------------------------------------------------
# Small modules


def _causal_conv3d_as_2d(x: jax.Array, past: jax.Array | None, kernel: jax.Array, strides: tuple[int, ...],
                         padding: tuple[tuple[int, int], ...]) -> jax.Array:
    """A 3D conv over [past | x] (time-valid, so the output has x's frames) as per-frame 2D convs; `past` None means
    k-1 copies of x's first frame.

    Same result as the 3D conv. XLA's CPU backend runs 2D convolutions 1.5-2.5x faster than 3D ones (measured on the
    5B VAE's 128-wide layers), so CPU uses this form. Every frame is convolved once with all k time taps side by side
    (one conv with k x the output channels) and the taps are summed on the outputs, shifted in time: no input frame
    is copied (slicing [past | x] per tap copied the input k + 1 times, a fifth of the tiny decoder's time)."""
    taps, cin, cout = kernel.shape[0], kernel.shape[-2], kernel.shape[-1]
    wide = jnp.moveaxis(kernel, 0, -2).reshape(*kernel.shape[1:-2], cin, taps * cout)  # tap t -> channels t*cout...

    def conv(frames: jax.Array) -> jax.Array:  # [B, n, H, W, cin] -> [B, n, H', W', taps, cout]
        y = jax.lax.conv_general_dilated(frames.reshape(-1, *frames.shape[2:]), wide, strides, padding,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y.reshape(*frames.shape[:2], *y.shape[1:3], taps, cout)

    def tap_sum(z: jax.Array, frames: int) -> jax.Array:  # output frame f = sum over taps t of z[f + t] tap t
        return functools.reduce(operator.add, (z[:, t:t + frames, :, :, t] for t in range(taps)))

    z = conv(x)
    lead = taps - 1
    before = jnp.repeat(z[:, :1], lead, axis=1) if past is None else conv(past.astype(x.dtype))
    frames = x.shape[1]
    # The first `lead` outputs read `before`; the rest read z alone. Joining only that head to `before` keeps XLA from
    # materialising [before | z] whole (a copy of 3x the output, ~10 % of the tiny decoder).
    head = tap_sum(jnp.concatenate([before, z[:, :lead]], axis=1), min(lead, frames))
    if frames <= lead:
        return head
    return jnp.concatenate([head, tap_sum(z, frames - lead)], axis=1)


def conv_as_2d() -> bool:
    """Whether causal convs run as per-frame 2D convs (`_causal_conv3d_as_2d`): on XLA:CPU, where that is faster;
    accelerators run the native 3D conv. Read while tracing."""
    return jax.default_backend() == "cpu"


def _param(module: nn.Module, name: str, init: Callable, shape: tuple[int, ...], names: tuple[str | None, ...]):
    """`module.param(name, init, shape)` with logical axes `names`, read as a variable: `param` traces its initializer
    on every `apply` to check the shape, which was about half of tracing a chunk program (the loaders check shapes)."""
    boxed = nn.with_logical_partitioning(init, names)
    return module.variable("params", name, lambda: boxed(module.make_rng("params"), shape, module.param_dtype)).value


class Conv(nn.Module):
    """Conv over the trailing spatial axes of channels-last input; `padding` per spatial axis as (low, high).

    Kernel `[*kernel_size, in, out]` with logical axes (None..., CONV_IN, CONV_OUT): the layout of torch Conv2d/3d
    after the importer's CONV2D/CONV3D permutation.
    """

    features: int
    kernel_size: tuple[int, ...]
    strides: tuple[int, ...] | None = None
    padding: tuple[tuple[int, int], ...] | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    upsample_first: bool = False  # 2D 3x3, padding 1: convolve x's nearest x2 upsample (`conv_of_upsampled`)

    @nn.compact
    def __call__(self, x: jax.Array, past: jax.Array | None = None, causal: bool = False) -> jax.Array:
        """`causal`: a 3-D kernel over [past | x] in time, no time padding (the output has x's frames); `past` holds
        the k-1 frames before x, None means k-1 copies of x's first frame (the start of a video)."""
        rank = len(self.kernel_size)
        shape = (*self.kernel_size, x.shape[-1], self.features)
        kernel = _param(self, "kernel", nn.initializers.lecun_normal(), shape,
                        (axes.CONV_SPACE,) * rank + (axes.CONV_IN, axes.CONV_OUT))
        bias = _param(self, "bias", nn.initializers.zeros, (self.features,), (axes.CONV_OUT,))
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        strides, padding = self.strides or (1,) * rank, self.padding or ((0, 0),) * rank
        if self.upsample_first:
            if self.kernel_size != (3, 3) or strides != (1, 1) or padding != ((1, 1), (1, 1)):
                raise ValueError("upsample_first needs a 3x3 conv with stride 1 and padding 1")
            y = conv_of_upsampled(x, kernel)
        elif causal and conv_as_2d():
            y = _causal_conv3d_as_2d(x, past, kernel, strides[1:], padding[1:])
        else:
            if causal:
                before = jnp.repeat(x[:, :1], self.kernel_size[0] - 1, axis=1) if past is None else past
                x = jnp.concatenate([before.astype(x.dtype), x], axis=1)
            if all(k == 1 for k in self.kernel_size) and self.strides is None and self.padding is None:
                y = jnp.einsum("...i,io->...o", x, kernel.reshape(kernel.shape[-2:]))  # pointwise: a plain matmul
            else:
                spatial = "DHW"[3 - rank:]
                y = jax.lax.conv_general_dilated(x, kernel, strides, padding,
                                                 dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"))
        return y + bias.astype(self.dtype)


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm over [B, T, H, W, C] in fp32 (biased variance, eps inside the sqrt), cast back.

    Statistics are summed per channel, then per group, and the normalisation is one multiply-add per channel: the same
    function as reshaping to [..., groups, channels / groups], without that reshape's short minor axis (one or two
    channels per group in the tiny VAE), which XLA:CPU loops over element by element (1.6-2.3x slower on 8 frames of
    480x720x8, BUILD_NOTES issue 15) and which sums less accurately in fp32 (7.7e-6 against 1.9e-7 relative to a
    float64 GroupNorm there)."""

    groups: int
    epsilon: float = 1e-6
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dtype, channels = x.dtype, x.shape[-1]
        per_group = channels // self.groups
        x = x.astype(jnp.float32)
        space = tuple(range(1, x.ndim - 1))
        count = int(np.prod(x.shape[1:-1])) * per_group
        broadcast = (x.shape[0],) + (1,) * len(space) + (channels,)

        def group_mean(sums: jax.Array) -> jax.Array:  # per-channel sums [B, C] -> each channel's group mean
            means = sums.reshape(-1, self.groups, per_group).sum(-1) / count
            return jnp.repeat(means, per_group, axis=-1).reshape(broadcast)

        mean = group_mean(jnp.sum(x, axis=space))
        var = group_mean(jnp.sum(jnp.square(x - mean), axis=space))
        scale = _param(self, "scale", nn.initializers.ones, (channels,), (axes.NORM,))
        bias = _param(self, "bias", nn.initializers.zeros, (channels,), (axes.NORM,))
        factor = jax.lax.rsqrt(var + self.epsilon) * scale.astype(jnp.float32)
        return ((x - mean) * factor + bias.astype(jnp.float32)).astype(dtype)


class CausalConv3d(nn.Module):
    """3x3x3 conv, causal in time: pads with the cache of the previous chunk, else k-1 copies of frame 0.

    Returns (output, cache): the cache is the last k-1 frames of the time-padded input, for the next chunk.
    """

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_size: int = 3

    @nn.compact
    def __call__(self, x: jax.Array, cache: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        k = self.kernel_size
        pad = (k - 1) // 2
        conv = Conv(self.features, (k, k, k), padding=((0, 0), (pad, pad), (pad, pad)), dtype=self.dtype,
                    param_dtype=self.param_dtype, name="conv")
        # Materialise the input once: the conv and the cache slice both read it. Otherwise XLA recomputes the norm
        # and SiLU that make it in each consumer and stores their resized SpatialNorm factors and sigmoid instead.
        x = jax.lax.optimization_barrier(x)
        y = conv(x, cache, causal=True)
        past = jnp.repeat(x[:, :1], k - 1, axis=1) if cache is None else cache.astype(x.dtype)
        tail = x if x.shape[1] >= k - 1 else jnp.concatenate([past, x], axis=1)
        return y, tail[:, tail.shape[1] - (k - 1):]


def pointwise_conv(features: int, name: str, dtype: Dtype, param_dtype: Dtype) -> Conv:
    """1x1x1 Conv3d: needs no time padding, hence no cache."""
    return Conv(features, (1, 1, 1), dtype=dtype, param_dtype=param_dtype, name=name)


class SpatialNorm3D(nn.Module):
    """GroupNorm(f) * conv_y(zq) + conv_b(zq), zq = latent nearest-resized to f (frame 0 on its own for odd T > 1).

    The 1x1x1 convs run on the latent before the resize: a pointwise conv commutes with a nearest resize (each output
    pixel is a copy of one input pixel), so this is the same function at 1/64 of the work (1/256 with time)."""

    groups: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, f: jax.Array, zq: jax.Array) -> jax.Array:
        frames, size = f.shape[1], f.shape[2:4]
        channels = f.shape[-1]

        def resized(x: jax.Array) -> jax.Array:
            if frames > 1 and frames % 2 == 1:
                return jnp.concatenate([resize_nearest(x[:, :1], (1, *size)),
                                        resize_nearest(x[:, 1:], (frames - 1, *size))], axis=1)
            return resize_nearest(x, (frames, *size))

        y = resized(pointwise_conv(channels, "conv_y", self.dtype, self.param_dtype)(zq))
        b = resized(pointwise_conv(channels, "conv_b", self.dtype, self.param_dtype)(zq))
        norm = GroupNorm(self.groups, 1e-6, self.param_dtype, name="norm_layer")(f)
        return norm * y + b


class ResnetBlock3D(nn.Module):
    """norm1 -> SiLU -> causal conv1 -> norm2 -> SiLU -> causal conv2, plus a 1x1x1 shortcut when widths differ.

    Encoder blocks use GroupNorm (`spatial_norm=False`); decoder blocks SpatialNorm3D on the latent `zq`.
    """

    features: int
    groups: int
    epsilon: float
    spatial_norm: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _norm(self, name: str, x: jax.Array, zq: jax.Array | None) -> jax.Array:
        if self.spatial_norm:
            return SpatialNorm3D(self.groups, self.dtype, self.param_dtype, name=name)(x, zq)
        return GroupNorm(self.groups, self.epsilon, self.param_dtype, name=name)(x)

    @nn.compact
    def __call__(self, x: jax.Array, zq: jax.Array | None, cache: Cache | None) -> tuple[jax.Array, Cache]:
        cache = cache or {}
        new_cache = {}
        h = nn.silu(self._norm("norm1", x, zq))
        h, new_cache["conv1"] = CausalConv3d(self.features, self.dtype, self.param_dtype, name="conv1")(
            h, cache.get("conv1"))
        h = nn.silu(self._norm("norm2", h, zq))
        h, new_cache["conv2"] = CausalConv3d(self.features, self.dtype, self.param_dtype, name="conv2")(
            h, cache.get("conv2"))
        if x.shape[-1] != self.features:
            x = pointwise_conv(self.features, "conv_shortcut", self.dtype, self.param_dtype)(x)
        return h + x.astype(h.dtype), new_cache


class Downsample3D(nn.Module):
    """Optional time halving (odd T: frame 0 kept, later pairs averaged), then a per-frame 3x3 stride-2 Conv2d.

    The conv zero-pads only right and bottom by one, as the reference does.
    """

    features: int
    compress_time: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.compress_time:
            first, rest = (x[:, :1], x[:, 1:]) if x.shape[1] % 2 == 1 else (x[:, :0], x)
            pairs = rest.reshape(rest.shape[0], rest.shape[1] // 2, 2, *rest.shape[2:])
            x = jnp.concatenate([first, (pairs[:, :, 0] + pairs[:, :, 1]) / 2], axis=1)
        b, t = x.shape[:2]
        frames = x.reshape(b * t, *x.shape[2:])
        y = Conv(self.features, (3, 3), strides=(2, 2), padding=((0, 1), (0, 1)), dtype=self.dtype,
                 param_dtype=self.param_dtype, name="conv")(frames)
        return y.reshape(b, t, *y.shape[1:])


class Upsample3D(nn.Module):
    """Nearest x2 in space, and in time when `compress_time` and T > 1 (odd T: frame 0 only in space), then Conv2d.

    Computed in the other order, the same function: the per-frame conv runs on the input frames through the phase
    kernel (`Conv.upsample_first`), and its output frames are repeated in time (a per-frame conv commutes with
    repeating frames), so neither the upsampled input nor its repeated frames are ever convolved or stored."""

    features: int
    compress_time: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, t = x.shape[:2]
        y = Conv(self.features, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, param_dtype=self.param_dtype,
                 upsample_first=True, name="conv")(x.reshape(b * t, *x.shape[2:]))
        y = y.reshape(b, t, *y.shape[1:])
        if self.compress_time and t > 1:
            y = (jnp.concatenate([y[:, :1], jnp.repeat(y[:, 1:], 2, axis=1)], axis=1) if t % 2 == 1
                 else jnp.repeat(y, 2, axis=1))
        # Stored once: the next block's norm and shortcut both read it, and XLA would redo the interleave for each.
        return jax.lax.optimization_barrier(y)


# ----------------------------------------------------------------------------------------------------------------
# Encoder and decoder (one frame chunk each)


def resnet_stack(parent: nn.Module, h: jax.Array, zq: jax.Array | None, channels: int, count: int, block: str,
                 cache: Cache | None) -> tuple[jax.Array, Cache]:
    """`count` ResnetBlock3D of `parent` in a row, named `{block}_resnets_{r}`, each with its own conv cache.

    With `zq` (the decoder's latent) the blocks use SpatialNorm3D, otherwise GroupNorm (the encoder).
    """
    cache, new_cache = cache or {}, {}
    cfg = parent.config
    for r in range(count):
        name = f"resnets_{r}"
        h, new_cache[name] = ResnetBlock3D(channels, cfg.norm_num_groups, cfg.norm_eps, spatial_norm=zq is not None,
                                           dtype=parent.dtype, param_dtype=parent.param_dtype,
                                           parent=parent, name=f"{block}_{name}")(h, zq, cache.get(name))
    return h, new_cache


class Encoder(nn.Module):
    """One frame chunk `[B, T, H, W, in_channels]` -> (moments `[B, T', H/8, W/8, 2 * latent_channels]`, cache)."""

    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cache: Cache | None = None) -> tuple[jax.Array, Cache]:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        cache = cache or {}
        new_cache: dict[str, Any] = {}
        h, new_cache["conv_in"] = CausalConv3d(cfg.block_out_channels[0], **kw, name="conv_in")(
            x, cache.get("conv_in"))
        levels = len(cfg.block_out_channels)
        for i, channels in enumerate(cfg.block_out_channels):
            name = f"down_blocks_{i}"
            h, new_cache[name] = resnet_stack(self, h, None, channels, cfg.layers_per_block, name, cache.get(name))
            if i < levels - 1:
                h = Downsample3D(channels, i < cfg.temporal_compress_level, **kw, name=f"{name}_downsample")(h)
        h, new_cache["mid_block"] = resnet_stack(self, h, None, cfg.block_out_channels[-1], 2,
                                                 "mid_block", cache.get("mid_block"))
        h = nn.silu(GroupNorm(cfg.norm_num_groups, 1e-6, self.param_dtype, name="norm_out")(h))
        h, new_cache["conv_out"] = CausalConv3d(2 * cfg.latent_channels, **kw, name="conv_out")(
            h, cache.get("conv_out"))
        return h, new_cache


class Decoder(nn.Module):
    """One latent chunk `[B, T, h, w, latent_channels]` -> (video `[B, T', 8h, 8w, out_channels]`, cache)."""

    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array, cache: Cache | None = None) -> tuple[jax.Array, Cache]:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        cache = cache or {}
        new_cache: dict[str, Any] = {}
        z = z.astype(self.dtype)
        widths = tuple(reversed(cfg.block_out_channels))
        h, new_cache["conv_in"] = CausalConv3d(widths[0], **kw, name="conv_in")(z, cache.get("conv_in"))
        h, new_cache["mid_block"] = resnet_stack(self, h, z, widths[0], 2, "mid_block", cache.get("mid_block"))
        for i, channels in enumerate(widths):
            name = f"up_blocks_{i}"
            h, new_cache[name] = resnet_stack(self, h, z, channels, cfg.layers_per_block + 1, name, cache.get(name))
            if i < len(widths) - 1:
                h = Upsample3D(channels, i < cfg.temporal_compress_level, **kw, name=f"{name}_upsample")(h)
        h = nn.silu(SpatialNorm3D(cfg.norm_num_groups, **kw, name="norm_out")(h, z))
        h, new_cache["conv_out"] = CausalConv3d(cfg.out_channels, **kw, name="conv_out")(h, cache.get("conv_out"))
        return h, new_cache


# ----------------------------------------------------------------------------------------------------------------
# Posterior and the model


@flax.struct.dataclass
class DiagonalGaussian:
    """The encoder's posterior: `mean` and `logvar` (clamped to [-30, 20]), both `[B, T, h, w, latent_channels]`."""

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean, jnp.clip(logvar, *LOGVAR_RANGE))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    def mode(self) -> jax.Array:
        return self.mean

    def sample(self, key: jax.Array) -> jax.Array:
        """mean + std * N(0, 1) drawn from `key`."""
        return self.sample_with(jax.random.normal(key, self.mean.shape, self.mean.dtype))

    def sample_with(self, noise: jax.Array) -> jax.Array:
        """mean + std * `noise`, for callers (parity, tests) that bring their own standard normal draws."""
        return self.mean + self.std * noise.astype(self.mean.dtype)


class AutoencoderKLCogVideoX(nn.Module):
    """The CogVideoX VAE, one frame chunk per call; `encoder_only=True` builds just the encoder (the pose guider).

    Parameters live under `encoder/...` and `decoder/...` (see `a1_jax.weights.vae`). Videos and latents go through
    the module-level `encode` / `decode`, which run diffusers' frame chunks through the chunk methods:

    * `encode_chunk(video chunk, cache=None) -> (moments, cache)`, `decode_chunk(latent chunk, cache=None) ->
      (video, cache)`: one chunk; `cache=None` starts a video, the returned cache continues it.
    * `__call__(video)`: the whole input as one chunk through the encoder and (unless `encoder_only`) the decoder, which
      is what `init` needs to create every parameter.
    """

    config: VAEConfig
    encoder_only: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(self.config, **kw)
        if not self.encoder_only:
            self.decoder = Decoder(self.config, **kw)

    # Tile geometry of diffusers' enable_tiling() defaults: half the config's sample size, in pixels and latents.
    @property
    def tile_sample(self) -> tuple[int, int]:
        return self.config.sample_height // 2, self.config.sample_width // 2

    @property
    def tile_latent(self) -> tuple[int, int]:
        s = self.config.spatial_compression
        return int(self.tile_sample[0] / s), int(self.tile_sample[1] / s)

    def encode_chunk(self, x: jax.Array, cache: Cache | None = None) -> tuple[jax.Array, Cache]:
        return self.encoder(x.astype(self.dtype), cache)

    def decode_chunk(self, z: jax.Array, cache: Cache | None = None) -> tuple[jax.Array, Cache]:
        return self.decoder(z, cache)

    def __call__(self, x: jax.Array) -> jax.Array:
        moments, _ = self.encode_chunk(x)
        if self.encoder_only:
            return moments
        return self.decode_chunk(DiagonalGaussian.from_moments(moments).mode())[0]


# ----------------------------------------------------------------------------------------------------------------
# Videos: diffusers' frame chunks (and tiles), one jitted chunk call at a time


@functools.lru_cache(maxsize=None)
def _chunk_step(model: AutoencoderKLCogVideoX, method: str) -> Callable:
    """`model.<method>` as a jitted `(params, chunk, cache) -> (output, cache)`, one per model and method (jit then
    caches one executable per chunk shape). The old cache is donated: it is dead once the next one exists."""
    return jax.jit(lambda params, x, cache: model.apply({"params": params}, x, cache, method=method),
                   donate_argnums=2)


def _on_device(params: Any) -> Any:
    """Host arrays put on the default device once, not once per chunk call; device arrays (sharded over another
    process's devices too, in multi-host training) stay where they are."""
    return jax.tree_util.tree_map(lambda x: x if isinstance(x, jax.Array) else jax.device_put(x), params)


def _chunked(step: Callable, params: Any, x: jax.Array, chunk: int,
             tick: Callable[[], None] | None = None) -> jax.Array:
    """diffusers' frame chunks of `x` (axis 1) through `step`, carrying the cache; outputs joined along time.

    One XLA call per chunk, so peak memory is one chunk's working set. (Under one jit, XLA removes a one-trip loop and
    overlaps the two chunks' buffers, which doubled the 5B decode's memory at 5 latents.) `tick()` after each chunk has
    been computed (progress bars). It waits on a chunk only once the next one is dispatched, so the next program is
    traced (and compiled or read from the cache) while the device computes."""
    first, size, _ = chunk_sizes(x.shape[1], chunk)
    starts = [0, *range(first, x.shape[1], size)]
    outputs, cache = [], None
    for k, start in enumerate(starts):
        stop = first if k == 0 else start + size
        y, cache = step(params, x[:, start:stop], cache)
        outputs.append(y)
        if tick is not None and k > 0:
            jax.block_until_ready(outputs[k - 1])
            tick()
    if tick is not None:
        jax.block_until_ready(outputs[-1])
        tick()
    return jnp.concatenate(outputs, axis=1)


def _drive(model: AutoencoderKLCogVideoX, method: str, params: Any, x: jax.Array, chunk: int,
           tiles: dict[str, tuple[int, int]] | None, progress: Callable[[int, int], None] | None) -> jax.Array:
    """`x` through `model.<method>` in frame chunks, per tile when `tiles` (a `tile_plan`) is given; `progress(done,
    total)` after every chunk call."""
    params = _on_device(params)
    tick = None
    if progress is not None:
        rows, columns = ((len(range(0, x.shape[2], tiles["stride"][0])), len(range(0, x.shape[3], tiles["stride"][1])))
                         if tiles else (1, 1))
        total, done = rows * columns * (1 + chunk_sizes(x.shape[1], chunk)[2]), [0]

        def tick() -> None:
            done[0] += 1
            progress(done[0], total)

    run = functools.partial(_chunked, _chunk_step(model, method), params, chunk=chunk, tick=tick)
    return tiled(run, x, **tiles) if tiles else run(x)


def _tiles(model: AutoencoderKLCogVideoX, tiling: bool | str, size: tuple[int, int], tile_in: tuple[int, int],
           tile_out: tuple[int, int], chunk_pixels: tuple[int, int, int]) -> dict[str, tuple[int, int]] | None:
    """The `tile_plan` for an input of spatial `size`, or None when it runs untiled: `tiling` False, an input no
    larger than one tile (diffusers' rule), or "auto" with one chunk (`chunk_pixels`: its frames, height, width in
    pixels) within `TILING_BUDGET_BYTES`."""
    if tiling not in (True, False, "auto"):
        raise ValueError(f"tiling must be True, False or 'auto', got {tiling!r}")
    if not tiling or (size[0] <= tile_in[0] and size[1] <= tile_in[1]):
        return None
    if tiling == "auto" and chunk_activation_bytes(model.config, *chunk_pixels, model.dtype) <= TILING_BUDGET_BYTES:
        return None
    return tile_plan(tile_in, tile_out)


def encode_tiles(model: AutoencoderKLCogVideoX, shape: tuple[int, ...],
                 tiling: bool | str) -> dict[str, tuple[int, int]] | None:
    """The tiles `encode` runs a video of `shape` [B, T, H, W, C] in (a `tile_plan`), or None: untiled."""
    return _tiles(model, tiling, shape[2:4], model.tile_sample, model.tile_latent,
                  (chunk_sizes(shape[1], ENCODE_CHUNK_FRAMES)[0], *shape[2:4]))


def decode_tiles(model: AutoencoderKLCogVideoX, shape: tuple[int, ...],
                 tiling: bool | str) -> dict[str, tuple[int, int]] | None:
    """The tiles `decode` runs latents of `shape` [B, T, h, w, C] in (a `tile_plan`), or None: untiled."""
    s = model.config.spatial_compression
    return _tiles(model, tiling, shape[2:4], model.tile_latent, model.tile_sample,
                  (decoded_frames(chunk_sizes(shape[1], DECODE_CHUNK_FRAMES)[0], model.config),
                   shape[2] * s, shape[3] * s))


def encode(model: AutoencoderKLCogVideoX, params: Any, video: jax.Array, tiling: bool | str = False,
           progress: Callable[[int, int], None] | None = None) -> DiagonalGaussian:
    """Posterior over latents `[B, 1 + (T-1)//4, H/8, W/8, 16]` of `video [B, T, H, W, C]` (5B geometry; T = 1 + 4k
    frames is the intended input); `tiling` as diffusers' `enable_tiling()` (True), none (False), or "auto" (only
    beyond the memory budget). Call it outside `jax.jit`: it runs one jitted call per frame chunk (and tile);
    `progress(done, total)` counts those calls."""
    return DiagonalGaussian.from_moments(_drive(model, "encode_chunk", params, video, ENCODE_CHUNK_FRAMES,
                                                encode_tiles(model, video.shape, tiling), progress))


def decode(model: AutoencoderKLCogVideoX, params: Any, latents: jax.Array, tiling: bool | str = False,
           progress: Callable[[int, int], None] | None = None, frames: int | None = None) -> jax.Array:
    """Video `[B, T', H, W, C]` of `latents`, with exactly diffusers' frame count (13 latents -> 49 frames; an even
    2-latent chunk gives 8 frames); `tiling` as in `encode`. `frames`: only the first `frames` of them, the same
    numbers, decoding no more chunks than they need (`decoding_prefix`). Call it outside `jax.jit`;
    `progress(done, total)` counts its chunk calls."""
    if model.encoder_only:
        raise ValueError("this VAE was built with encoder_only=True and has no decoder")
    tiles = decode_tiles(model, latents.shape, tiling)  # the whole's plan: a prefix tiles as the whole does
    if frames is not None:
        latents = latents[:, :decoding_prefix(latents.shape[1], frames, model.config)]
    video = _drive(model, "decode_chunk", params, latents, DECODE_CHUNK_FRAMES, tiles, progress)
    return video if frames is None else video[:, :frames]


def abstract_params(config: VAEConfig, encoder_only: bool = False, param_dtype: Dtype = jnp.float32) -> Any:
    """The (boxed) parameter tree of `AutoencoderKLCogVideoX` as ShapeDtypeStructs, without allocating weights."""
    model = AutoencoderKLCogVideoX(config, encoder_only=encoder_only, param_dtype=param_dtype)
    side = config.spatial_compression
    video = jax.ShapeDtypeStruct((1, 1, side, side, config.in_channels), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), video)["params"]
