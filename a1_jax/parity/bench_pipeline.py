"""`a1-jax bench pipeline`: the accelerator's whole performance table in one call (the last stdout line, JSON).

1. **clip**: one window (49 frames) through our Animator's stages — conditions (tiled reference encode, SigLIP, pose
   guider), the denoising loop (CFG batch 2, 10 steps), the tiled decode — twice: the first call includes compiling,
   the second is the steady state. Peak device memory is the runtime's own statistic (`memory_stats`), read after
   the clip, before anything else runs on the device. With `--against diffusers`, the same clip through
   `parity.pipeline`'s torch loop over the diffusers / transformers modules (same weights, inputs and noises): its
   seconds per stage, the ratios, and how far the two outputs are apart.
2. **dit_forward**: the DiT forward on a CFG pair (batch 2) at the clip's geometry: compile seconds, seconds per call,
   MFU; against diffusers' `CogVideoXTransformer3DModel` (plus the torch face connector) on the same inputs.
3. **train_step**: the DiT at the same width truncated to `--blocks` blocks, trained as `configs/train/stage3.yaml`
   (fp32 master weights, bf16 compute, full remat, AdamW, EMA) on random latents at the clip's geometry: compile
   seconds, seconds per step, MFU (3 forward passes of FLOPs a step: remat's recomputation is not counted).

`--geometry full`: the release (`configs/5b`: 49 frames at 480×720, 13×60×90 latents, 729 face tokens). `--geometry
tiny`: `parity.pipeline.tiny_configs` (the small release on 9-frame windows, untiled): the same code, for the CPU
tests. Weights are random: with `--against`, the reference's (imported through our rule tables), else our own init.

Needs jax, flax, optax, orbax, and with `--against` torch, diffusers and transformers; no mediapipe, no grain, no
OpenCV (control frames are synthetic). BUILD_NOTES (issue 14) says how to run it on a lent GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from typing import Any, Callable

import numpy as np

from a1_jax.parity import errors, import_reference, time_call
from a1_jax.parity import dit as dit_parity
from a1_jax.parity import pipeline as reference

STEPS, GUIDANCE, CFG_BATCH = 10, 3.0, 2


def _log(message: str) -> None:
    print(f"[bench pipeline] {message}", file=sys.stderr, flush=True)


def bench_configs(geometry: str) -> Any:
    """The ModelConfigs of `full` (the release) or `tiny` (`parity.pipeline.tiny_configs`)."""
    from a1_jax.weights import checkpoint

    if geometry == "full":
        return checkpoint.ModelConfigs.from_folder(checkpoint.model_config_folder("5b"))
    return reference.tiny_configs()


def our_animator(configs: Any, dtype: str, seed: int) -> Any:
    """Our Animator on one device in `dtype` with our own random init (no reference to import from)."""
    import jax
    import jax.numpy as jnp

    from a1_jax import parallel
    from a1_jax.sampling import Animator
    from a1_jax.weights import checkpoint

    preset = parallel.load_preset("single")
    mesh = parallel.make_mesh(preset, jax.devices()[:1])
    networks = checkpoint.build_networks(configs, jnp.dtype(dtype))
    params = checkpoint.init_params(networks, seed, checkpoint.param_shardings(networks, mesh, preset.rules))
    return Animator(configs, networks, params, mesh=mesh, rules=preset.rules)


class _Stages:
    """Wall seconds per stage; `sync` waits for the device after each."""

    def __init__(self, sync: Callable[[Any], Any]):
        self.seconds: dict[str, float] = {}
        self.sync = sync

    def __call__(self, stage: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        out = self.sync(fn())
        self.seconds[f"{stage}_s"] = time.perf_counter() - start
        return out


def our_clip(animator: Any, canvas: np.ndarray, face: np.ndarray, control: np.ndarray, image_noise: np.ndarray,
             noise: np.ndarray) -> tuple[dict[str, float], Any, np.ndarray]:
    """One window through the Animator: `(seconds per stage, final latents, uint8 frames)`. Tiled as the release's
    `enable_tiling()`, which the torch loop runs (the 5B VAE at full geometry tiles under "auto" anyway)."""
    import jax

    stages = _Stages(jax.block_until_ready)
    conditions = stages("conditions", lambda: animator.conditions(
        animator.encode_reference(canvas, face, tiling=True), control, image_noise=image_noise))
    latents, _ = stages("denoise", lambda: animator.denoise(conditions, steps=STEPS, guidance=GUIDANCE, noise=noise))
    frames = stages("decode", lambda: animator.decode(latents, tiling=True))
    stages.seconds["total_s"] = sum(stages.seconds.values())
    return stages.seconds, latents, frames


def reference_clip(pipe: Any, canvas: np.ndarray, face: np.ndarray, control: np.ndarray, image_noise: np.ndarray,
                   noise: np.ndarray) -> tuple[dict[str, float], Any, np.ndarray]:
    """The same window through the torch loop over the reference modules."""
    torch = import_reference("torch")
    sync = (lambda out: (torch.cuda.synchronize(), out)[1]) if pipe.device.type == "cuda" else (lambda out: out)
    stages = _Stages(sync)
    conditions = stages("conditions", lambda: reference.reference_conditions(pipe, canvas, control, face,
                                                                             image_noise))
    latents, _ = stages("denoise", lambda: reference.reference_denoise(pipe, conditions, noise, steps=STEPS,
                                                                       guidance=GUIDANCE))
    frames = stages("decode", lambda: reference.reference_frames(pipe, latents))
    stages.seconds["total_s"] = sum(stages.seconds.values())
    return stages.seconds, latents, frames


def train_step(configs: Any, blocks: int, batch: int, repeats: int, seed: int, dtype: str) -> dict[str, Any]:
    """Seconds per step and MFU of the stage-3 train step of the DiT truncated to `blocks` blocks."""
    import os

    import jax
    import jax.numpy as jnp
    from flax.core import meta

    from a1_jax import parallel
    from a1_jax.models import dit
    from a1_jax.train import config as train_config, state as train_state, trainer
    from a1_jax.weights.checkpoint import CONFIGS

    transformer = dataclasses.replace(configs.transformer, num_layers=blocks)
    configs = dataclasses.replace(configs, transformer=transformer)
    height, width = configs.canvas
    config = train_config.load(os.path.join(CONFIGS, "train", "stage3.yaml"))
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, batch_size=batch,
                                                                  frames=configs.clip_frames, height=height,
                                                                  width=width),
                                 compute=dataclasses.replace(config.compute, dtype=dtype))
    preset = parallel.load_preset("single")
    mesh, rules = parallel.make_mesh(preset, jax.devices()[:1]), preset.rules
    fp32 = dit.DiT(transformer, dtype=jnp.float32, param_dtype=jnp.float32, remat=config.compute.remat)
    model = fp32.clone(dtype=jnp.dtype(dtype))  # fp32 master weights, compute in bf16, as the trainer does
    example = dit.example_inputs(transformer, batch=1)
    param_shardings = parallel.shardings(dit.abstract_params(fp32, example), mesh, rules)
    params = jax.jit(lambda key: meta.unbox(fp32.init(key, *(jnp.zeros(x.shape, x.dtype) for x in example))["params"]),
                     out_shardings=param_shardings)(jax.random.key(seed))
    labels = train_state.stage_labels(params, config.stage)
    optimizer = train_state.make_optimizer(config.optimizer, labels)
    ema_paths = train_state.trainable_paths(labels) if config.ema_decay is not None else None
    init = lambda p: train_state.init_state(p, optimizer, seed, ema_paths)
    shardings = train_state.state_shardings(jax.eval_shape(init, params), param_shardings, mesh)
    state = jax.jit(init, out_shardings=shardings)(params)
    del params
    step, batch_shardings = trainer.build_step(config, configs, model, labels, optimizer, shardings, mesh, rules)
    abstract = trainer.abstract_batch(config, configs)
    keys = jax.random.split(jax.random.key(seed + 1), 4)
    data = type(abstract)(
        video=jax.random.normal(keys[0], abstract.video.shape, jnp.float32),
        image=jax.random.normal(keys[1], abstract.image.shape, jnp.float32),
        pose=jax.random.normal(keys[2], abstract.pose.shape, jnp.float32),
        face=jax.random.normal(keys[3], abstract.face.shape, jnp.float32),
        drop_face=jnp.zeros(abstract.drop_face.shape, bool),
        position=jnp.arange(abstract.position.shape[0], dtype=jnp.uint32))
    data = jax.device_put(data, batch_shardings)
    with parallel.activate(mesh, rules):
        start = time.perf_counter()
        compiled = step.lower(state, data).compile()
        compile_s = time.perf_counter() - start
        state, metrics = compiled(state, data)  # warm-up
        jax.block_until_ready(metrics)
        times = []
        for _ in range(max(1, repeats)):
            start = time.perf_counter()
            state, metrics = compiled(state, data)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    latent = abstract.pose.shape  # [B, F, h, w, C]
    flops = 3 * dit.forward_flops(transformer, batch, latent[1], latent[2], latent[3], abstract.face.shape[1])
    result = {"blocks": blocks, "batch": batch, "remat": config.compute.remat, "compute": dtype,
              "compile_s": compile_s, "step_s": step_s, "flops": flops, "tflops_per_s": flops / step_s / 1e12,
              "loss": float(metrics["loss"])}
    peak = dit_parity.peak_flops(dtype)
    if peak is not None:
        result.update(peak_flops=peak, mfu=flops / step_s / peak)
    return result


def bench(args: argparse.Namespace) -> dict:
    """`a1-jax bench pipeline [--against diffusers] [--geometry full|tiny] [--blocks N]`."""
    start = time.perf_counter()
    against = getattr(args, "against", None) == "diffusers"
    device = dit_parity.torch_device() if against else None  # before JAX's backend starts (memory sharing)
    import jax

    dtype = args.dtype or "bfloat16"
    configs = bench_configs(args.geometry)
    canvas, face, (control,) = reference.random_inputs(configs, args.seed)
    image_noise, noise = reference.window_noises(configs, np.random.default_rng(args.seed))
    result: dict[str, Any] = {"component": "pipeline", "geometry": args.geometry, "dtype": dtype,
                              "device": jax.devices()[0].device_kind, "steps": STEPS, "frames": configs.clip_frames,
                              "canvas": list(configs.canvas)}

    pipe = None
    if against:
        torch = import_reference("torch")
        _log(f"building the random reference on {device}")
        pipe = reference.reference_for(configs, args.seed, device)
    _log("placing our weights")
    if pipe is None:
        animator = our_animator(configs, dtype, args.seed)
    else:
        animator = reference.animator_from_reference(pipe, configs, dtype)
        pipe = pipe.to(getattr(torch, dtype), copy_modules=False)
        if device == "cuda":
            torch.cuda.empty_cache()  # the fp32 weights' memory back to the device, for JAX

    _log("clip: first call (compiles)")
    cold, _, _ = our_clip(animator, canvas, face, control, image_noise, noise)
    _log(f"clip: {cold}; second call")
    warm, latents, frames = our_clip(animator, canvas, face, control, image_noise, noise)
    clip = {"ours_first_call": cold, "ours": warm,
            "compile_s": {k: cold[k] - warm[k] for k in cold}, "ours_peak_bytes": dit_parity.device_peak_bytes()}
    _log(f"clip: {warm}, peak {clip['ours_peak_bytes']}")
    if pipe is not None:
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        theirs, their_latents, their_frames = reference_clip(pipe, canvas, face, control, image_noise, noise)
        clip["reference"] = theirs
        clip["speedup"] = {k: theirs[k] / warm[k] for k in warm}
        clip["latents_max_rel_err"] = errors({"x": (np.asarray(latents, np.float32),
                                                    reference.to_numpy(their_latents))})["x"]["max_rel_err"]
        clip["frames"] = reference.frame_errors(frames, their_frames)
        if device == "cuda":
            clip["reference_peak_bytes"] = float(torch.cuda.max_memory_allocated())
        _log(f"clip reference: {theirs}")
    result["clip"] = clip

    _log("dit forward")
    inputs = dit_parity.random_inputs(configs.transformer, CFG_BATCH, args.seed)
    forward = dit_parity.time_forwards(configs.transformer, animator.networks.transformer,
                                       animator.params["transformer"], pipe.transformer if pipe else None,
                                       pipe.pose_proj if pipe else None, inputs, args.repeats, dtype)
    outputs = forward.pop("outputs")
    if pipe is not None:
        forward["max_rel_err"] = errors({"v": outputs})["v"]["max_rel_err"]
        forward["tol"] = dit_parity.BENCH_TOLERANCE[dtype]
    result["dit_forward"] = forward
    _log(f"dit forward: {forward}")
    del animator, pipe

    _log(f"train step: {args.blocks} blocks")
    result["train_step"] = train_step(configs, args.blocks, CFG_BATCH, args.repeats, args.seed, dtype)
    _log(f"train step: {result['train_step']}")

    finite = bool(np.isfinite(np.asarray(latents, np.float32)).all()) and np.isfinite(result["train_step"]["loss"])
    result["seconds"] = time.perf_counter() - start
    result["ok"] = finite and forward.get("max_rel_err", 0.0) <= forward.get("tol", np.inf)
    return result
