"""The DiT against diffusers' `CogVideoXTransformer3DModel` fed `pose_proj(face)` (what SkyReels-A1 computes).

The reference is diffusers' model built from the same config plus a torch `Sequential(Linear, SiLU, Linear)` connector
made here; the state dict our importer reads is the model's keys plus `patch_embed.pose_proj.{0,2}.*`, as in the
release (spec §2.6). RoPE for the reference is built with diffusers' own functions the way the CogVideoX pipeline
does it; ours is computed inside the model.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from a1_jax.config import DiTConfig
from a1_jax.errors import UserError
from a1_jax.models import dit
from a1_jax.parity import (fp32_reference, import_reference, perturb_plain_tensors, report, time_call, to_numpy,
                           torch_state)
from a1_jax.weights import open_checkpoint
from a1_jax.weights.dit import import_dit

_POSE_PROJ = "patch_embed.pose_proj."

# Dense peak FLOP/s per device (vendor datasheets, SXM parts) for the MFU figure; unknown devices report none.
PEAK_FLOPS = {"H200": {"bfloat16": 989e12, "float32": 67e12}, "H100": {"bfloat16": 989e12, "float32": 67e12},
              "A100": {"bfloat16": 312e12, "float32": 19.5e12}}


def reference_kwargs(config: DiTConfig) -> dict[str, Any]:
    """Our config as `CogVideoXTransformer3DModel(**kwargs)` (the keys diffusers knows; the connector's are ours)."""
    diffusers = import_reference("diffusers")
    known = inspect.signature(diffusers.CogVideoXTransformer3DModel.__init__).parameters
    return {name: getattr(config, name) for name in known if hasattr(config, name)}


def reference_rope(config: DiTConfig, frames: int, height: int, width: int, device: Any = None,
                   base: tuple[int, int] | None = None) -> Any:
    """diffusers' RoPE cos/sin as `CogVideoXImageToVideoPipeline._prepare_rotary_positional_embeddings` builds them:
    the latent grid placed in a base grid of `base` (height, width) patches, by default the config's sample size."""
    if not config.use_rotary_positional_embeddings:
        return None
    embeddings = import_reference("diffusers.models.embeddings")
    pipeline = import_reference("diffusers.pipelines.cogvideo.pipeline_cogvideox_image2video")
    p = config.patch_size
    grid = (height // p, width // p)
    base_h, base_w = base or (config.sample_height // p, config.sample_width // p)
    crops = pipeline.get_resize_crop_region_for_grid(grid, base_w, base_h)
    return embeddings.get_3d_rotary_pos_embed(embed_dim=config.attention_head_dim, crops_coords=crops, grid_size=grid,
                                              temporal_size=frames, device=device)


RELEASE_CANVAS = (480, 720)  # pixels: the SkyReels-A1 pipelines' hard-coded RoPE base


def skyreels_rope(config: DiTConfig, frames: int, height: int, width: int, spatial_compression: int) -> Any:
    """The SkyReels-A1 pipelines' RoPE: the same construction on a base grid of the hard-coded 480×720 canvas
    (`720 // (vae_scale_factor_spatial * patch_size)`), whatever the config's sample size. Equal to
    `reference_rope` at the release geometry only (a1_jax follows the config: BUILD_NOTES, RoPE base grid)."""
    step = spatial_compression * config.patch_size
    return reference_rope(config, frames, height, width, base=(RELEASE_CANVAS[0] // step, RELEASE_CANVAS[1] // step))


def build_reference(config: DiTConfig, seed: int, checkpoint: str | None = None,
                    device: str = "cpu") -> tuple[Any, Any, dict]:
    """`(diffusers model, torch pose_proj, state dict with the connector)`, fp32, eval mode, on `device`.

    Random (seeded, every tensor non-trivial) unless `checkpoint`, a folder with the transformer's `config.json` and
    safetensors (single or sharded): then both sides read the same files. Random init on an accelerator is fast
    even at 5B; the state dict always comes back as host NumPy.
    """
    torch = import_reference("torch")
    diffusers = import_reference("diffusers")
    torch.manual_seed(seed)
    pose_proj = torch.nn.Sequential(torch.nn.Linear(config.face_embed_dim, config.face_hidden_dim), torch.nn.SiLU(),
                                    torch.nn.Linear(config.face_hidden_dim, config.text_embed_dim))
    if checkpoint is None:
        with torch.device(device):
            model = diffusers.CogVideoXTransformer3DModel(**reference_kwargs(config))
        perturb_plain_tensors(model, seed, also=("pos_embedding",))
        state = {**torch_state(model), **{_POSE_PROJ + k: v for k, v in torch_state(pose_proj).items()}}
    else:
        # The connector is not a diffusers module: diffusers reports its tensors as unexpected and we load them here.
        model = diffusers.CogVideoXTransformer3DModel.from_pretrained(checkpoint, torch_dtype=torch.float32)
        state = open_checkpoint(checkpoint)
        connector = {k[len(_POSE_PROJ):]: torch.from_numpy(np.array(state[k], np.float32))
                     for k in state if k.startswith(_POSE_PROJ)}
        if not connector:
            raise UserError(f"{checkpoint} has no {_POSE_PROJ}* tensors: not a SkyReels-A1 transformer")
        pose_proj.load_state_dict(connector)
    return model.float().eval(), pose_proj.float().eval(), state


def load_ours(config: DiTConfig, state: Any, inputs: tuple, dtype: Any = jnp.float32, **model_kw: Any) -> tuple:
    """`(DiT, params)` with `state` imported through the rule table, params cast to `dtype`."""
    model = dit.DiT(config, dtype=dtype, param_dtype=dtype, **model_kw)
    params = import_dit(state, dit.abstract_params(model, inputs), dtype=np.dtype(dtype))
    return model, jax.tree_util.tree_map(jnp.asarray, params)


def random_inputs(config: DiTConfig, batch: int, seed: int, frames: int | None = None, height: int | None = None,
                  width: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normal latents and face tokens at the config's sample size (unless given), two or more distinct timesteps."""
    shapes = dit.example_inputs(config, batch, frames, height, width)
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal(shapes[0].shape, dtype=np.float32)
    face = rng.standard_normal(shapes[1].shape, dtype=np.float32)
    timestep = rng.choice(1000, size=batch, replace=batch > 1000).astype(np.float32)
    return latents, face, timestep


def reference_forward(model: Any, pose_proj: Any, latents: Any, face: Any, timestep: Any, rope: Any) -> Any:
    """The release's computation: `transformer(latents, pose_proj(face), t, image_rotary_emb=rope)`."""
    return model(hidden_states=latents, encoder_hidden_states=pose_proj(face), timestep=timestep,
                 image_rotary_emb=rope, return_dict=False)[0]


def check(config: DiTConfig, *, seed: int = 0, batch: int = 2, frames: int | None = None, height: int | None = None,
          width: int | None = None, checkpoint: str | None = None, name: str = "dit", **model_kw: Any) -> dict:
    """fp32 parity of our DiT against the reference on random inputs; `report(...)` dict."""
    torch = import_reference("torch")
    with fp32_reference():
        model, pose_proj, state = build_reference(config, seed, checkpoint)
        inputs = random_inputs(config, batch, seed, frames, height, width)
        ours_model, params = load_ours(config, state, tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in inputs),
                                       **model_kw)
        ours = jax.jit(lambda p, *x: ours_model.apply({"params": p}, *x))(params, *inputs)
        with torch.no_grad():
            _, frames, _, height, width = inputs[0].shape
            rope = reference_rope(config, frames, height, width)
            ref = reference_forward(model, pose_proj, *(torch.from_numpy(x) for x in inputs), rope)
    return report("dit", name, inputs[0].shape, {"v_prediction": (np.asarray(ours), to_numpy(ref))},
                  timesteps=inputs[2].tolist())


def parity(args: argparse.Namespace) -> dict:
    """`a1-jax parity dit`: batch 2 (or --batch) at the config's sample size, fp32 on CPU."""
    config = DiTConfig.from_json(args.config)
    return check(config, seed=args.seed, batch=args.batch or 2, checkpoint=args.checkpoint, name=args.config)


def device_peak_bytes() -> float | None:
    """The JAX runtime's own peak of device memory in use (its allocator statistics); None where it keeps none."""
    stats = jax.devices()[0].memory_stats() or {}
    return float(stats["peak_bytes_in_use"]) if "peak_bytes_in_use" in stats else None


def peak_flops(dtype_name: str) -> float | None:
    """The dense peak FLOP/s of this JAX device for `dtype_name`, for MFU; None for a device not in the table."""
    kind = jax.devices()[0].device_kind
    return next((v[dtype_name] for k, v in PEAK_FLOPS.items() if k in kind), None)


def torch_device() -> str:
    """Where the reference runs: the GPU when torch sees one. Both frameworks then share it, so JAX must not reserve
    75 % of it up front (read when its backend starts, so call this first)."""
    torch = import_reference("torch")
    if not torch.cuda.is_available():
        return "cpu"
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    return "cuda"


def time_forwards(config: DiTConfig, ours_model: Any, params: Any, model: Any, pose_proj: Any,
                  inputs: tuple[np.ndarray, ...], repeats: int, dtype_name: str) -> dict:
    """Our jitted forward (compile, then the median of `repeats` calls) and, unless `model` is None, the reference's
    on the same inputs, in `dtype_name`; under "outputs" `(ours, reference)` for a parity row (or ours alone)."""
    forward = jax.jit(lambda p, *x: ours_model.apply({"params": p}, *x))
    jax_inputs = tuple(jnp.asarray(x) for x in inputs)
    start = time.perf_counter()
    compiled = forward.lower(params, *jax_inputs).compile()
    compile_s = time.perf_counter() - start
    run_jax = lambda: compiled(params, *jax_inputs)
    ours = np.asarray(jax.block_until_ready(run_jax()), np.float32)  # warm-up
    jax_s = time_call(run_jax, repeats, jax.block_until_ready)
    del compiled, run_jax
    _, frames, _, height, width = inputs[0].shape
    flops = dit.forward_flops(config, inputs[0].shape[0], frames, height, width, inputs[1].shape[1])
    result = {"jax_s": jax_s, "compile_s": compile_s, "flops": flops, "jax_tflops_per_s": flops / jax_s / 1e12,
              "outputs": ours}
    peak = peak_flops(dtype_name)
    if peak is not None:
        result.update(peak_flops=peak, jax_mfu=flops / jax_s / peak)
    if model is None:
        return result

    torch = import_reference("torch")
    device = str(next(model.parameters()).device)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    torch_inputs = [torch.from_numpy(inputs[0]).to(device, torch_dtype),
                    torch.from_numpy(inputs[1]).to(device, torch_dtype), torch.from_numpy(inputs[2]).to(device)]
    sync = (lambda out: torch.cuda.synchronize()) if device.startswith("cuda") else (lambda out: out)
    # RoPE tables are built once per video by the pipeline (ours are compile-time constants): not timed.
    rope = reference_rope(config, frames, height, width, device=device)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        run_torch = lambda: reference_forward(model, pose_proj, *torch_inputs, rope)
        ref = to_numpy(run_torch())  # warm-up
        torch_s = time_call(run_torch, repeats, sync)
    result.update(torch_s=torch_s, speedup=torch_s / jax_s, torch_tflops_per_s=flops / torch_s / 1e12,
                  outputs=(ours, ref))
    if device.startswith("cuda"):
        result["torch_peak_bytes"] = float(torch.cuda.max_memory_allocated())
    if peak is not None:
        result["torch_mfu"] = flops / torch_s / peak
    return result


BENCH_TOLERANCE = {"float32": 1e-5, "bfloat16": 5e-2}  # the timed outputs' sanity bound (not the parity gate)


def bench(args: argparse.Namespace) -> dict:
    """`a1-jax bench dit`: jitted forward vs the PyTorch reference on identical inputs and weights in one run."""
    torch = import_reference("torch")
    config = DiTConfig.from_json(args.config)
    batch, dtype_name = args.batch or 2, args.dtype
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    device = torch_device()
    # fp32 runs at full matmul precision on both sides; bf16 runs at the backends' native bf16 precision.
    precision = fp32_reference() if dtype_name == "float32" else contextlib.nullcontext()
    with precision:
        model, pose_proj, state = build_reference(config, args.seed, args.checkpoint, device)
        # Down to the timed dtype at once: at 5B the fp32 reference would hold 22 GB while JAX runs.
        model, pose_proj = model.to(device, torch_dtype), pose_proj.to(device, torch_dtype)
        inputs = random_inputs(config, batch, args.seed)
        shapes = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in inputs)
        ours_model, params = load_ours(config, state, shapes, dtype=jnp.dtype(dtype_name))
        del state
        timed = time_forwards(config, ours_model, params, model, pose_proj, inputs, args.repeats, dtype_name)
    peak = device_peak_bytes()
    tol = BENCH_TOLERANCE[dtype_name]
    parity_row = report("dit", args.config, inputs[0].shape, {"v_prediction": timed.pop("outputs")}, tol=tol)
    result = {"component": "dit", "config": args.config, "input_shape": list(inputs[0].shape),
              "face_tokens": int(inputs[1].shape[1]), "dtype": dtype_name, "device": jax.devices()[0].device_kind,
              **timed, **({"jax_peak_bytes": peak} if peak is not None else {}),
              "max_rel_err": parity_row["max_rel_err"], "tol": tol}
    result["ok"] = parity_row["ok"]
    return result
