"""The schedulers against diffusers' `CogVideoXDDIMScheduler` / `CogVideoXDPMScheduler` (`a1-jax parity scheduler`).

Both sides run a whole sampling trajectory from the same random sample, with the same stand-in "model": at step i
the output is `gain ⊙ x_t + offsets[i]` (a fixed random linear function of the current sample, so an error in one
step feeds the next ones). The reference steps the way `CogVideoXImageToVideoPipeline` calls `step` (DPM: the previous
x̂₀ and the previously listed timestep); its DPM noise comes from its own seeded `torch.Generator`, every draw is
recorded, and ours is fed the draw diffusers used in each step (a second-order step draws twice and uses the second).
Ours is one `jax.jit` of a `lax.scan` over the steps. Every intermediate sample is compared.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
from typing import Any
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

from a1_jax import diffusion
from a1_jax.diffusion import SchedulerConfig
from a1_jax.parity import import_reference, report, to_numpy

# With float64 tables (every CogVideoX config) our coefficients are diffusers' to the bit and a v-prediction step run
# op by op equals diffusers' bit for bit (tests/test_diffusion.py); compiled, XLA contracts `a·x + b·y` into fused
# multiply-adds (torch does not), which moves each step's result by up to about one fp32 ulp, and later steps carry
# that along. So a trajectory of N steps is held to N ulps: N · 2⁻²³ of its largest value.
ULP = 2.0 ** -23


def tolerance(steps: int) -> float:
    """max|ours − diffusers| / max|diffusers| allowed for a trajectory of `steps` steps."""
    return steps * ULP


PARITY_STEPS = (10, 20, 50)
SAMPLE_SHAPE = (2, 13, 16, 6, 9)  # [B, F, C, h, w] as the sampler's latents, small


@dataclasses.dataclass(frozen=True)
class Inputs:
    """One trajectory's random inputs: the starting sample and the stand-in model."""

    sample: np.ndarray  # [*shape] float32
    gain: np.ndarray  # [*shape] float32, in [-1, 1]
    offsets: np.ndarray  # [steps, *shape] float32


def random_inputs(steps: int, seed: int, shape: tuple[int, ...] = SAMPLE_SHAPE) -> Inputs:
    rng = np.random.default_rng(seed)
    return Inputs(sample=rng.standard_normal(shape, np.float32),
                  gain=rng.uniform(-1.0, 1.0, shape).astype(np.float32),
                  offsets=rng.standard_normal((steps, *shape), np.float32))


@dataclasses.dataclass(frozen=True)
class Trajectory:
    """diffusers' run: after every step i, the sample, the step's x̂₀ and the noise the step used (DPM)."""

    samples: np.ndarray  # [steps, *shape]
    x0: np.ndarray  # [steps, *shape]
    noise: np.ndarray | None  # [steps, *shape]; None for DDIM


def reference_trajectory(config: SchedulerConfig, steps: int, inputs: Inputs, seed: int) -> Trajectory:
    """diffusers' trajectory, stepping as the CogVideoX image-to-video pipeline does."""
    torch = import_reference("torch")
    import_reference("diffusers")
    module_name = {"ddim": "scheduling_ddim_cogvideox", "dpm": "scheduling_dpm_cogvideox"}[config.kind]
    module = import_reference(f"diffusers.schedulers.{module_name}")
    cls = module.CogVideoXDPMScheduler if config.kind == "dpm" else module.CogVideoXDDIMScheduler
    scheduler = cls(**config.diffusers_kwargs())
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    generator = torch.Generator().manual_seed(seed)
    draws: list[Any] = []

    def recording_randn(*args: Any, **kwargs: Any) -> Any:
        draws.append(real_randn(*args, **kwargs))
        return draws[-1]

    real_randn = getattr(module, "randn_tensor", None)  # only the DPM module draws noise
    recording = mock.patch.object(module, "randn_tensor", recording_randn) if real_randn else contextlib.nullcontext()
    latents, gain = torch.from_numpy(inputs.sample), torch.from_numpy(inputs.gain)
    samples, x0s, used_noise, x0 = [], [], [], None
    with recording:
        for i, t in enumerate(timesteps):
            output = gain * latents + torch.from_numpy(inputs.offsets[i])
            if config.kind == "dpm":
                latents, x0 = scheduler.step(output, x0, t, timesteps[i - 1] if i > 0 else None, latents,
                                             generator=generator, return_dict=False)
                used_noise.append(to_numpy(draws[-1]))
            else:
                latents, x0 = scheduler.step(output, t, latents, return_dict=False)
            samples.append(to_numpy(latents))
            x0s.append(to_numpy(x0))
    return Trajectory(np.stack(samples), np.stack(x0s), np.stack(used_noise) if used_noise else None)


@jax.jit
def our_trajectory(schedule: diffusion.Schedule, sample: jax.Array, gain: jax.Array, offsets: jax.Array,
                   noise: jax.Array | None) -> jax.Array:
    """Our samples after every step `[steps, *shape]`: one compiled `lax.scan` over `diffusion.step`."""

    def one_step(carry, xs):
        latents, state = carry
        index, offset, step_noise = xs
        latents, state = diffusion.step(schedule, index, gain * latents + offset, latents, state, noise=step_noise)
        return (latents, state), latents

    steps = schedule.timesteps.shape[0]
    xs = (jnp.arange(steps, dtype=jnp.int32), offsets, noise)
    _, samples = jax.lax.scan(one_step, (sample, diffusion.init_state(sample)), xs)
    return samples


def compare(config: SchedulerConfig, steps: int, seed: int,
            shape: tuple[int, ...] = SAMPLE_SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """`(ours, reference)` trajectories `[steps, *shape]` of `config` from the same inputs."""
    inputs = random_inputs(steps, seed, shape)
    expected = reference_trajectory(config, steps, inputs, seed)
    schedule = diffusion.make_schedule(config, steps)
    noise = None if expected.noise is None else jnp.asarray(expected.noise)
    ours = our_trajectory(schedule, jnp.asarray(inputs.sample), jnp.asarray(inputs.gain), jnp.asarray(inputs.offsets),
                          noise)
    return np.asarray(ours), expected.samples


def parity(args: argparse.Namespace) -> dict:
    """`a1-jax parity scheduler --config PATH`: the config as DDIM and as DPM, 10, 20 and 50 steps each."""
    config = SchedulerConfig.from_json(args.config)
    shape = (args.batch or SAMPLE_SHAPE[0], *SAMPLE_SHAPE[1:])
    outputs = {}
    for kind in ("ddim", "dpm"):
        for steps in PARITY_STEPS:
            outputs[f"{kind}/{steps}"] = compare(dataclasses.replace(config, kind=kind), steps, args.seed, shape)
    result = report("scheduler", os.fspath(args.config), shape, outputs, tol=tolerance(max(PARITY_STEPS)),
                    scheduler=config.kind, prediction_type=config.prediction_type,
                    timestep_spacing=config.timestep_spacing, steps=list(PARITY_STEPS))
    # Each trajectory is held to its own bound (10 steps: 10 ulps), not only to the longest one's.
    for name, row in result["outputs"].items():
        row["tol"] = tolerance(int(name.split("/")[1]))
    result["ok"] = all(row["max_rel_err"] <= row["tol"] for row in result["outputs"].values())
    return result
