"""What training starts from: the four networks' params, and the DiT from a CogVideoX-I2V-style checkpoint.

`base_model(config, mesh, rules)`: the configs and params of `model.weights` (a release folder, our converted
checkpoint or a training workdir, e.g. the previous stage's), or seeded random params of `model.config`; every
network's params in fp32 (the master weights; the compute dtype is the modules'), on the mesh.

`model.init_transformer` then replaces the DiT with a diffusers CogVideoX transformer that has fewer input channels
and no face connector, the way the reference assembled SkyReels-A1 (spec §2.1 item 4, §7):

* `patch_embed.proj` grows to `[noise | pose | image]` with the new channels zero: a 2C-channel source is an I2V
  model, `[noise | image]`, whose image channels move to the image slot; a C-channel source (text-to-video) gives the
  noise channels only. So at step 0 the pose latents change nothing and the model is the source model.
* a missing `pose_proj` connector (Linear, SiLU, Linear) starts with its *last* layer zero and its first with the
  layer's normal init (LeCun normal kernel, zero bias), so face tokens start as `text_proj`'s bias and the output
  is the source model's, yet gradients reach both layers. The reference's `zero_module` zeroes both; then the
  first layer's gradient is the second's (zero) kernel times the SiLU's output, and the second's gradient is the
  SiLU of the first's (zero) output, silu(0) = 0: both stay exactly zero forever, and face tokens never act.
* a position table of another length (CogVideoX's 226 text rows vs our face-token count) keeps ours: it is the fixed
  sin-cos table (a buffer in diffusers, never trained) with zero face rows.
Every other tensor must match by name and shape (a `UserError` lists what does not).

Zero inits, audited the same way (what does the gradient of a zero tensor depend on?): the pose channels of
`patch_embed.proj` get the pose latents times the upstream gradient (non-zero); `pose_proj_2`, last of its chain,
gets SiLU(first layer) times the upstream gradient (non-zero once the first layer is not zero); the position table's
zero face rows are a frozen buffer; the model's own init zeroes biases only. `a1-jax train` reports any trainable
leaf that never learned (`dead` in its summary).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import meta

from a1_jax import parallel
from a1_jax.errors import UserError
from a1_jax.models import dit
from a1_jax.train.config import TrainConfig
from a1_jax.weights import checkpoint as ckpt
from a1_jax.weights import safetensors_io
from a1_jax.weights.dit import DIT_RULES
from a1_jax.weights.rules import apply_plan, plan_import

PROJ = ("patch_embed", "proj_kernel")
CONNECTOR_FIRST, CONNECTOR_LAST = "pose_proj_0", "pose_proj_2"  # Linear, (SiLU), Linear
POSITIONS = ("patch_embed", "pos_embedding")


@dataclasses.dataclass
class BaseModel:
    configs: ckpt.ModelConfigs
    config_folder: str  # where the configs live (copied into the workdir's model/)
    networks: ckpt.Networks  # fp32 modules (params are created and stored in fp32)
    params: dict[str, Any]
    report: dict[str, Any]  # what was loaded from where, for the run's summary


def base_model(config: TrainConfig, mesh: jax.sharding.Mesh, rules: parallel.Rules) -> BaseModel:
    weights = config.model.weights
    folder = ckpt.config_folder(weights) if weights else ckpt.model_config_folder(config.model.config)
    configs = ckpt.ModelConfigs.from_folder(folder)
    networks = ckpt.build_networks(configs, jnp.float32, attention_kernel=config.compute.attention_kernel,
                                   remat=config.compute.remat)
    shardings = ckpt.param_shardings(networks, mesh, rules)
    if weights:
        params = ckpt.load_params(weights, networks, shardings)
        report = {"weights": weights}
    else:
        params = ckpt.init_params(networks, config.model.seed, shardings)
        report = {"weights": f"random (seed {config.model.seed})"}
    if config.model.init_transformer:
        params["transformer"], report["init_transformer"] = import_transformer(
            config.model.init_transformer, networks.transformer, params["transformer"], shardings["transformer"],
            seed=config.model.seed)
    return BaseModel(configs=configs, config_folder=folder, networks=networks, params=params, report=report)


def weight_sources(base: BaseModel, config: TrainConfig) -> dict[str, str]:
    """Where each network of the base model came from, for its checkpoint's marker (`animate` reports it)."""
    weights = config.model.weights
    sources = (ckpt.weight_sources(weights) if weights else
               {name: ckpt.random_source(config.model.seed) for name in ckpt.NETWORKS})
    if config.model.init_transformer:
        sources["transformer"] = f"imported {config.model.init_transformer}"
    return sources


def grow_input_channels(kernel: np.ndarray, channels: int, latent: int) -> np.ndarray:
    """A patch kernel `[p, p, C_src, D]` -> `[p, p, channels, D]` laid out `[noise | pose | image]`, new channels
    zero: C_src = latent (noise) or 2·latent (noise | image)."""
    source = kernel.shape[2]
    grown = np.zeros(kernel.shape[:2] + (channels,) + kernel.shape[3:], kernel.dtype)
    if source == latent:
        grown[:, :, :latent] = kernel
    elif source == 2 * latent and channels == 3 * latent:
        grown[:, :, :latent] = kernel[:, :, :latent]
        grown[:, :, 2 * latent:] = kernel[:, :, latent:]
    elif source == channels:
        grown = kernel
    else:
        raise UserError(f"the transformer to initialise from has {source} input channels; expected {latent} "
                        f"(noise), {2 * latent} (noise | image, an I2V model) or {channels}")
    return grown


def new_connector(target: dict, seed: int) -> dict:
    """Host arrays of a connector the source lacks (paths as in `target`, the DiT's flat abstract params): the
    last layer zero, the first LeCun normal (as `layers.dense` initialises it; seeded) with a zero bias."""
    key = jax.random.key(seed)
    out = {}
    for path, leaf in target.items():
        if path[0] != "patch_embed" or path[1] not in (CONNECTOR_FIRST, CONNECTOR_LAST):
            continue
        if path[1] == CONNECTOR_FIRST and path[-1] == "kernel":
            out[path] = np.asarray(nn.initializers.lecun_normal()(key, leaf.shape, jnp.float32))
        else:
            out[path] = np.zeros(leaf.shape, np.float32)
    return out


def import_transformer(folder: str, model: dit.DiT, base: dict, shardings: dict, *, seed: int = 0) -> tuple[dict,
                                                                                                            dict]:
    """`base` (the DiT's params on the mesh) with every tensor of the diffusers transformer in `folder` (or its
    `transformer/`), input channels grown and a new connector (`new_connector`) when the source lacks one."""
    part = os.path.join(folder, "transformer")
    state = safetensors_io.open_checkpoint(part if os.path.isdir(part) else folder)
    shapes = state.shapes()
    if "patch_embed.proj.weight" not in shapes:
        raise UserError(f"{folder} is not a CogVideoX transformer checkpoint (no patch_embed.proj.weight)")
    target = traverse_util.flatten_dict(meta.unbox(jax.eval_shape(lambda: base)))
    channels, latent = model.config.in_channels, model.config.out_channels
    source_channels = shapes["patch_embed.proj.weight"][1]
    target[PROJ] = jax.ShapeDtypeStruct(target[PROJ].shape[:2] + (source_channels,) + target[PROJ].shape[3:],
                                        jnp.float32)
    has_connector = any(name.startswith("patch_embed.pose_proj.") for name in shapes)
    connector, kept, skip = {}, [], []
    if not has_connector:
        connector = new_connector(target, seed)
        for path in connector:
            del target[path]
    source_rows = shapes.get("patch_embed.pos_embedding")
    if source_rows is not None and (POSITIONS not in target or tuple(source_rows[1:]) != target[POSITIONS].shape):
        skip.append(r"patch_embed\.pos_embedding")
        if POSITIONS in target:
            kept.append(POSITIONS)
            del target[POSITIONS]
    plan = plan_import(shapes, DIT_RULES, traverse_util.unflatten_dict(target), skip=skip,
                       what=f"{folder} (transformer to initialise from)")
    host = traverse_util.flatten_dict(apply_plan(plan, state, dtype=np.float32))
    host[PROJ] = grow_input_channels(host[PROJ], channels, latent)
    host.update(connector)
    flat_base = traverse_util.flatten_dict(base)
    flat_shardings = traverse_util.flatten_dict(shardings)
    out = {}
    for path, leaf in flat_base.items():
        if path in host:
            out[path] = jax.device_put(host[path].astype(leaf.dtype), flat_shardings[path])
        else:
            out[path] = leaf  # the position table: ours
    report = {"from": folder, "input_channels": [int(source_channels), int(channels)],
              "zero_filled": sorted("/".join(p) for p, v in connector.items() if not v.any()),
              "new": sorted("/".join(p) for p, v in connector.items() if v.any()), "kept": ["/".join(p) for p in kept]}
    return traverse_util.unflatten_dict(out), report
