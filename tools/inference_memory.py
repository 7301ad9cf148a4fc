"""Device memory of full-geometry inference, stage by stage: an estimate from the compiled programs' memory analysis
on abstract inputs (no weights are allocated, so the 5B model is planned on any machine). A device's own statistics
measure it: `a1-jax bench pipeline` reports the runtime's peak (`memory_stats`).

    python tools/inference_memory.py --config 5b --dtype bfloat16 --steps 10 [--topology v5p:2x2x1]

The programs are the ones `a1-jax animate` runs for one 49-frame window, compiled exactly as it calls them (the VAE
and pose guider through their jitted chunk steps, the previous conv cache donated): SigLIP on the face crop; the VAE
encoder on one tile of the reference; the pose guider's first frame chunk and its steady-state chunk, which also
takes and returns the causal convolutions' cache; one denoising step (CFG batch 2; the loop runs it once per step,
holding the scheduler's state and the window's overlap tails between steps); the VAE
decoder's first and steady-state chunk of one tile. Each stage's peak, for both placements of the Animator, is

    the parameters resident on the device: every network's (`offload` off: all four stay on the device), or the
    stage's own network only (`offload` on: the others wait in host memory)
  + what the pipeline holds on the device while the stage runs, outside its program (`held_bytes`: the control video
    in float32 during the pose guider, every decoded tile during the decode until they are blended, ...)
  + the program's own arguments other than parameters, its outputs not written into donated inputs, and its
    temporaries,

and the pipeline's peak is the largest of them. These are the compiler's plan, not a measurement.

XLA:CPU (the default here) has no bf16 matmul: its `float-normalization-bf16` pass converts every bf16 dot's operands
to f32, and while-loop-invariant code motion then hoists the converts of the (loop-invariant) stacked DiT weights out
of the layer loop, so an f32 copy of every weight (2× the bf16 bytes: 22.6 GB for the 5B) would sit in the
denoising step's temporaries. GPUs (Ampere on) and TPUs run bf16 matmuls natively: no convert, nothing to hoist,
the weights are read in place. So on XLA:CPU the programs are compiled with that code motion off
(`CPU_COMPILER_OPTIONS`): the weights are then read in place and converted one block at a time. Likewise the VAE's
causal convs are traced as accelerators run them (the native 3-D conv), not in the per-frame 2-D form the VAE uses
on XLA:CPU for speed (`vae.conv_as_2d`), whose per-tap outputs tripled the pose guider's steady chunk (20.2 GB of
temporaries against 6.4). XLA:CPU's temporaries still overstate an accelerator's (bf16 dots and convs run in f32).
`--topology` compiles for one chip of a TPU topology ahead of time instead (needs `pip install libtpu`; no TPU is
used): an accelerator compiler's memory plan, as close to a 24 GB GPU card as this machine gets. No GPU compiler can
run without a GPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta
from jax.experimental import topologies

from a1_jax import conditions as cond
from a1_jax import diffusion
from a1_jax.models import dit, vae
from a1_jax.parallel import MESH_AXES, activate
from a1_jax.parallel.plan import plan_of
from a1_jax.sampling import denoise as loop
from a1_jax.weights import checkpoint

GB = 1e9
MODES = {"off": "every network resident", "on": "only the stage's network resident (offload)"}
# See the module doc: XLA:CPU's hoisted f32 copies of the bf16 weights are not an accelerator's memory.
CPU_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


def _struct(shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


def _bytes(tree) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


def _tile_sizes(size: int, tile: int, stride: int) -> list[int]:
    """Sizes of the tiles `vae.tiled` cuts along one axis of `size`."""
    return [min(tile, size - start) for start in range(0, size, stride)]


def stage_programs(configs: checkpoint.ModelConfigs, dtype: str, steps: int) -> tuple[dict, dict]:
    """`({stage: (jitted function, abstract args, its network, parameter bytes among the args, bytes held outside
    it)}, {network: parameter bytes})` for one 49-frame window at the config's size."""
    networks = checkpoint.build_networks(configs, jnp.dtype(dtype))
    params = meta.unbox(checkpoint.abstract_params(networks))
    height, width = configs.canvas
    frames, latent_frames = configs.clip_frames, dit.sample_latent_frames(configs.transformer)
    v, s, t = configs.vae, configs.siglip, configs.transformer
    latent = (height // v.spatial_compression, width // v.spatial_compression)
    tile, tile_latent = networks.vae.tile_sample, networks.vae.tile_latent
    first_encode, steady_encode, _ = vae.chunk_sizes(frames, vae.ENCODE_CHUNK_FRAMES)
    first_decode, steady_decode, _ = vae.chunk_sizes(latent_frames, vae.DECODE_CHUNK_FRAMES)
    itemsize = jnp.dtype(dtype).itemsize

    # What `vae.encode`/`decode` call, donated cache and all; fresh jits, so nothing traced outside `plan_stages`'
    # native-conv setting is reused.
    chunk_step = vae._chunk_step.__wrapped__
    encode = chunk_step(networks.pose_guider, "encode_chunk")
    decode = chunk_step(networks.vae, "decode_chunk")
    # Each chunk program gets only the half of its VAE it reads (jit would drop the other half's arguments anyway).
    encoder, decoder = {"encoder": params["vae"]["encoder"]}, {"decoder": params["vae"]["decoder"]}
    control = _struct((1, first_encode, height, width, 3), jnp.float32)
    _, encode_cache = jax.eval_shape(encode, params["pose_guider"], control, None)
    tile_z = _struct((1, first_decode, *tile_latent, v.latent_channels), dtype)
    _, decode_cache = jax.eval_shape(decode, decoder, tile_z, None)

    schedule = jax.eval_shape(lambda: diffusion.make_schedule(configs.scheduler, steps))
    latents = _struct((1, latent_frames, v.latent_channels, *latent), dtype)
    conditions = loop.Conditions(image=latents, pose=latents, face=_struct((1, s.num_patches, s.hidden_size), dtype))
    overlap = loop.Overlap(latents=_struct((steps, 1, loop.overlap_latent_frames(), *latents.shape[2:]), dtype),
                           active=_struct((steps,), bool))
    denoise_step = jax.jit(functools.partial(loop.step, networks.transformer), static_argnames=("use_cfg",))
    state = jax.eval_shape(diffusion.init_state, latents)
    tails = _struct(overlap.latents.shape, dtype)  # every step's tail, kept by the loop for the next window

    # Held on the device outside the stage's programs (the driver loops keep them between calls).
    posterior = _struct((1, 1, *latent, 2 * v.latent_channels), dtype)
    tokens = conditions.face
    control_video = _struct((1, frames, height, width, 3), jnp.float32)  # `to_unit_range` of the whole window
    pose_moments = _struct((1, latent_frames, *latent, 2 * v.latent_channels), dtype)  # the chunks' outputs so far
    tiles = [(h * v.spatial_compression, w * v.spatial_compression)
             for h in _tile_sizes(latent[0], tile_latent[0], vae.tile_plan(tile_latent, tile)["stride"][0])
             for w in _tile_sizes(latent[1], tile_latent[1], vae.tile_plan(tile_latent, tile)["stride"][1])]
    decoded_tiles = sum(frames * h * w * 3 * itemsize for h, w in tiles)  # all tiles wait to be blended
    window = (latents, conditions, overlap)  # the loop's result, conditions and the next window's overlap
    return {
        "siglip (face tokens)": (
            cond._siglip_apply(networks.siglip),
            (params["siglip"], _struct((1, s.image_size, s.image_size, 3), jnp.float32)),
            "siglip", _bytes(params["siglip"]), _bytes(posterior)),
        f"vae encode (reference, one {tile[0]}x{tile[1]} tile)": (
            chunk_step(networks.vae, "encode_chunk"), (encoder, _struct((1, 1, *tile, 3), jnp.float32), None),
            "vae", _bytes(encoder), _bytes(_struct((1, 1, height, width, 3), jnp.float32))),
        f"pose guider encode, first chunk ({first_encode} of {frames} frames, {height}x{width})": (
            encode, (params["pose_guider"], control, None),
            "pose_guider", _bytes(params["pose_guider"]), _bytes((posterior, tokens, control_video))),
        f"pose guider encode, steady chunk ({steady_encode} frames + conv cache)": (
            encode, (params["pose_guider"], _struct((1, steady_encode, height, width, 3), jnp.float32),
                     encode_cache),
            "pose_guider", _bytes(params["pose_guider"]), _bytes((posterior, tokens, control_video, pose_moments))),
        f"denoise (one of {steps} steps, CFG batch 2, {t.num_layers} blocks)": (
            denoise_step, (params["transformer"], schedule, conditions, _struct((), jnp.float32), overlap,
                           jax.eval_shape(lambda: jax.random.key(0)), latents, state, _struct((), jnp.int32)),
            "transformer", _bytes(params["transformer"]), _bytes((tokens, tails))),
        f"vae decode, first chunk ({first_decode} latents of a {tile_latent[0]}x{tile_latent[1]} tile)": (
            decode, (decoder, tile_z, None), "vae", _bytes(decoder), _bytes(window) + decoded_tiles),
        f"vae decode, steady chunk ({steady_decode} latents + conv cache)": (
            decode, (decoder, _struct((1, steady_decode, *tile_latent, v.latent_channels), dtype), decode_cache),
            "vae", _bytes(decoder), _bytes(window) + decoded_tiles),
    }, {name: _bytes(tree) for name, tree in params.items()}


def plan_stages(configs: checkpoint.ModelConfigs, dtype: str, steps: int, device: jax.Device) -> dict:
    """Every stage's memory as the compiler for `device` plans it, and the pipeline's peak, with every network
    resident (`"off"`) and with only the stage's own (`"on"`, the Animator's offload) (see the module doc)."""
    with mock.patch.object(vae, "conv_as_2d", lambda: False):  # the accelerators' conv (see the module doc)
        return _plan_stages(configs, dtype, steps, device)


def _plan_stages(configs: checkpoint.ModelConfigs, dtype: str, steps: int, device: jax.Device) -> dict:
    programs, nbytes = stage_programs(configs, dtype, steps)
    all_params = sum(nbytes.values())
    mesh = jax.sharding.Mesh(np.array([device]).reshape((1,) * len(MESH_AXES)), MESH_AXES)
    place = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec()))
    options = CPU_COMPILER_OPTIONS if device.platform == "cpu" else None
    rows = {}
    for stage, (fn, stage_args, network, param_bytes, held_bytes) in programs.items():
        print(f"compiling {stage} ...", file=sys.stderr, flush=True)
        with activate(mesh, ()):  # the mesh's platform picks the attention kernel (splash on a TPU)
            plan = plan_of(fn.lower(*jax.tree_util.tree_map(place, stage_args)).compile(compiler_options=options))
        working = plan.peak_bytes - param_bytes
        resident = {"off": all_params, "on": nbytes[network]}
        rows[stage] = {"network": network, "param_bytes": param_bytes,
                       "other_argument_bytes": plan.argument_bytes - param_bytes,
                       "output_bytes": plan.output_bytes, "alias_bytes": plan.alias_bytes,
                       "temp_bytes": plan.temp_bytes, "held_bytes": held_bytes, "resident_bytes": resident,
                       "stage_peak_bytes": {mode: resident[mode] + held_bytes + working for mode in MODES}}
    return {"dtype": dtype, "steps": steps, "device": device.device_kind, "compiler_options": options,
            "kind": "estimate from compiled programs (not measured on a device)", "offload": MODES,
            "params_bytes": nbytes, "all_params_bytes": all_params, "stages": rows,
            "pipeline_peak_bytes": {mode: max(row["stage_peak_bytes"][mode] for row in rows.values())
                                    for mode in MODES}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="5b", help="a release-layout config folder, or tiny / 5b")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--topology", help="compile for the first chip of this TPU topology with libtpu (e.g. "
                                           "v5p:2x2x1; libtpu 0.0.42 refuses a topology smaller than one host)")
    args = parser.parse_args(argv)
    configs = checkpoint.ModelConfigs.from_folder(checkpoint.model_config_folder(args.config))
    device = (topologies.get_topology_desc(platform="tpu", topology_name=args.topology).devices[0] if args.topology
              else jax.devices()[0])
    summary = {"config": args.config, **plan_stages(configs, args.dtype, args.steps, device), "ok": True}
    for stage, row in summary["stages"].items():
        peak = row["stage_peak_bytes"]
        print(f"{stage:72s} temp {row['temp_bytes'] / GB:6.2f}  held {row['held_bytes'] / GB:5.2f}  stage peak "
              f"{peak['off'] / GB:6.2f} GB, offloaded {peak['on'] / GB:6.2f} GB", file=sys.stderr)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
