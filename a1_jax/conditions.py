"""What the DiT is conditioned on, computed from pixels (spec §1.3, §3.2, §4.1, §5.3). Shared by sampling and training.

* image latent: the reference canvas through the VAE (tiled as `enable_tiling()` where the VAE needs it:
  `vae.TILING_BUDGET_BYTES`), a *sample* of its posterior times the VAE's scaling factor, followed by zero latent
  frames;
* pose latents: the control video through the pose guider's encoder (no tiling), the posterior *mode* times the
  guider's scaling factor;
* face tokens: SigLIP's `last_hidden_state` of the aligned face crop (fp32, cast to the compute dtype after).

Pixels come in as uint8 `[..., H, W, 3]` and are mapped to [-1, 1] as diffusers' `VideoProcessor.preprocess` does
(`x / 255`, then `2x - 1`). Latents leave in the DiT's channels-first layout `[B, F, C, h, w]`. The VAE calls run
outside `jax.jit` (the VAE's chunk driver jits each frame chunk), so memory is one chunk's.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from a1_jax.models import siglip, vae


def to_unit_range(pixels: np.ndarray | jax.Array) -> jax.Array:
    """uint8 pixels -> float32 in [-1, 1]."""
    return jnp.asarray(pixels, jnp.float32) / 255.0 * 2.0 - 1.0


def to_dit_layout(latents: jax.Array) -> jax.Array:
    """VAE latents `[B, T, h, w, C]` -> the DiT's `[B, T, C, h, w]`."""
    return jnp.transpose(latents, (0, 1, 4, 2, 3))


def from_dit_layout(latents: jax.Array) -> jax.Array:
    """The DiT's `[B, T, C, h, w]` -> VAE latents `[B, T, h, w, C]`."""
    return jnp.transpose(latents, (0, 1, 3, 4, 2))


def reference_posterior(model: vae.AutoencoderKLCogVideoX, params: Any, canvas: np.ndarray,
                        tiling: bool | str = "auto") -> vae.DiagonalGaussian:
    """The VAE posterior of reference canvases uint8 `[B, H, W, 3]` (one frame each); `tiling` as `vae.encode` (the
    5B VAE at the release canvas tiles like the release's; parity checks ask for tiling explicitly)."""
    frames = to_unit_range(canvas)[:, None]
    return vae.encode(model, params, frames, tiling=tiling)


def image_latents(posterior: vae.DiagonalGaussian, noise: jax.Array, scaling_factor: float, frames: int,
                  dtype: Any) -> jax.Array:
    """The image condition `[B, frames, C, h, w]`: `sample · scaling_factor` in latent frame 0, zeros after.

    `noise` (standard normal, the posterior's shape) draws the sample, as the reference's `latent_dist.sample`."""
    first = (posterior.sample_with(noise).astype(dtype) * scaling_factor).astype(dtype)
    first = to_dit_layout(first)
    return jnp.concatenate([first, jnp.zeros((first.shape[0], frames - 1, *first.shape[2:]), dtype)], axis=1)


def pose_latents(model: vae.AutoencoderKLCogVideoX, params: Any, control: np.ndarray, dtype: Any) -> jax.Array:
    """The pose condition `[B, F, C, h, w]` of control videos uint8 `[B, T, H, W, 3]`: guider mode · scaling factor."""
    mode = vae.encode(model, params, to_unit_range(control)).mode()
    return to_dit_layout((mode.astype(dtype) * model.config.scaling_factor).astype(dtype))


def face_tokens(model: siglip.SiglipVisionTower, params: Any, faces: np.ndarray, dtype: Any) -> jax.Array:
    """SigLIP tokens `[B, patches, width]` of aligned face crops uint8 `[B, S, S, 3]`, cast to `dtype`."""
    pixels = np.stack([siglip.preprocess(face, model.config.image_size) for face in np.asarray(faces)])
    return _siglip_apply(model)(params, jnp.asarray(pixels)).astype(dtype)


@functools.lru_cache(maxsize=None)
def _siglip_apply(model: siglip.SiglipVisionTower):
    """The tower's forward, jitted once per module (modules hash by their fields)."""
    return jax.jit(lambda params, pixels: model.apply({"params": params}, pixels))
