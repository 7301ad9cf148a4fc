"""Device memory of full-geometry inference, per stage, from the compiled programs' memory analysis on abstract
inputs (no weights are allocated, so the 5B model is planned on any machine).

    python tools/inference_memory.py --config configs/5b --dtype bfloat16 --steps 10 [--topology v6e:1x1]

Stages are the programs `a1-jax animate` runs: SigLIP on the face crop; the VAE encoder on one tile of the reference
(tiled like `enable_tiling()`); the pose guider's encoder on the first (largest) frame chunk of the control video; the
whole denoising loop (CFG batch 2, every step); the VAE decoder on one tile's first latent chunk. For each: the
network's parameters, the other inputs and outputs, and the compiler's temporaries. `pipeline_peak_bytes` is every
network's parameters resident at once plus the largest stage's working set.

Figures are the plan of the compiler the programs are built for. XLA:CPU (the default here) assigns buffers with
little reuse across a scanned layer stack, so its temporaries overstate an accelerator's. `--topology` compiles for
one chip of a TPU topology ahead of time instead (needs `pip install libtpu`; no TPU is used): an accelerator
compiler's memory plan, the closest to a 24 GB GPU card this machine can produce. No GPU compiler can run without a
GPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta
from jax.experimental import topologies

from a1_jax import diffusion
from a1_jax.models import dit, vae
from a1_jax.parallel import MESH_AXES, activate
from a1_jax.parallel.plan import step_plan
from a1_jax.sampling import denoise as loop
from a1_jax.weights import checkpoint

GB = 1e9


def _struct(shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


def stage_programs(configs: checkpoint.ModelConfigs, dtype: str, steps: int) -> dict:
    """`{stage: (jitted function, abstract args, bytes of the params it reads)}` for one 49-frame window at the
    config's size, and every network's parameter bytes."""
    networks = checkpoint.build_networks(configs, jnp.dtype(dtype))
    params = meta.unbox(checkpoint.abstract_params(networks))
    height, width = configs.canvas
    frames, latent_frames = configs.clip_frames, dit.sample_latent_frames(configs.transformer)
    v, s, t = configs.vae, configs.siglip, configs.transformer
    latent = (height // v.spatial_compression, width // v.spatial_compression)
    tile = networks.vae.tile_sample
    tile_latent = networks.vae.tile_latent
    first_encode, _, _ = vae.chunk_sizes(frames, vae.ENCODE_CHUNK_FRAMES)
    first_decode, _, _ = vae.chunk_sizes(latent_frames, vae.DECODE_CHUNK_FRAMES)

    def chunk(model, method):  # `p`: the encoder's or the decoder's params only, what the chunk reads
        part = method.split("_")[0] + "r"
        return jax.jit(lambda p, x: getattr(model.bind({"params": {part: p}}), method)(x, None)[0])

    def size(tree) -> int:
        return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))

    schedule = jax.eval_shape(lambda: diffusion.make_schedule(configs.scheduler, steps))
    latents = _struct((1, latent_frames, v.latent_channels, *latent), dtype)
    conditions = loop.Conditions(image=latents, pose=latents, face=_struct((1, s.num_patches, s.hidden_size), dtype))
    overlap = loop.Overlap(latents=_struct((steps, 1, loop.overlap_latent_frames(), *latents.shape[2:]), dtype),
                           active=_struct((steps,), bool))
    denoise = jax.jit(functools.partial(loop.denoise, networks.transformer), static_argnames=("use_cfg",))
    return {
        "siglip (face tokens)": (jax.jit(lambda p, x: networks.siglip.apply({"params": p}, x)),
                                 (params["siglip"], _struct((1, s.image_size, s.image_size, 3), jnp.float32)),
                                 size(params["siglip"])),
        f"vae encode (reference, one {tile[0]}x{tile[1]} tile)": (
            chunk(networks.vae, "encode_chunk"), (params["vae"]["encoder"], _struct((1, 1, *tile, 3), dtype)),
            size(params["vae"]["encoder"])),
        f"pose guider encode ({first_encode} of {frames} frames, {height}x{width})": (
            chunk(networks.pose_guider, "encode_chunk"),
            (params["pose_guider"]["encoder"], _struct((1, first_encode, height, width, 3), dtype)),
            size(params["pose_guider"]["encoder"])),
        f"denoise ({steps} steps, CFG batch 2, {t.num_layers} blocks)": (
            denoise, (params["transformer"], schedule, conditions, latents, _struct((), jnp.float32), overlap,
                      jax.eval_shape(lambda: jax.random.key(0))), size(params["transformer"])),
        f"vae decode ({first_decode} latents of one {tile_latent[0]}x{tile_latent[1]} tile)": (
            chunk(networks.vae, "decode_chunk"),
            (params["vae"]["decoder"], _struct((1, first_decode, *tile_latent, v.latent_channels), dtype)),
            size(params["vae"]["decoder"])),
    }, {name: size(tree) for name, tree in params.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="5b", help="a release-layout config folder, or tiny / 5b")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--topology", help="compile for one chip of this TPU topology (e.g. v6e:1x1) with libtpu")
    args = parser.parse_args(argv)
    configs = checkpoint.ModelConfigs.from_folder(checkpoint.model_config_folder(args.config))
    programs, nbytes = stage_programs(configs, args.dtype, args.steps)
    device = (topologies.get_topology_desc(platform="tpu", topology_name=args.topology).devices[0] if args.topology
              else jax.devices()[0])
    mesh = jax.sharding.Mesh(np.array([device]).reshape((1,) * len(MESH_AXES)), MESH_AXES)
    place = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec()))
    rows, working = {}, []
    for stage, (fn, stage_args, param_bytes) in programs.items():
        print(f"compiling {stage} ...", file=sys.stderr, flush=True)
        with activate(mesh, ()):  # the mesh's platform picks the attention kernel (splash on a TPU)
            plan = step_plan(fn, *jax.tree_util.tree_map(place, stage_args))
        rows[stage] = {"param_bytes": param_bytes, "other_argument_bytes": plan.argument_bytes - param_bytes,
                       "output_bytes": plan.output_bytes, "temp_bytes": plan.temp_bytes,
                       "peak_bytes": plan.peak_bytes}
        working.append(plan.peak_bytes - param_bytes)
    summary = {"config": args.config, "dtype": args.dtype, "steps": args.steps, "device": device.device_kind,
               "stages": rows, "all_params_bytes": sum(nbytes.values()),
               "pipeline_peak_bytes": sum(nbytes.values()) + max(working), "ok": True}
    for stage, row in rows.items():
        print(f"{stage:70s} params {row['param_bytes'] / GB:7.2f} GB  temp {row['temp_bytes'] / GB:7.2f} GB  "
              f"peak {row['peak_bytes'] / GB:7.2f} GB", file=sys.stderr)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
