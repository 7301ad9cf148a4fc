"""SigLIP vision tower (So400m/14 at 384 in SkyReels-A1): the face-token encoder.

Conv patch embedding (kernel = stride = patch, no padding), a learned position table, pre-LN transformer blocks
(self-attention scaled by head_dim^-0.5, tanh-GELU MLP) scanned over a stacked `layers` axis, and a final LayerNorm.
The output is `last_hidden_state` `[batch, num_patches, width]` (729×1152 for So400m/14): no class token, and no
pooling head, because SkyReels-A1 feeds every token to the DiT.

Parameter names follow transformers' (`embeddings.patch_embedding` -> `patch_embedding`, `encoder.layers.{i}.*` ->
`encoder/*` stacked, `post_layernorm`), so the importer's rule table reads as a rename. Images are NHWC.
`preprocess` is the checkpoint's `SiglipImageProcessor` (PIL bicubic resize, x/255, (x - 0.5) / 0.5).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from a1_jax.config import SiglipConfig
from a1_jax.models.layers import REMAT_POLICIES, LayerNorm, attention, dense, split_heads
from a1_jax.parallel import axes

Dtype = Any

PIL_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, the checkpoint's `resample`


def preprocess(image: np.ndarray, image_size: int = 384) -> np.ndarray:
    """RGB uint8 `[H, W, 3]` -> float32 `[image_size, image_size, 3]` in [-1, 1], as `SiglipImageProcessor`.

    The resize is PIL's bicubic on the uint8 image (the processor hands uint8 arrays to PIL unchanged), so the
    result matches transformers' slow processor up to float rounding.
    """
    from PIL import Image

    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an RGB uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
    resized = Image.fromarray(image).resize((image_size, image_size), resample=PIL_BICUBIC)
    pixels = np.asarray(resized, np.float32) * np.float32(1 / 255)
    return (pixels - np.float32(0.5)) / np.float32(0.5)


class Attention(nn.Module):
    """Multi-head self-attention with biased q/k/v/out projections."""

    config: SiglipConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_kernel: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        width, heads = cfg.hidden_size, cfg.num_attention_heads

        def project(name: str) -> jax.Array:
            y = dense(width, (axes.EMBED, axes.HEADS), dtype=self.dtype, param_dtype=self.param_dtype, name=name)(x)
            return split_heads(y, heads)

        q, k, v = project("q_proj"), project("k_proj"), project("v_proj")
        y = attention(q, k, v, kernel=self.attention_kernel, scale=cfg.head_dim ** -0.5)
        y = y.reshape(*y.shape[:-2], width)
        return dense(width, (axes.HEADS, axes.EMBED), dtype=self.dtype, param_dtype=self.param_dtype,
                     name="out_proj")(y)


class EncoderBlock(nn.Module):
    """Pre-LN block: `x + attn(ln1(x))`, then `x + fc2(gelu_tanh(fc1(ln2(x))))`. Scan-shaped: `(x, _) -> (x, None)`."""

    config: SiglipConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_kernel: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, _: Any = None) -> tuple[jax.Array, None]:
        cfg = self.config
        norm = dict(epsilon=cfg.layer_norm_eps, param_dtype=self.param_dtype)
        h = LayerNorm(**norm, name="layer_norm1")(x)
        x = x + Attention(cfg, self.dtype, self.param_dtype, self.attention_kernel, name="self_attn")(h)
        h = LayerNorm(**norm, name="layer_norm2")(x)
        h = dense(cfg.intermediate_size, (axes.EMBED, axes.MLP), dtype=self.dtype, param_dtype=self.param_dtype,
                  name="fc1")(h)
        h = nn.with_logical_constraint(jax.nn.gelu(h, approximate=True),  # transformers' gelu_pytorch_tanh
                                       (axes.BATCH, axes.LENGTH, axes.MLP))
        h = dense(cfg.hidden_size, (axes.MLP, axes.EMBED), dtype=self.dtype, param_dtype=self.param_dtype,
                  name="fc2")(h)
        return nn.with_logical_constraint(x + h, (axes.BATCH, axes.LENGTH, axes.EMBED)), None


class SiglipVisionTower(nn.Module):
    """`pixels` NHWC `[batch, image_size, image_size, channels]` (preprocessed) -> `[batch, num_patches, width]`.

    Runtime knobs: `dtype` (compute; SigLIP runs in fp32 in the reference), `param_dtype`, `attention_kernel`
    (see `layers.attention`), `remat` (a key of `REMAT_POLICIES`, as the DiT's).
    """

    config: SiglipConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_kernel: str = "auto"
    remat: str = "none"

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        cfg = self.config
        expected = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {self.remat!r}; choose from {sorted(REMAT_POLICIES)}")
        if tuple(pixels.shape[1:]) != expected:
            raise ValueError(f"SigLIP expects NHWC pixels [batch, {', '.join(map(str, expected))}], "
                             f"got {tuple(pixels.shape)}")
        init = nn.with_logical_partitioning
        p = cfg.patch_size
        x = nn.Conv(cfg.hidden_size, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                    param_dtype=self.param_dtype, name="patch_embedding",
                    kernel_init=init(nn.initializers.lecun_normal(),
                                     (axes.CONV_SPACE, axes.CONV_SPACE, axes.CONV_IN, axes.EMBED)),
                    bias_init=init(nn.initializers.zeros, (axes.EMBED,)))(pixels.astype(self.dtype))
        x = x.reshape(x.shape[0], cfg.num_patches, cfg.hidden_size)  # row-major patches, as torch's flatten(2)
        table = self.param("position_embedding", init(nn.initializers.normal(cfg.hidden_size ** -0.5),
                                                      (None, axes.EMBED)),
                           (cfg.num_patches, cfg.hidden_size), self.param_dtype)
        x = nn.with_logical_constraint(x + table.astype(self.dtype), (axes.BATCH, axes.LENGTH, axes.EMBED))

        block = EncoderBlock
        if self.remat != "none":
            block = nn.remat(block, prevent_cse=False, policy=REMAT_POLICIES[self.remat])  # no CSE risk under scan
        blocks = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                         length=cfg.num_hidden_layers, metadata_params={nn.PARTITION_NAME: axes.LAYERS})
        x, _ = blocks(cfg, self.dtype, self.param_dtype, self.attention_kernel, name="encoder")(x, None)
        return LayerNorm(epsilon=cfg.layer_norm_eps, param_dtype=self.param_dtype, name="post_layernorm")(x)


def param_shapes(model: SiglipVisionTower) -> Any:
    """The (boxed) params tree of `model` as ShapeDtypeStructs, without allocating weights."""
    cfg = model.config
    pixels = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, cfg.num_channels), jnp.float32)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), pixels)["params"]
