"""The SkyReels-A1 DiT: CogVideoX-5B-I2V's transformer with a face-token connector (spec §2, §4.2).

Inputs, channels-first like the reference: `latents` `[B, F, C_in, H, W]` with `C_in` in the order
`[noise | pose | image]`, `face` `[B, T, face_embed_dim]` (SigLIP tokens), `timestep` `[B]`. Output: the
v-prediction `[B, F, C_out, H, W]`.

The joint sequence is `[face (T) ; video (F·H/p·W/p)]`, carried as one array through every block: the expert AdaLN
picks the face or video modulation per token with a select (fused by XLA, never materialised), and RoPE is applied
to the whole sequence with identity rows (cos 1, sin 0) for the face tokens, so no block ever splits or concatenates
the streams. RoPE and position tables depend only on static geometry and are computed inside the model at trace
time (compile-time constants), from the config's `sample_*` sizes exactly as the CogVideoX pipeline builds them.

Blocks run under `nn.scan` (parameters stacked on a leading `layers` axis) with a selectable `nn.remat` policy, or
unrolled (`scan_layers=False`, parameters `blocks_0 … blocks_{n-1}`; `unstack_layers` converts).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from a1_jax.config import DiTConfig
from a1_jax.errors import UserError
from a1_jax.models import layers
from a1_jax.models.layers import REMAT_POLICIES
from a1_jax.parallel import axes

Dtype = Any


# --- Geometry and static tables -------------------------------------------------------------------------------------


def sample_latent_frames(config: DiTConfig) -> int:
    """Latent frames of the config's sample size (`sample_frames` counts pixel frames, as diffusers documents)."""
    return (config.sample_frames - 1) // config.temporal_compression_ratio + 1


def patch_grid(config: DiTConfig, height: int, width: int) -> tuple[int, int]:
    """Token rows and columns of a latent `height × width`; a size the patch does not divide is a UserError."""
    p = config.patch_size
    if height % p or width % p:
        raise UserError(f"latent size {height}x{width} is not divisible by the patch size {p}")
    return height // p, width // p


def _crop_region(grid_h: int, grid_w: int, base_h: int, base_w: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Where a `grid_h × grid_w` token grid sits after resizing it to cover the base grid (the pipeline's rule)."""
    if grid_h / grid_w > base_h / base_w:
        height, width = base_h, int(round(base_h / grid_h * grid_w))
    else:
        height, width = int(round(base_w / grid_w * grid_h)), base_w
    top, left = int(round((base_h - height) / 2.0)), int(round((base_w - width) / 2.0))
    return (top, left), (top + height, left + width)


def rope_tables(config: DiTConfig, frames: int, grid_h: int, grid_w: int) -> tuple[np.ndarray, np.ndarray]:
    """3-D RoPE cos/sin `[frames·grid_h·grid_w, head_dim]` for the video tokens, float32.

    The head dim splits into time/height/width parts of `d/4, 3d/8, 3d/8` (16/24/24 for 64). Positions are the
    pipeline's: the token grid is placed in the config's base grid (`sample_* // patch_size`) and sampled with
    `linspace(start, stop·(n-1)/n, n)`; at the base size that is simply `0 … n-1`.
    """
    d = config.attention_head_dim
    dims = (d // 4, d // 8 * 3, d // 8 * 3)
    (top, left), (bottom, right) = _crop_region(grid_h, grid_w, config.sample_height // config.patch_size,
                                                config.sample_width // config.patch_size)
    positions = (np.linspace(0, frames * (frames - 1) / frames, frames, dtype=np.float32),
                 np.linspace(top, bottom * (grid_h - 1) / grid_h, grid_h, dtype=np.float32),
                 np.linspace(left, right * (grid_w - 1) / grid_w, grid_w, dtype=np.float32))
    shape = (frames, grid_h, grid_w)
    cos, sin = [], []
    for axis, (dim, pos) in enumerate(zip(dims, positions)):
        c, s = layers.rope_1d(dim, pos)
        expand = [1, 1, 1]
        expand[axis] = len(pos)
        cos.append(np.broadcast_to(c.reshape(*expand, dim), (*shape, dim)))
        sin.append(np.broadcast_to(s.reshape(*expand, dim), (*shape, dim)))
    n = frames * grid_h * grid_w
    return np.concatenate(cos, -1).reshape(n, d), np.concatenate(sin, -1).reshape(n, d)


def joint_rope_tables(config: DiTConfig, face_tokens: int, frames: int, grid_h: int,
                      grid_w: int) -> tuple[np.ndarray, np.ndarray]:
    """RoPE tables over the joint sequence: identity rows for the face tokens, `rope_tables` for the video."""
    cos, sin = rope_tables(config, frames, grid_h, grid_w)
    d = config.attention_head_dim
    return (np.concatenate([np.ones((face_tokens, d), np.float32), cos]),
            np.concatenate([np.zeros((face_tokens, d), np.float32), sin]))


def video_sincos_table(config: DiTConfig, frames: int, grid_h: int, grid_w: int) -> np.ndarray:
    """The 3-D sin-cos position table of the video tokens `[frames·grid_h·grid_w, width]` (spec §2.5)."""
    return layers.sincos_3d(config.inner_dim, frames, grid_h, grid_w,
                            spatial_scale=config.spatial_interpolation_scale,
                            temporal_scale=config.temporal_interpolation_scale)


def uses_learned_table(config: DiTConfig, face_tokens: int, frames: int, height: int, width: int) -> bool:
    """Whether the learned `pos_embedding` serves this input (else a sin-cos table is computed, or none with RoPE).

    Mirrors diffusers: the learned table serves only the config's latent height and width (anything else is a
    UserError) and only its frame count; another frame count gets a freshly computed sin-cos table.
    """
    if not config.use_learned_positional_embeddings:
        return False
    if (height, width) != (config.sample_height, config.sample_width):
        raise UserError(f"this DiT has a learned position table for {config.sample_height}x{config.sample_width} "
                        f"latents only; got {height}x{width} (resize the input to the checkpoint's sample size)")
    if face_tokens != config.max_text_seq_length:
        raise UserError(f"the learned position table has {config.max_text_seq_length} face-token rows; got "
                        f"{face_tokens} face tokens (max_text_seq_length in the config)")
    return (frames - 1) * config.temporal_compression_ratio + 1 == config.sample_frames


def forward_flops(config: DiTConfig, batch: int, frames: int, height: int, width: int, face_tokens: int) -> int:
    """Matmul FLOPs (2·m·n·k) of one forward pass: projections, attention scores and values, feed-forward."""
    grid_h, grid_w = patch_grid(config, height, width)
    video = frames * grid_h * grid_w
    length = face_tokens + video
    d, p = config.inner_dim, config.patch_size
    per_token_block = (4 * d * d  # q, k, v, out
                       + 2 * d * 4 * d)  # feed-forward in and out
    per_sample = (
        face_tokens * (config.face_embed_dim * config.face_hidden_dim + config.face_hidden_dim * config.text_embed_dim
                       + config.text_embed_dim * d)  # connector and text_proj
        + video * config.in_channels * p * p * d  # patch embedding
        + d * config.time_embed_dim + config.time_embed_dim ** 2  # timestep MLP
        + config.num_layers * (length * per_token_block + 2 * length * length * d  # QK^T and PV
                               + 2 * config.time_embed_dim * 6 * d)  # two AdaLN modulations
        + config.time_embed_dim * 2 * d + video * d * config.out_channels * p * p)  # final AdaLN, proj_out
    return 2 * batch * per_sample


# --- Modules --------------------------------------------------------------------------------------------------------


def _per_stream(face: jax.Array, video: jax.Array, face_tokens: int, length: int) -> jax.Array:
    """`[B, D]` face and video values -> `[B, length, D]` per token (a select XLA fuses into its consumer)."""
    is_video = (jnp.arange(length) >= face_tokens)[None, :, None]
    return jnp.where(is_video, video[:, None, :], face[:, None, :])


class ExpertAdaLN(nn.Module):
    """CogVideoX's LayerNormZero: one shared LayerNorm, then per-stream `(1 + scale)`/`shift`; returns the gates.

    The modulation `linear(silu(temb))` is chunked `shift, scale, gate, enc_shift, enc_scale, enc_gate`.
    """

    config: DiTConfig
    face_tokens: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array) -> tuple[jax.Array, jax.Array]:
        d, length = self.config.inner_dim, x.shape[1]
        mod = layers.dense(6 * d, (axes.COND, axes.EMBED), dtype=self.dtype, param_dtype=self.param_dtype,
                           name="linear")(nn.silu(temb))
        shift, scale, gate, enc_shift, enc_scale, enc_gate = jnp.split(mod, 6, axis=-1)
        affine = self.config.norm_elementwise_affine
        normed = layers.LayerNorm(self.config.norm_eps, use_scale=affine, use_bias=affine,
                                  param_dtype=self.param_dtype, name="norm")(x)
        normed = (normed * (1 + _per_stream(enc_scale, scale, self.face_tokens, length))
                  + _per_stream(enc_shift, shift, self.face_tokens, length))
        return normed, _per_stream(enc_gate, gate, self.face_tokens, length)


class JointAttention(nn.Module):
    """Full bidirectional attention over `[face ; video]` with per-head q/k LayerNorm and RoPE (video rows only)."""

    config: DiTConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_kernel: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array] | None) -> jax.Array:
        c = self.config
        batch, length, _ = x.shape
        project = lambda name: layers.dense(c.inner_dim, (axes.EMBED, axes.HEADS), use_bias=c.attention_bias,
                                            dtype=self.dtype, param_dtype=self.param_dtype, name=name)(x)
        heads = lambda t: layers.split_heads(t, c.num_attention_heads)
        qk_norm = lambda name: layers.LayerNorm(1e-6, param_dtype=self.param_dtype, axis_name=axes.KV, name=name)
        q = qk_norm("norm_q")(heads(project("to_q")))
        k = qk_norm("norm_k")(heads(project("to_k")))
        v = heads(project("to_v"))
        if rope is not None:
            q, k = layers.apply_rope(q, *rope), layers.apply_rope(k, *rope)
        out = layers.attention(q, k, v, kernel=self.attention_kernel, scale=1.0 / math.sqrt(c.attention_head_dim))
        out = out.reshape(batch, length, c.inner_dim)
        return layers.dense(c.inner_dim, (axes.HEADS, axes.EMBED), dtype=self.dtype, param_dtype=self.param_dtype,
                            name="to_out")(out)


class FeedForward(nn.Module):
    """`width -> 4·width`, GELU (tanh approximation), `-> width`."""

    config: DiTConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = self.config.inner_dim
        h = layers.dense(4 * d, (axes.EMBED, axes.MLP), dtype=self.dtype, param_dtype=self.param_dtype,
                         name="proj_in")(x)
        h = nn.with_logical_constraint(nn.gelu(h, approximate=True), (axes.BATCH, axes.LENGTH, axes.MLP))
        return layers.dense(d, (axes.MLP, axes.EMBED), dtype=self.dtype, param_dtype=self.param_dtype,
                            name="proj_out")(h)


class DiTBlock(nn.Module):
    """One CogVideoX block on the joint sequence: expert AdaLN -> attention -> gated residual, twice (attn, FF).

    Signature `(x, temb, rope) -> (x, None)` so the same class runs under `nn.scan` and unrolled.
    """

    config: DiTConfig
    face_tokens: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_kernel: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array,
                 rope: tuple[jax.Array, jax.Array] | None) -> tuple[jax.Array, None]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        normed, gate = ExpertAdaLN(self.config, self.face_tokens, name="norm1", **kw)(x, temb)
        x = x + gate * JointAttention(self.config, attention_kernel=self.attention_kernel, name="attn", **kw)(
            normed, rope)
        normed, gate = ExpertAdaLN(self.config, self.face_tokens, name="norm2", **kw)(x, temb)
        x = x + gate * FeedForward(self.config, name="ff", **kw)(normed)
        return nn.with_logical_constraint(x, (axes.BATCH, axes.LENGTH, axes.EMBED)), None


class PatchEmbed(nn.Module):
    """Latents -> per-frame `p×p` patch tokens; face tokens -> connector MLP -> `text_proj`; joint + positions."""

    config: DiTConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, latents: jax.Array, face: jax.Array) -> jax.Array:
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        batch, frames, channels, height, width = latents.shape
        p, (grid_h, grid_w) = c.patch_size, patch_grid(c, height, width)
        init = nn.with_logical_partitioning

        # A stride-p conv with a p×p kernel is a matmul over (tap row, tap col, channel) patches.
        kernel = self.param("proj_kernel", init(nn.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3),
                                                (axes.CONV_SPACE, axes.CONV_SPACE, axes.CONV_IN, axes.EMBED)),
                            (p, p, channels, c.inner_dim), self.param_dtype)
        patches = latents.reshape(batch, frames, channels, grid_h, p, grid_w, p)
        video = jnp.einsum("bfcyixj,ijcd->bfyxd", patches, kernel.astype(self.dtype))
        if c.patch_bias:
            video = video + self.param("proj_bias", init(nn.initializers.zeros, (axes.EMBED,)), (c.inner_dim,),
                                       self.param_dtype).astype(self.dtype)
        video = video.reshape(batch, frames * grid_h * grid_w, c.inner_dim)

        # The SkyReels connector (`pose_proj`): Linear, SiLU, Linear into the text width, then CogVideoX's text_proj.
        face = layers.dense(c.face_hidden_dim, (axes.COND, axes.MLP), name="pose_proj_0", **kw)(face)
        face = layers.dense(c.text_embed_dim, (axes.MLP, axes.COND), name="pose_proj_2", **kw)(nn.silu(face))
        face = layers.dense(c.inner_dim, (axes.COND, axes.EMBED), name="text_proj", **kw)(face)

        face_tokens = face.shape[1]
        learned = None
        if c.use_learned_positional_embeddings:
            # Persistent in the checkpoint (loaded, never regenerated); initialised like diffusers: zero face rows,
            # then the sin-cos table of the sample size.
            rows = c.max_text_seq_length + sample_latent_frames(c) * (c.sample_height // p) * (c.sample_width // p)
            learned = self.param("pos_embedding", init(self._learned_init, (None, axes.EMBED)), (rows, c.inner_dim),
                                 self.param_dtype)
        if uses_learned_table(c, face_tokens, frames, height, width):
            x = jnp.concatenate([face, video], axis=1) + learned.astype(self.dtype)[None]
        else:
            # Sin-cos without RoPE, and diffusers' fallback for a frame count the learned table does not cover.
            if not c.use_rotary_positional_embeddings or c.use_learned_positional_embeddings:
                table = video_sincos_table(c, frames, grid_h, grid_w)
                video = video + jnp.asarray(table, self.dtype)[None]
            x = jnp.concatenate([face, video], axis=1)
        return nn.with_logical_constraint(x, (axes.BATCH, axes.LENGTH, axes.EMBED))

    def _learned_init(self, key: jax.Array, shape: tuple[int, int], dtype: Dtype) -> jax.Array:
        del key
        return jnp.asarray(learned_position_start(self.config, shape[1]), dtype)


def learned_position_start(config: DiTConfig, width: int) -> np.ndarray:
    """The learned position table's initial value `[face rows + video rows, width]`, as diffusers': zero face rows,
    then the sin-cos table of the sample size."""
    p = config.patch_size
    table = video_sincos_table(config, sample_latent_frames(config), config.sample_height // p,
                               config.sample_width // p)
    return np.concatenate([np.zeros((config.max_text_seq_length, width)), table])


class DiT(nn.Module):
    """The SkyReels-A1 transformer. `(latents [B,F,C_in,H,W], face [B,T,C_face], timestep [B]) -> v [B,F,C_out,H,W]`.

    Runtime knobs: `dtype` (compute), `param_dtype`, `scan_layers`, `remat` (a key of `REMAT_POLICIES`),
    `attention_kernel` (see `layers.attention`).
    """

    config: DiTConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = True
    remat: str = "none"
    attention_kernel: str = "auto"

    @nn.compact
    def __call__(self, latents: jax.Array, face: jax.Array, timestep: jax.Array) -> jax.Array:
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.remat not in REMAT_POLICIES:
            raise UserError(f"unknown remat policy {self.remat!r}; choose from {sorted(REMAT_POLICIES)}")
        if latents.ndim != 5 or latents.shape[2] != c.in_channels:
            raise UserError(f"latents must be [batch, frames, {c.in_channels}, height, width]; got {latents.shape}")
        if face.ndim != 3 or face.shape[2] != c.face_embed_dim:
            raise UserError(f"face tokens must be [batch, tokens, {c.face_embed_dim}]; got {face.shape}")
        batch, frames, _, height, width = latents.shape
        grid_h, grid_w = patch_grid(c, height, width)
        face_tokens = face.shape[1]

        t_emb = layers.timestep_embedding(timestep, c.inner_dim, flip_sin_to_cos=c.flip_sin_to_cos,
                                          freq_shift=c.freq_shift).astype(self.dtype)
        temb = layers.dense(c.time_embed_dim, (axes.EMBED, axes.COND), name="time_embedding_1", **kw)(t_emb)
        temb = layers.dense(c.time_embed_dim, (None, axes.COND), name="time_embedding_2", **kw)(nn.silu(temb))

        x = PatchEmbed(c, name="patch_embed", **kw)(latents.astype(self.dtype), face.astype(self.dtype))
        rope = None
        if c.use_rotary_positional_embeddings:
            rope = tuple(jnp.asarray(t) for t in joint_rope_tables(c, face_tokens, frames, grid_h, grid_w))

        block = DiTBlock
        policy = REMAT_POLICIES[self.remat]
        if self.remat != "none":
            block = nn.remat(DiTBlock, policy=policy, prevent_cse=not self.scan_layers)
        block_kw = dict(config=c, face_tokens=face_tokens, attention_kernel=self.attention_kernel, **kw)
        if self.scan_layers:
            blocks = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                             in_axes=(nn.broadcast, nn.broadcast), length=c.num_layers,
                             metadata_params={nn.PARTITION_NAME: axes.LAYERS})
            x, _ = blocks(name="blocks", **block_kw)(x, temb, rope)
        else:
            for i in range(c.num_layers):
                x, _ = block(name=f"blocks_{i}", **block_kw)(x, temb, rope)

        video = x[:, face_tokens:]
        affine = c.norm_elementwise_affine
        video = layers.LayerNorm(c.norm_eps, use_scale=affine, use_bias=affine, param_dtype=self.param_dtype,
                                 name="norm_final")(video)
        shift, scale = jnp.split(layers.dense(2 * c.inner_dim, (axes.COND, axes.EMBED), name="norm_out_linear",
                                              **kw)(nn.silu(temb)), 2, axis=-1)
        video = layers.LayerNorm(c.norm_eps, use_scale=affine, use_bias=affine, param_dtype=self.param_dtype,
                                 name="norm_out_norm")(video)
        video = video * (1 + scale[:, None, :]) + shift[:, None, :]
        p = c.patch_size
        out = layers.dense(c.out_channels * p * p, (axes.EMBED, None), name="proj_out", **kw)(video)
        # Feature index = channel·p² + row tap·p + col tap (the reference's unpatchify order).
        out = out.reshape(batch, frames, grid_h, grid_w, c.out_channels, p, p)
        return out.transpose(0, 1, 4, 2, 5, 3, 6).reshape(batch, frames, c.out_channels, height, width)


def example_inputs(config: DiTConfig, batch: int = 2, frames: int | None = None, height: int | None = None,
                   width: int | None = None, face_tokens: int | None = None,
                   dtype: Dtype = jnp.float32) -> tuple[jax.ShapeDtypeStruct, ...]:
    """Shapes of `(latents, face, timestep)`; geometry defaults to the config's sample size and face-token count."""
    frames = sample_latent_frames(config) if frames is None else frames
    height = config.sample_height if height is None else height
    width = config.sample_width if width is None else width
    face_tokens = config.max_text_seq_length if face_tokens is None else face_tokens
    return (jax.ShapeDtypeStruct((batch, frames, config.in_channels, height, width), dtype),
            jax.ShapeDtypeStruct((batch, face_tokens, config.face_embed_dim), dtype),
            jax.ShapeDtypeStruct((batch,), jnp.float32))


def abstract_params(model: DiT, inputs: tuple[jax.ShapeDtypeStruct, ...]) -> Any:
    """The boxed parameter tree (ShapeDtypeStructs with logical axes) of `model` for `inputs`, without memory."""
    return jax.eval_shape(lambda: model.init(jax.random.key(0), *(jnp.zeros(s.shape, s.dtype) for s in inputs)))[
        "params"]


def unstack_layers(params: dict, num_layers: int) -> dict:
    """Scanned params (`blocks` stacked on axis 0) -> the unrolled layout (`blocks_0 … blocks_{n-1}`)."""
    out = {k: v for k, v in params.items() if k != "blocks"}
    for i in range(num_layers):
        out[f"blocks_{i}"] = jax.tree_util.tree_map(lambda leaf: leaf[i], params["blocks"])
    return out
