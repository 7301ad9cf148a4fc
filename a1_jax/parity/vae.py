"""CogVideoX VAE vs diffusers' `AutoencoderKLCogVideoX` (`a1-jax parity vae`, `a1-jax bench vae`).

Both sides get the same weights and the same random video `[1, 3, frames, height, width]` in [-1, 1]. Compared:
the posterior mean, a posterior sample drawn with the same standard-normal noise (diffusers' own `sample(generator)`
against our `sample_with(noise)`), and the decode of that sample, fed identically to both decoders so each error is
the component's own. Our side runs `a1_jax.models.vae.encode/decode` (one jitted call per frame chunk), in
channels-last layout.

Default geometry (no --height/--width): 4x6 latent pixels (32x48 px for 8x spatial compression), or, with --tiling,
1.5 tiles each way (rounded to whole latent pixels) so that tiling actually runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from a1_jax.config import VAEConfig, read_json
from a1_jax.errors import UserError
from a1_jax.models import vae
from a1_jax.models.vae import AutoencoderKLCogVideoX
from a1_jax.parity import (errors, fp32_reference, import_reference, perturb_plain_tensors, report, to_numpy,
                           torch_state)
from a1_jax.weights.safetensors_io import open_checkpoint
from a1_jax.weights.vae import load_vae_params

DEFAULT_LATENT_SIZE = (4, 6)  # latent pixels (h, w) of the default parity input: small enough for a CPU
BENCH_TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2}  # a sanity bound on the timed outputs, not the parity gate


def default_size(config: VAEConfig, tiling: bool) -> tuple[int, int]:
    """Pixel (height, width) used when the user gives none: small, or 1.5 tiles when tiling is asked for."""
    s = config.spatial_compression
    if not tiling:
        return DEFAULT_LATENT_SIZE[0] * s, DEFAULT_LATENT_SIZE[1] * s
    tile = (config.sample_height // 2, config.sample_width // 2)
    return tuple(-(-(t * 3 // 2) // s) * s for t in tile)


def _geometry(args: argparse.Namespace, config: VAEConfig) -> tuple[int, int, int, int]:
    """(batch, frames, height, width) from the arguments, with defaults; a non-positive size is a UserError.

    Any positive size is valid, as in diffusers (sizes that are not multiples of the compression decode smaller).
    """
    height, width = default_size(config, args.tiling)
    height, width = args.height or height, args.width or width
    batch, frames = args.batch or 1, args.frames
    if min(batch, frames, height, width) < 1:
        raise UserError(f"batch, frames, height and width must be positive, got {batch}, {frames}, {height}, {width}")
    return batch, frames, height, width


def reference_model(config_path: str | os.PathLike, checkpoint: str | None, seed: int, dtype: str = "float32") -> Any:
    """diffusers' VAE: `from_pretrained(checkpoint)`, else random init from `seed` with every 1-D tensor (norm
    scales, biases) perturbed, since the default init leaves norms at 1/0 and would hide a swapped mapping."""
    torch = import_reference("torch")
    diffusers = import_reference("diffusers")
    torch_dtype = getattr(torch, dtype)
    if checkpoint:
        return diffusers.AutoencoderKLCogVideoX.from_pretrained(checkpoint, torch_dtype=torch_dtype).eval()
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKLCogVideoX.from_config(read_json(config_path))
    perturb_plain_tensors(model, seed)
    return model.to(torch_dtype).eval()


def setup(args: argparse.Namespace, dtype: str = "float32") -> tuple[VAEConfig, Any, AutoencoderKLCogVideoX, dict]:
    """Config, reference model, our model and our fp32 params imported from the same weights.

    A checkpoint is imported from its files, exactly as inference loads it; random weights from the torch model.
    """
    config = VAEConfig.from_json(args.config)
    reference = reference_model(args.config, args.checkpoint, args.seed, dtype)
    state = open_checkpoint(args.checkpoint) if args.checkpoint else torch_state(reference)
    params = load_vae_params(state, config)
    return config, reference, AutoencoderKLCogVideoX(config, dtype=getattr(jnp, dtype)), params


def random_video(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Uniform [-1, 1] video in diffusers' layout [B, C, T, H, W]."""
    return np.random.default_rng(seed).uniform(-1.0, 1.0, shape).astype(np.float32)


def to_channels_last(x: np.ndarray) -> jnp.ndarray:
    return jnp.asarray(np.moveaxis(x, 1, -1))


def to_channels_first(x: Any) -> np.ndarray:
    return np.moveaxis(np.asarray(x, np.float32), -1, 1)


def compare(reference: Any, model: AutoencoderKLCogVideoX, params: dict, video: np.ndarray, *, tiling: bool,
            noise_seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{output: (ours, reference)} in diffusers' layout for posterior mean, posterior sample and decode."""
    torch = import_reference("torch")
    if tiling:
        reference.enable_tiling()
    else:
        reference.disable_tiling()
    with fp32_reference(), torch.no_grad():
        posterior = reference.encode(torch.from_numpy(video)).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(noise_seed))
        sample = posterior.sample(generator=torch.Generator().manual_seed(noise_seed))
        decoded = reference.decode(sample).sample

        ours = vae.encode(model, params, to_channels_last(video), tiling)
        our_sample = ours.sample_with(to_channels_last(to_numpy(noise)))
        our_decoded = vae.decode(model, params, to_channels_last(to_numpy(sample)), tiling)
    return {"posterior_mean": (to_channels_first(ours.mean), to_numpy(posterior.mean)),
            "posterior_sample": (to_channels_first(our_sample), to_numpy(sample)),
            "decoded": (to_channels_first(our_decoded), to_numpy(decoded))}


def parity(args: argparse.Namespace) -> dict:
    """Encode (mean, sample with shared noise) and decode, ours vs diffusers, fp32 on CPU."""
    config, reference, model, params = setup(args)
    batch, frames, height, width = _geometry(args, config)
    video = random_video((batch, config.in_channels, frames, height, width), args.seed)
    outputs = compare(reference, model, params, video, tiling=args.tiling, noise_seed=args.seed + 1)
    return report("vae", os.fspath(args.config), video.shape, outputs, tiling=bool(args.tiling),
                  latent_shape=list(outputs["posterior_mean"][1].shape),
                  decoded_shape=list(outputs["decoded"][1].shape),
                  weights=args.checkpoint or f"random (seed {args.seed})")


class _CompileClock:
    """Seconds JAX spends tracing, lowering and compiling while active (its compile-duration events): our side
    compiles inside its first chunk calls, so the bench subtracts this from the wall time and reports it apart."""

    def __init__(self):
        self.seconds = 0.0

    def _record(self, event: str, duration: float, **_: Any) -> None:
        if event.startswith("/jax/core/compile/"):
            self.seconds += duration

    def __enter__(self) -> "_CompileClock":
        jax.monitoring.register_event_duration_secs_listener(self._record)
        return self

    def __exit__(self, *exc: Any) -> None:
        jax.monitoring.unregister_event_duration_listener(self._record)


def _timed(fn: Callable[[], Any], repeats: int, sync: Callable[[Any], Any] = lambda x: x) -> tuple[float, float, Any]:
    """(median run seconds, compile seconds, last output) of `repeats` calls of `sync(fn())`; compile time is taken
    out of each call's wall time (no separate warm-up: a 5B VAE call on a CPU takes minutes)."""
    times, out = [], None
    with _CompileClock() as clock:
        for _ in range(max(1, repeats)):
            start, compiled_before = time.perf_counter(), clock.seconds
            out = sync(fn())
            times.append(time.perf_counter() - start - (clock.seconds - compiled_before))
    return statistics.median(times), clock.seconds, out


def _bench_direction(ours: Callable[[], Any], theirs: Callable[[], Any], repeats: int) -> dict[str, Any]:
    """`repeats` calls of each side; our compile time (first calls) timed apart."""
    jax_s, compile_s, out = _timed(ours, repeats, jax.block_until_ready)
    torch_s, _, expected = _timed(theirs, repeats)
    return {"jax_s": jax_s, "torch_s": torch_s, "speedup": torch_s / jax_s, "compile_s": compile_s,
            "ours": out, "expected": expected}


def bench(args: argparse.Namespace) -> dict:
    """Wall time of encode and of decode, ours (compile timed apart) vs diffusers, same weights and input."""
    torch = import_reference("torch")
    config, reference, model, params = setup(args, args.dtype)
    batch, frames, height, width = _geometry(args, config)
    video = random_video((batch, config.in_channels, frames, height, width), args.seed)
    if args.tiling:
        reference.enable_tiling()
    params = jax.tree.map(lambda a: jnp.asarray(a, getattr(jnp, args.dtype)), params)
    tiling = bool(args.tiling)
    x = to_channels_last(video).astype(getattr(jnp, args.dtype))
    torch_x = torch.from_numpy(video).to(getattr(torch, args.dtype))

    with torch.no_grad():
        enc = _bench_direction(lambda: vae.encode(model, params, x, tiling),
                               lambda: reference.encode(torch_x).latent_dist.mean, args.repeats)
        z = enc["expected"]  # both decoders take the reference's posterior mean
        our_z = to_channels_last(to_numpy(z)).astype(getattr(jnp, args.dtype))
        dec = _bench_direction(lambda: vae.decode(model, params, our_z, tiling), lambda: reference.decode(z).sample,
                               args.repeats)

    outputs = {"posterior_mean": (to_channels_first(enc["ours"].mean), to_numpy(enc["expected"])),
               "decoded": (to_channels_first(dec["ours"]), to_numpy(dec["expected"]))}
    rel = max(row["max_rel_err"] for row in errors(outputs).values())
    tol = BENCH_TOLERANCE[args.dtype]
    timings = {name: {k: d[k] for k in ("jax_s", "torch_s", "speedup", "compile_s")}
               for name, d in (("encode", enc), ("decode", dec))}
    jax_s = enc["jax_s"] + dec["jax_s"]
    torch_s = enc["torch_s"] + dec["torch_s"]
    return {"component": "vae", "config": os.fspath(args.config), "input_shape": list(video.shape),
            "latent_shape": list(z.shape), "dtype": args.dtype, "tiling": bool(args.tiling), "repeats": args.repeats,
            **timings, "jax_s": jax_s, "torch_s": torch_s, "speedup": torch_s / jax_s,
            "torch_threads": torch.get_num_threads(), "devices": str(jax.devices()[0]),
            "max_rel_err": rel, "tol": tol, "ok": bool(rel <= tol)}
