"""The denoising loop: classifier-free guidance on the face tokens and one scheduler step per iteration (spec §6.2,
§6.3, §9.1). One step is one compiled program (`step`), run once per step by a host loop (`denoise`).

Why not one `lax.scan` over the steps: a progress bar needs the host to see each step finish, and the only way out of
a running program is a host callback, which makes JAX keep the program out of its persistent compilation cache (the
5B's loop would be compiled again on every run). The step program has no callback, so it is compiled once per
geometry and then read from the cache; the host dispatches step i + 1 before it waits on step i, so the device never
waits on the host.

Each step runs the DiT on the batch `[uncond, cond]`: both halves see the same noisy latents, pose latents and image
latents (channel-concatenated in that order); the unconditional half gets all-zero face features. The two
v-predictions are combined in fp32, `v_u + g·(v_c − v_u)`, the scheduler steps in fp32 and the latents go back to the
compute dtype, as the reference does. With `guidance <= 1` the reference skips the unconditional half; so do we.

Long videos (spec §9.1): a window after the first starts steps 4–7 (the reference's `fusion_interval` (3, 8)) by
blending its first overlapping latent frames with the previous window's latents *after* that same step, which the
previous window's loop returns. Both arrive as arguments with fixed shapes, so the first window and every later one,
and every step, run the same executable.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from a1_jax import diffusion

BLEND_AFTER, BLEND_BEFORE = 3, 8  # the reference's fusion_interval: blend at the start of steps 3 < i < 8
OVERLAP_FRAMES = 8  # driving frames shared by consecutive windows
FRAMES_PER_LATENT = 4


@flax.struct.dataclass
class Conditions:
    """Everything a window is conditioned on, in the DiT's layout and compute dtype."""

    image: jax.Array  # [1, F, C, h, w]: the reference's latent in frame 0, zeros after
    pose: jax.Array  # [1, F, C, h, w]: pose-guider latents of the window's control video
    face: jax.Array  # [1, N, D]: SigLIP tokens of the aligned face


@flax.struct.dataclass
class Overlap:
    """The previous window's latent frames that the next one blends in, one entry per step (after that step)."""

    latents: jax.Array  # [steps, 1, n, C, h, w]: the previous window's last n latent frames
    active: jax.Array  # [steps] bool: blend at the start of this step

    @classmethod
    def none(cls, steps: int, like: jax.Array, latent_frames: int) -> "Overlap":
        """No previous window: nothing is blended (same shapes, so the same compiled loop)."""
        tail = jnp.zeros((steps, like.shape[0], latent_frames, *like.shape[2:]), like.dtype)
        return cls(latents=tail, active=jnp.zeros((steps,), bool))

    @classmethod
    def after(cls, tails: jax.Array) -> "Overlap":
        """Blend `tails` (what `denoise` returned for the previous window) at the reference's steps."""
        steps = np.arange(tails.shape[0])
        return cls(latents=tails, active=jnp.asarray((steps > BLEND_AFTER) & (steps < BLEND_BEFORE)))


def overlap_latent_frames() -> int:
    """Latent frames shared by consecutive windows: 8 driving frames / 4 per latent = 2."""
    return OVERLAP_FRAMES // FRAMES_PER_LATENT


def blend(latents: jax.Array, previous: jax.Array) -> jax.Array:
    """The reference's `weighted_blending`: latent frame 0 (the reference) is kept; overlapping frame `1 + j` becomes
    `w_j · previous[j] + (1 − w_j) · latents[1 + j]` with `w_j = (n − j) / n`, n = `previous.shape[1]`."""
    n = previous.shape[1]
    weights = jnp.asarray([(n - j) / n for j in range(n)], jnp.float32).reshape(1, n, 1, 1, 1)
    mixed = (weights * previous.astype(jnp.float32) + (1 - weights) * latents[:, 1:1 + n].astype(jnp.float32))
    return jnp.concatenate([latents[:, :1], mixed.astype(latents.dtype), latents[:, 1 + n:]], axis=1)


def scheduler_noise(key: jax.Array, index: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The standard normal draw of step `index` for a scheduler that injects noise (DPM)."""
    return jax.random.normal(jax.random.fold_in(key, index), shape, jnp.float32)


def step(transformer: Any, params: Any, schedule: diffusion.Schedule, conditions: Conditions, guidance: jax.Array,
         overlap: Overlap, key: jax.Array, latents: jax.Array, state: diffusion.State, index: jax.Array, *,
         use_cfg: bool = True) -> tuple[jax.Array, diffusion.State, jax.Array]:
    """Step `index` of `schedule` from `latents` `[1, F, C, h, w]` (compute dtype) and the scheduler's `state`. Pure;
    jit it (`index` traced: every step runs one executable).

    Returns the new latents and state and, for the next window, their last `overlap.latents.shape[2]` latent frames.
    `key` feeds a scheduler that injects noise (DPM)."""
    dtype = latents.dtype
    face = conditions.face.astype(dtype)
    if use_cfg:
        face = jnp.concatenate([jnp.zeros_like(face), face])
    copies = 2 if use_cfg else 1
    fixed = jnp.concatenate([jnp.repeat(conditions.pose, copies, axis=0),
                             jnp.repeat(conditions.image, copies, axis=0)], axis=2).astype(dtype)
    latents = jnp.where(overlap.active[index], blend(latents, overlap.latents[index]), latents)
    inputs = jnp.concatenate([jnp.repeat(latents, copies, axis=0), fixed], axis=2)
    timestep = schedule.timesteps[index]
    v = transformer.apply({"params": params}, inputs, face, jnp.full((copies,), timestep)).astype(jnp.float32)
    if use_cfg:
        v = v[:1] + guidance.astype(jnp.float32) * (v[1:] - v[:1])
    step_noise = scheduler_noise(key, index, latents.shape) if diffusion.uses_noise(schedule) else None
    latents, state = diffusion.step(schedule, index, v, latents, state, noise=step_noise)
    latents = latents.astype(dtype)
    return latents, state, latents[:, latents.shape[1] - overlap.latents.shape[2]:]


def denoise(run_step: Callable[[jax.Array, diffusion.State, jax.Array], tuple[jax.Array, diffusion.State, jax.Array]],
            noise: jax.Array, state: diffusion.State, steps: int,
            on_step: Callable[[int], None] | None = None) -> tuple[jax.Array, jax.Array]:
    """Every step from `noise` and the scheduler's first `state` (`diffusion.init_state`): `run_step(latents, state,
    index)` is the compiled `step` with the window's other arguments bound. Returns the final latents and the tails
    after each step `[steps, 1, n, C, h, w]` (what `Overlap.after` takes). `on_step(i)` once step i is computed."""
    latents, tails = noise, []
    for index in range(steps):
        latents, state, tail = run_step(latents, state, jnp.int32(index))
        tails.append(tail)
        if on_step is not None and index > 0:  # step `index` is queued behind the one waited on
            jax.block_until_ready(tails[index - 1])
            on_step(index - 1)
    if on_step is not None:
        jax.block_until_ready(latents)
        on_step(steps - 1)
    return latents, jnp.stack(tails)
