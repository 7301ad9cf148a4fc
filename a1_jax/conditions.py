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

Training (`window_conditions`) encodes windows of frames already in [-1, 1] and keeps what a training step samples
from: the posterior *moments* of the window and of the reference frame, channels-last as the latent cache stores
them. Its reference frame first gets pixel noise, σ = exp(N(mean, std)) per example (the CogVideoX I2V recipe), so
the model learns not to copy the image latent's noise-free details.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from a1_jax.models import siglip, vae


# `x / 255 * 2 - 1` of every uint8 level in IEEE float32, as torch computes it; XLA turns a division by a constant into
# a multiplication by its reciprocal, which differs in the last bit for 126 of the 256 levels.
_UNIT_LEVELS = np.arange(256, dtype=np.float32) / np.float32(255) * np.float32(2) - np.float32(1)


@jax.jit
def to_unit_range(pixels: np.ndarray | jax.Array) -> jax.Array:
    """uint8 pixels -> float32 in [-1, 1], by table: one pass over a whole control video."""
    if pixels.dtype != jnp.uint8:
        raise TypeError(f"to_unit_range takes uint8 pixels, got {pixels.dtype}")
    return jnp.asarray(_UNIT_LEVELS)[pixels.astype(jnp.int32)]


@jax.jit
def to_pixels(video: jax.Array) -> jax.Array:
    """Decoded frames in [-1, 1] -> uint8, as diffusers' postprocessing: `x * 0.5 + 0.5` clamped in the decoder's dtype,
    then cast to float32 and rounded. In bf16 the shift rounds to bf16 as the reference's eager op does (XLA may keep
    excess precision inside a fusion otherwise), and a level of output can depend on it."""
    info = jnp.finfo(video.dtype)
    shifted = jax.lax.reduce_precision(video * 0.5 + 0.5, info.nexp, info.nmant)
    return jnp.rint(jnp.clip(shifted, 0, 1).astype(jnp.float32) * 255).astype(jnp.uint8)


def to_dit_layout(latents: jax.Array) -> jax.Array:
    """VAE latents `[B, T, h, w, C]` -> the DiT's `[B, T, C, h, w]`."""
    return jnp.transpose(latents, (0, 1, 4, 2, 3))


def from_dit_layout(latents: jax.Array) -> jax.Array:
    """The DiT's `[B, T, C, h, w]` -> VAE latents `[B, T, h, w, C]`."""
    return jnp.transpose(latents, (0, 1, 3, 4, 2))


def encode_frames(model: vae.AutoencoderKLCogVideoX, params: Any, frames: jax.Array,
                  tiling: bool | str = "auto") -> vae.DiagonalGaussian:
    """The VAE posterior of frames in [-1, 1] `[B, T, H, W, 3]`; `tiling` as `vae.encode` (the 5B VAE at the release
    canvas tiles like the release's `enable_tiling()`; parity checks ask for tiling explicitly)."""
    return vae.encode(model, params, frames, tiling=tiling)


def reference_posterior(model: vae.AutoencoderKLCogVideoX, params: Any, canvas: np.ndarray,
                        tiling: bool | str = "auto") -> vae.DiagonalGaussian:
    """The VAE posterior of reference canvases uint8 `[B, H, W, 3]` (one frame each), `tiling` as `encode_frames`."""
    return encode_frames(model, params, to_unit_range(canvas)[:, None], tiling)


def image_latents(posterior: vae.DiagonalGaussian, noise: jax.Array, scaling_factor: float, frames: int,
                  dtype: Any) -> jax.Array:
    """The image condition `[B, frames, C, h, w]`: `sample · scaling_factor` in latent frame 0, zeros after.

    `noise` (standard normal, the posterior's shape) draws the sample, as the reference's `latent_dist.sample`."""
    first = (posterior.sample_with(noise).astype(dtype) * scaling_factor).astype(dtype)
    first = to_dit_layout(first)
    return jnp.concatenate([first, jnp.zeros((first.shape[0], frames - 1, *first.shape[2:]), dtype)], axis=1)


def pose_modes(model: vae.AutoencoderKLCogVideoX, params: Any, frames: jax.Array, dtype: Any) -> jax.Array:
    """Guider mode · scaling factor `[B, F, h, w, C]` (channels-last) of control frames in [-1, 1] (no tiling)."""
    mode = vae.encode(model, params, frames).mode()
    return (mode.astype(dtype) * model.config.scaling_factor).astype(dtype)


def pose_latents(model: vae.AutoencoderKLCogVideoX, params: Any, control: np.ndarray, dtype: Any) -> jax.Array:
    """The pose condition `[B, F, C, h, w]` of control videos uint8 `[B, T, H, W, 3]`."""
    return to_dit_layout(pose_modes(model, params, to_unit_range(control), dtype))


def face_pixels(faces: np.ndarray, image_size: int) -> np.ndarray:
    """Aligned face crops uint8 `[B, S, S, 3]` -> SigLIP's preprocessed input (on the host, per example)."""
    return np.stack([siglip.preprocess(face, image_size) for face in np.asarray(faces)])


def face_tokens(model: siglip.SiglipVisionTower, params: Any, faces: np.ndarray, dtype: Any) -> jax.Array:
    """SigLIP tokens `[B, patches, width]` of aligned face crops uint8 `[B, S, S, 3]`, cast to `dtype`."""
    pixels = face_pixels(faces, model.config.image_size)
    return _siglip_apply(model)(params, jnp.asarray(pixels)).astype(dtype)


def window_conditions(networks: Any, params: Any, video: jax.Array, control: jax.Array, pixels: jax.Array,
                      keys: jax.Array, *, pixel_noise: tuple[float, float], dtype: Any) -> dict[str, jax.Array]:
    """The conditions of training windows, as the latent cache stores them (channels-last, fp32 unless `dtype`):

        video  [B, F, h, w, 2C]  posterior moments (mean | logvar) of the window `video` [B, T, H, W, 3]
        image  [B, 1, h, w, 2C]  posterior moments of its frame 0 after pixel noise, σ = exp(N(pixel_noise))
        pose   [B, F, h, w, C]   guider mode · scaling factor of `control` [B, T, H, W, 3]
        face   [B, N, D]         SigLIP tokens of `pixels` (`face_pixels`), fp32

    Frames in [-1, 1]; `keys` [B]: example i's pixel noise comes from `keys[i]` alone (so neither the batch's order
    nor its split over hosts changes it). `networks`/`params`: the VAE, pose guider and SigLIP (fields `vae`,
    `pose_guider`, `siglip`). Call outside `jax.jit`, under the mesh: the VAE drives its frame chunks itself."""
    moments = lambda posterior: jnp.concatenate([posterior.mean, posterior.logvar], axis=-1)
    reference = _pixel_noise(*map(float, pixel_noise))(video[:, :1], keys)
    return {"video": moments(encode_frames(networks.vae, params["vae"], video.astype(dtype))),
            "image": moments(encode_frames(networks.vae, params["vae"], reference.astype(dtype))),
            "pose": pose_modes(networks.pose_guider, params["pose_guider"], control.astype(dtype), dtype),
            "face": _siglip_apply(networks.siglip)(params["siglip"], pixels)}


@functools.lru_cache(maxsize=None)
def _pixel_noise(mean: float, std: float):
    """Frames `[B, 1, H, W, 3]` + σ·N(0, 1) with σ = exp(N(mean, std)), each example from its own key."""
    def one(frames, key):
        k_sigma, k_noise = jax.random.split(key)
        sigma = jnp.exp(mean + std * jax.random.normal(k_sigma, (), jnp.float32))
        return frames + sigma * jax.random.normal(k_noise, frames.shape, jnp.float32)

    return jax.jit(jax.vmap(one))


@functools.lru_cache(maxsize=None)
def _siglip_apply(model: siglip.SiglipVisionTower):
    """The tower's forward, jitted once per module (modules hash by their fields)."""
    return jax.jit(lambda params, pixels: model.apply({"params": params}, pixels))
