"""The loss and the jitted train step (spec §7; the CogVideoX I2V recipe, see `train/__init__`).

A batch reaches the step as the DiT's conditions, whichever dataset it came from (`Batch`): the posterior moments
of the target window's VAE latents and of the (noise-augmented) reference frame's, the pose latents and the face
tokens, channels-last as the encoders give them, plus the face-dropout flags and each example's position in the
data stream. Frame datasets get there through `conditions.window_conditions` (the frozen encoders, outside the
step); latent caches are read as such.

Inside the step, for each example: x₀ = a posterior sample × the VAE's scaling factor; the image condition = a
sample of the reference posterior × scaling factor in latent frame 0, zeros after (`conditions.image_latents`, as the
sampler builds it); t ~ U{0 … T−1}; x_t = add_noise(x₀, ε, t); the DiT sees `[x_t | pose | image]` and the face
tokens (zeros where dropped) and predicts v; x̂₀ from v as the sampler computes it; loss = mean over the example of
1/(1−ᾱ_t)·(x̂₀ − x₀)², then the mean over the batch. (For v-prediction 1/(1−ᾱ_t)·(x̂₀ − x₀)² = (v̂ − v)², so the loss
is the v error: about 1 at initialisation.)

Randomness: the example at stream position p, in step s, draws its timestep and noises from
`fold_in(fold_in(key(seed), s), p)`: the same draws whatever the batch's row order, its split over hosts or devices.
Gradient accumulation: the batch is split into `grad_accum` microbatches (example i goes to microbatch i mod k, so
each device's rows stay on it) and a `lax.scan` averages their gradients; one optimizer update per step, the same
update (up to fp32 rounding) as without accumulation.

Metrics stay on the device (the trainer reads them back in batches, without stalling dispatch): the loss, the
trainable gradients' global norm, and `learned`, one flag per trainable leaf (`state.trainable_paths` order): its
gradient was non-zero and its value changed in this step. A leaf never flagged in a run is dead: nothing reaches it
(weight decay alone would move it, hence the gradient condition).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from a1_jax import conditions as cond
from a1_jax import diffusion
from a1_jax.models import vae
from a1_jax.parallel import axes
from a1_jax.train.state import TRAINABLE, TrainState, ema_update, trainable_paths

Array = jax.Array


@flax.struct.dataclass
class Batch:
    """What one step trains on; every field has the batch on axis 0 (channels-last latents, as the VAE gives)."""

    video: Array  # [B, F, h, w, 2C] posterior moments (mean | logvar) of the target window
    image: Array  # [B, 1, h, w, 2C] posterior moments of the noise-augmented reference frame
    pose: Array  # [B, F, h, w, C] pose-guider mode × its scaling factor
    face: Array  # [B, N, D] SigLIP tokens
    drop_face: Array  # [B] bool
    position: Array  # [B] uint32: the example's position in the data stream (its randomness depends on it)


def batch_axes(batch: Batch) -> Batch:
    """Logical axes of every field: the batch axis, nothing else sharded."""
    return jax.tree_util.tree_map(lambda x: (axes.BATCH,) + (None,) * (x.ndim - 1), batch)


@flax.struct.dataclass
class LossSettings:
    table: diffusion.NoiseTable
    scaling_factor: float = flax.struct.field(pytree_node=False)
    num_timesteps: int = flax.struct.field(pytree_node=False)


def example_losses(model: Any, params: Any, batch: Batch, keys: Array, settings: LossSettings,
                   timesteps: Array | None = None) -> Array:
    """The weighted x̂₀ error of each example `[B]`, fp32. `keys` [B]: one PRNG key per example (its timestep and
    noises depend on it alone, so neither the batch split nor the sharding changes them); `timesteps` [B] instead of
    t ~ U{0 … T−1} (evaluation)."""
    dtype = model.dtype
    posterior = vae.DiagonalGaussian.from_moments(batch.video.astype(jnp.float32))
    reference = vae.DiagonalGaussian.from_moments(batch.image.astype(jnp.float32))
    frames = posterior.mean.shape[1]

    def draw(key):
        # One normal draw for the three noises (posterior samples of the window and of the reference, the diffusion
        # noise): every random draw of another shape is compiled on its own, slowly on CPU.
        k_t, k_noise = jax.random.split(key)
        return (jax.random.randint(k_t, (), 0, settings.num_timesteps),
                jax.random.normal(k_noise, (2 * frames + 1, *posterior.mean.shape[2:]), jnp.float32))

    t, draws = jax.vmap(draw)(keys)
    t = t if timesteps is None else timesteps
    x0 = cond.to_dit_layout(posterior.sample_with(draws[:, :frames]) * settings.scaling_factor)
    image = cond.image_latents(reference, draws[:, frames:frames + 1], settings.scaling_factor, frames, dtype)
    noise = cond.to_dit_layout(draws[:, frames + 1:])
    pose = cond.to_dit_layout(batch.pose).astype(dtype)
    face = jnp.where(batch.drop_face[:, None, None], 0, batch.face).astype(dtype)

    noisy = diffusion.add_noise(settings.table, x0, noise, t)
    inputs = jnp.concatenate([noisy.astype(dtype), pose, image], axis=2)
    prediction = model.apply({"params": params}, inputs, face, t.astype(jnp.float32))
    x0_hat = diffusion.x0_from_prediction(settings.table, prediction, noisy, t)
    error = jnp.mean(jnp.square(x0_hat - x0), axis=tuple(range(1, x0.ndim)))
    return diffusion.loss_weight(settings.table, t) * error


def _microbatches(batch: Batch, count: int) -> Batch:
    """`[B, ...]` -> `[count, B / count, ...]` with example i in microbatch i mod count (no data crosses devices)."""
    def split(x):
        x = x.reshape(x.shape[0] // count, count, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree_util.tree_map(split, batch)


def example_keys(rng: Array, step: Array, positions: Array) -> Array:
    """One PRNG key per example: `fold_in(fold_in(key, step), position)`."""
    key = jax.random.fold_in(jax.random.wrap_key_data(rng), step)
    return jax.vmap(jax.random.fold_in, (None, 0))(key, positions)


def make_train_step(model: Any, optimizer: optax.GradientTransformation, labels: Any, settings: LossSettings, *,
                    grad_accum: int = 1, ema_decay: float | None = None) -> Callable:
    """`step(state, batch) -> (state, metrics)`, pure; compile it with `jit_train_step`. `labels`: the stage's
    `trainable`/`frozen` tree (`state.stage_labels`). Metrics: see the module docstring."""
    paths = trainable_paths(labels)

    def loss_fn(params, micro, keys):
        return jnp.mean(example_losses(model, params, micro, keys, settings))

    grad_fn = jax.value_and_grad(loss_fn)

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, Array]]:
        keys = example_keys(state.rng, state.step, batch.position)
        if grad_accum == 1:
            loss, grads = grad_fn(state.params, batch, keys)
        else:
            def accumulate(carry, xs):
                micro, micro_keys = xs
                micro = jax.tree_util.tree_map(nn.with_logical_constraint, micro, batch_axes(micro))
                loss, grads = grad_fn(state.params, micro, micro_keys)
                return jax.tree_util.tree_map(jnp.add, carry, (loss, grads)), None

            zeros = (jnp.zeros((), jnp.float32), jax.tree_util.tree_map(jnp.zeros_like, state.params))
            xs = (_microbatches(batch, grad_accum), _microbatches(keys, grad_accum))
            (loss, grads), _ = jax.lax.scan(accumulate, zeros, xs)
            loss, grads = jax.tree_util.tree_map(lambda x: x / grad_accum, (loss, grads))
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = None if state.ema is None else ema_update(state.ema, params, ema_decay, state.step)
        # Only trainable gradients: reading a frozen one would make XLA compute it.
        trained = jax.tree_util.tree_map(lambda g, label: g if label == TRAINABLE else jnp.zeros((), g.dtype),
                                         grads, labels)
        flat = [traverse_util.flatten_dict(tree) for tree in (grads, state.params, params)]
        learned = jnp.stack([jnp.any(flat[0][p] != 0) & jnp.any(flat[1][p] != flat[2][p]) for p in paths])
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(trained), "learned": learned}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema=ema, rng=state.rng), metrics

    return step


def jit_train_step(step: Callable, state_shardings: TrainState, batch_shardings: Batch) -> Callable:
    """The step compiled with explicit shardings; the state's buffers are donated (updated in place)."""
    return jax.jit(step, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, state_shardings.rng), donate_argnums=0)
