"""SkyReels-A1 checkpoints: the release folder and our Orbax checkpoint, read the same way.

Both are folders with the release's layout of configs:

    transformer/config.json  vae/config.json  pose_guider/config.json
    siglip-so400m-patch14-384/config.json  scheduler/scheduler_config.json

* The **release** (Hugging Face `Skywork/SkyReels-A1`) keeps safetensors beside each config. `text_encoder/` and
  `tokenizer/` are ignored: the reference loads T5 but never calls it.
* **Ours** (`a1-jax convert`) keeps the same configs plus `params/`, one Orbax checkpoint of the four networks'
  parameters (`{transformer, vae, pose_guider, siglip}`), and the marker file `a1_jax_checkpoint.json`. It restores
  straight into the target shardings: each device reads its own shards, no host ever holds the whole model.
* A **training workdir** (`a1-jax train --workdir`) holds `model/`, our checkpoint of the model training started
  from, and `checkpoints/<step>/`, an Orbax CheckpointManager's steps with the items `params` (the DiT's full tree),
  optionally `ema` (same tree), `opt_state`, `meta` and `data`. It reads as `model/` with the transformer replaced
  by the latest step's `ema` if it has one, else its `params` (only that item is read, into the target shardings).

The face-token count is SigLIP's patch count (729 for So400m/14 at 384), whatever `max_text_seq_length` the
transformer config says: the release code hard-codes it (spec §2.1), and CogVideoX's own config says 226.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

from a1_jax import parallel
from a1_jax.config import DiTConfig, SiglipConfig, VAEConfig, require
from a1_jax.diffusion import SchedulerConfig
from a1_jax.errors import UserError
from a1_jax.models import dit, siglip, vae
from a1_jax.weights import safetensors_io
from a1_jax.weights.dit import DIT_RULES
from a1_jax.weights.rules import apply_plan, plan_import
from a1_jax.weights.siglip import RULES as SIGLIP_RULES, SKIP as SIGLIP_SKIP
from a1_jax.weights.vae import DECODER_SKIP, vae_rules

NETWORKS = ("transformer", "vae", "pose_guider", "siglip")
# Where each part lives in a checkpoint folder (the release's names).
FOLDERS = {"transformer": "transformer", "vae": "vae", "pose_guider": "pose_guider",
           "siglip": "siglip-so400m-patch14-384", "scheduler": "scheduler"}
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")
MARKER = "a1_jax_checkpoint.json"
PARAMS = "params"
FORMAT_VERSION = 1
WORKDIR_MODEL = "model"  # a training workdir's base model (our checkpoint)
WORKDIR_CHECKPOINTS = "checkpoints"  # its CheckpointManager folder: <step>/<item>
# The Orbax items of a training step (`checkpoints/<step>/<item>`; `a1_jax.train.trainer` writes them).
ITEM_PARAMS, ITEM_EMA, ITEM_OPT_STATE, ITEM_META, ITEM_DATA = "params", "ema", "opt_state", "meta", "data"
TRAINED_ITEMS = (ITEM_EMA, ITEM_PARAMS)  # the items holding the DiT's trained params, in the order the sampler prefers


@dataclasses.dataclass(frozen=True)
class ModelConfigs:
    """The architecture of every part of SkyReels-A1, as one checkpoint folder describes it."""

    transformer: DiTConfig
    vae: VAEConfig
    pose_guider: VAEConfig
    siglip: SiglipConfig
    scheduler: SchedulerConfig

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "ModelConfigs":
        """Reads and cross-checks the configs of a release-layout folder (a training workdir: its `model/`); every
        missing part is named at once."""
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise UserError(f"checkpoint folder not found: {folder}")
        folder = config_folder(folder)
        files = {part: os.path.join(folder, sub, "scheduler_config.json" if part == "scheduler" else "config.json")
                 for part, sub in FOLDERS.items()}
        missing = [os.path.relpath(path, folder) for path in files.values() if not os.path.isfile(path)]
        if missing:
            raise UserError(f"{folder} is not a SkyReels-A1 checkpoint folder: missing {', '.join(missing)}")
        siglip_config = SiglipConfig.from_json(files["siglip"])
        transformer = DiTConfig.from_json(files["transformer"])
        # The release code feeds every SigLIP patch token, whatever the config's max_text_seq_length says.
        transformer = dataclasses.replace(transformer, max_text_seq_length=siglip_config.num_patches)
        configs = cls(transformer=transformer, vae=VAEConfig.from_json(files["vae"]),
                      pose_guider=VAEConfig.from_json(files["pose_guider"]), siglip=siglip_config,
                      scheduler=SchedulerConfig.from_json(files["scheduler"]))
        configs.validate(folder)
        return configs

    def validate(self, source: str) -> None:
        """The parts must fit together the way the pipeline joins them (spec §1, §3.2, §4.2)."""
        t, v, g = self.transformer, self.vae, self.pose_guider
        latent = v.latent_channels
        require(t.in_channels == 3 * latent, source,
                f"transformer in_channels {t.in_channels} must be 3 x the VAE's latent_channels {latent} "
                "([noise | pose | image] latents are concatenated)")
        require(t.out_channels == latent, source,
                f"transformer out_channels {t.out_channels} must equal the VAE's latent_channels {latent}")
        require(g.latent_channels == latent, source,
                f"pose_guider latent_channels {g.latent_channels} must equal the VAE's {latent}")
        require((g.spatial_compression, g.temporal_compression_ratio) ==
                (v.spatial_compression, v.temporal_compression_ratio), source,
                "pose_guider and VAE must compress space and time alike")
        require(int(v.temporal_compression_ratio) == t.temporal_compression_ratio, source,
                f"transformer temporal_compression_ratio {t.temporal_compression_ratio} != the VAE's "
                f"{v.temporal_compression_ratio}")
        require(t.face_embed_dim == self.siglip.hidden_size, source,
                f"transformer face_embed_dim {t.face_embed_dim} must equal SigLIP's hidden_size "
                f"{self.siglip.hidden_size} (the face connector reads SigLIP tokens)")

    @property
    def canvas(self) -> tuple[int, int]:
        """Pixel height and width the transformer was built for (480×720 for the release)."""
        s = self.vae.spatial_compression
        return self.transformer.sample_height * s, self.transformer.sample_width * s

    @property
    def clip_frames(self) -> int:
        """Pixel frames of one clip (49 for the release)."""
        return self.transformer.sample_frames


def model_config_folder(name_or_path: str) -> str:
    """`tiny` / `5b` (folders under `configs/`) or a path to a folder with the release layout of configs."""
    candidate = os.path.join(CONFIGS, name_or_path)
    if os.sep not in name_or_path and os.path.isdir(os.path.join(candidate, FOLDERS["transformer"])):
        return candidate
    if os.path.isdir(name_or_path):
        return name_or_path
    known = sorted(d for d in os.listdir(CONFIGS) if os.path.isdir(os.path.join(CONFIGS, d, FOLDERS["transformer"])))
    raise UserError(f"unknown model config {name_or_path!r}: give a folder with the release's config layout or one "
                    f"of {', '.join(known)}")


class Networks(NamedTuple):
    """The four Flax modules of SkyReels-A1; params are a dict with the same keys."""

    transformer: dit.DiT
    vae: vae.AutoencoderKLCogVideoX
    pose_guider: vae.AutoencoderKLCogVideoX
    siglip: siglip.SiglipVisionTower


def build_networks(configs: ModelConfigs, dtype: Any = jnp.float32, *, attention_kernel: str = "auto",
                   remat: str = "none") -> Networks:
    """Modules computing (and storing their params) in `dtype`, except SigLIP, which runs in fp32 as the reference's
    does (its tokens are cast to `dtype` afterwards). The pose guider is built encoder-only: its decoder is never used."""
    return Networks(
        transformer=dit.DiT(configs.transformer, dtype=dtype, param_dtype=dtype, attention_kernel=attention_kernel,
                            remat=remat),
        vae=vae.AutoencoderKLCogVideoX(configs.vae, dtype=dtype, param_dtype=dtype),
        pose_guider=vae.AutoencoderKLCogVideoX(configs.pose_guider, encoder_only=True, dtype=dtype, param_dtype=dtype),
        siglip=siglip.SiglipVisionTower(configs.siglip, attention_kernel=attention_kernel))


def _init_inputs(networks: Networks) -> dict[str, tuple[jax.ShapeDtypeStruct, ...]]:
    """The smallest inputs that create every parameter of each network (the DiT's: its sample geometry)."""
    def one_pixel_block(config: VAEConfig) -> tuple[jax.ShapeDtypeStruct]:
        side = config.spatial_compression
        return (jax.ShapeDtypeStruct((1, 1, side, side, config.in_channels), jnp.float32),)

    s = networks.siglip.config
    return {"transformer": dit.example_inputs(networks.transformer.config, batch=1),
            "vae": one_pixel_block(networks.vae.config), "pose_guider": one_pixel_block(networks.pose_guider.config),
            "siglip": (jax.ShapeDtypeStruct((1, s.image_size, s.image_size, s.num_channels), jnp.float32),)}


def _init(module: Any, key: jax.Array, inputs: tuple[jax.ShapeDtypeStruct, ...]) -> Any:
    return module.init(key, *(jnp.zeros(x.shape, x.dtype) for x in inputs))["params"]


def abstract_params(networks: Networks) -> dict[str, Any]:
    """Boxed ShapeDtypeStruct trees (with logical axis names) of every network's params; no memory is touched."""
    inputs = _init_inputs(networks)
    return {name: jax.eval_shape(lambda name=name: _init(getattr(networks, name), jax.random.key(0), inputs[name]))
            for name in NETWORKS}


def param_shardings(networks: Networks, mesh: jax.sharding.Mesh, rules: parallel.Rules) -> dict[str, Any]:
    """The NamedSharding of every parameter on `mesh`, from its logical axes and the preset's `rules`."""
    return parallel.shardings(abstract_params(networks), mesh, rules)


@functools.lru_cache(maxsize=None)
def _jitted_init(module: Any, inputs: tuple[jax.ShapeDtypeStruct, ...]) -> Callable:
    """`key -> params` of `module`, jitted once per module and input shapes (modules compare by their fields)."""
    return jax.jit(lambda key: meta.unbox(_init(module, key, inputs)))


def init_params(networks: Networks, seed: int, shardings: Any = None) -> dict[str, Any]:
    """Seeded random params for every network (the tiny configuration runs on these), placed on `shardings`.

    Created on one device, then placed: the values do not depend on the mesh. So the random bits need not be
    partitionable, and the classic threefry compiles the init programs twice as fast on CPU (26 s -> 13 s for tiny)."""
    inputs = _init_inputs(networks)
    keys = jax.random.split(jax.random.key(seed), len(NETWORKS))
    params = {}
    for name, key in zip(NETWORKS, keys):
        with jax.threefry_partitionable(False):
            values = _jitted_init(getattr(networks, name), inputs[name])(key)
        params[name] = values if shardings is None else jax.device_put(values, shardings[name])
    return params


# --- The release layout (safetensors) --------------------------------------------------------------------------------


def _release_plans(folder: str, networks: Networks) -> tuple[dict, dict]:
    """Opens every part's safetensors and checks names and shapes against the networks; all problems at once."""
    targets = abstract_params(networks)
    imports = {"transformer": (DIT_RULES, ()), "vae": (vae_rules(), ()), "pose_guider": (vae_rules(), DECODER_SKIP),
               "siglip": (SIGLIP_RULES, SIGLIP_SKIP)}
    states, plans, problems = {}, {}, []
    for name in NETWORKS:
        part = os.path.join(folder, FOLDERS[name])
        try:
            states[name] = safetensors_io.open_checkpoint(part)
            rules, skip = imports[name]
            plans[name] = plan_import(states[name].shapes(), rules, targets[name], skip=skip,
                                      what=f"{FOLDERS[name]}/ weights")
        except UserError as e:
            problems.append(str(e))
    if problems:
        raise UserError(f"{folder}: " + " | ".join(problems))
    return states, plans


def _load_release(folder: str, networks: Networks, shardings: Any) -> dict[str, Any]:
    states, plans = _release_plans(folder, networks)
    params = {}
    for name in NETWORKS:
        dtype = np.dtype(getattr(networks, name).param_dtype)
        host = apply_plan(plans[name], states[name], dtype=dtype)
        params[name] = jax.device_put(host, None if shardings is None else shardings[name])
    return params


# --- Our Orbax checkpoint ----------------------------------------------------------------------------------------------


def is_converted(folder: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(folder, MARKER))


def _load_orbax(folder: str, networks: Networks, shardings: Any) -> dict[str, Any]:
    import orbax.checkpoint as ocp

    targets = meta.unbox(abstract_params(networks))
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree_util.tree_map(lambda _: device, targets)
    target = jax.tree_util.tree_map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                                    targets, shardings)
    path = os.path.abspath(os.path.join(folder, PARAMS))
    _check_orbax_shapes(path, targets)
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(path, target)


def _check_orbax_shapes(path: str, targets: dict) -> None:
    """Names and shapes stored vs what the configs build, explained the way the importer explains a release."""
    import orbax.checkpoint as ocp
    from flax import traverse_util

    try:
        with ocp.StandardCheckpointer() as checkpointer:
            stored = checkpointer.metadata(path)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise UserError(f"cannot read the Orbax parameters in {path} ({e})") from None
    stored = getattr(stored, "item_metadata", stored)
    stored_shapes = {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(dict(stored)).items()}
    wanted = {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(targets).items()}
    missing = sorted(set(wanted) - set(stored_shapes))
    unexpected = sorted(set(stored_shapes) - set(wanted))
    misshaped = sorted(f"{k}: stored {stored_shapes[k]}, config builds {wanted[k]}" for k in set(wanted) & set(
        stored_shapes) if stored_shapes[k] != wanted[k])
    problems = [f"{len(items)} {kind} ({', '.join(items[:10])}{', ...' if len(items) > 10 else ''})"
                for kind, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
                if items]
    if problems:
        raise UserError(f"the checkpoint's parameters do not match its configs: {'; '.join(problems)}")


def load_params(folder: str | os.PathLike, networks: Networks, shardings: Any = None) -> dict[str, Any]:
    """Params of every network from a release folder, our converted checkpoint or a training workdir, on `shardings`
    (default: the first device), cast to each network's `param_dtype`."""
    folder = os.fspath(folder)
    if is_workdir(folder):
        return _load_workdir(folder, networks, shardings)
    if is_converted(folder):
        return _load_orbax(folder, networks, shardings)
    return _load_release(folder, networks, shardings)


def random_source(seed: int) -> str:
    """How `weight_sources` names seeded random weights (`is_random` recognises it)."""
    return f"random (seed {seed})"


def is_random(source: str) -> bool:
    return source.startswith("random")


def weight_sources(folder: str | os.PathLike) -> dict[str, str]:
    """Where each network's weights in a checkpoint folder come from, as far as the folder says: a release's are
    `"release <folder>"`; ours are what its marker recorded (a training run's base model records `random (seed N)`
    for networks it initialised), else `"checkpoint <folder>"`; a workdir's transformer is `"trained (step N, ema)"`
    once a step is saved."""
    folder = os.fspath(folder)
    if is_workdir(folder):
        sources = weight_sources(os.path.join(folder, WORKDIR_MODEL))
        found = trained_step(folder)
        if found is not None:
            sources["transformer"] = f"trained (step {found[0]}, {found[1]}) in {folder}"
        return sources
    if is_converted(folder):
        with open(os.path.join(folder, MARKER), encoding="utf-8") as f:
            recorded = json.load(f).get("sources", {})
        return {name: recorded.get(name, f"checkpoint {folder}") for name in NETWORKS}
    return {name: f"release {folder}" for name in NETWORKS}


# --- A training workdir ---------------------------------------------------------------------------------------------


def is_workdir(folder: str | os.PathLike) -> bool:
    return is_converted(os.path.join(folder, WORKDIR_MODEL))


def config_folder(folder: str | os.PathLike) -> str:
    """Where a checkpoint folder keeps its configs: a workdir's `model/`, else the folder itself."""
    folder = os.fspath(folder)
    return os.path.join(folder, WORKDIR_MODEL) if is_workdir(folder) else folder


def trained_step(folder: str | os.PathLike) -> tuple[int, str] | None:
    """(latest finished step, the item the sampler reads: `ema` if saved, else `params`) of a workdir; None before
    its first checkpoint. Unfinished (interrupted) saves are temporary folders Orbax never lists."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.path.join(folder, WORKDIR_CHECKPOINTS))
    if not os.path.isdir(path):
        return None
    latest = ocp.step.latest_step_metadata(path, ocp.step.standard_name_format())
    if latest is None:
        return None
    items = [item for item in TRAINED_ITEMS if os.path.isdir(os.path.join(path, str(latest.step), item))]
    if not items:
        raise UserError(f"{path}/{latest.step} holds neither of {', '.join(TRAINED_ITEMS)}: not an a1-jax training "
                        "step")
    return latest.step, items[0]


def _load_workdir(folder: str, networks: Networks, shardings: Any) -> dict[str, Any]:
    import orbax.checkpoint as ocp

    params = _load_orbax(os.path.join(folder, WORKDIR_MODEL), networks, shardings)
    found = trained_step(folder)
    if found is None:
        return params  # no step saved yet: the model training started from
    step, item = found
    transformer = params.pop("transformer")  # the base DiT's buffers are freed before the trained ones arrive
    target = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), transformer)
    del transformer
    path = os.path.abspath(os.path.join(folder, WORKDIR_CHECKPOINTS, str(step), item))
    with ocp.StandardCheckpointer() as checkpointer:
        params["transformer"] = checkpointer.restore(path, target)
    return params


def _copy_configs(source: str, out: str) -> None:
    for part, sub in FOLDERS.items():
        name = "scheduler_config.json" if part == "scheduler" else "config.json"
        os.makedirs(os.path.join(out, sub), exist_ok=True)
        shutil.copyfile(os.path.join(source, sub, name), os.path.join(out, sub, name))


def prepare_output_folder(out: str) -> None:
    """An output folder that does not exist yet (or is empty) under a writable parent: checked before any work."""
    out = os.path.abspath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UserError(f"output {out} already exists and is not an empty folder: choose a new path")
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise UserError(f"output folder's parent does not exist: {parent}")
    if not os.access(parent, os.W_OK):
        raise UserError(f"cannot write to {parent}")


def save_checkpoint(out: str | os.PathLike, config_folder: str | os.PathLike, params: Mapping[str, Any],
                    sources: Mapping[str, str] | None = None) -> None:
    """Writes our checkpoint: the configs of `config_folder` and `params` as one Orbax checkpoint. The marker file
    is written last, so a folder without it is an interrupted save, never mistaken for a checkpoint. `sources`: where
    each network's weights came from (`"random (seed 0)"`, a path), kept in the marker for `weight_sources`."""
    import orbax.checkpoint as ocp

    out = os.path.abspath(os.fspath(out))
    os.makedirs(out, exist_ok=True)
    _copy_configs(os.fspath(config_folder), out)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(out, PARAMS), dict(params))
        checkpointer.wait_until_finished()
    with open(os.path.join(out, MARKER), "w", encoding="utf-8") as f:
        marker = {"format": "a1_jax", "version": FORMAT_VERSION, "networks": list(NETWORKS)}
        if sources:
            marker["sources"] = dict(sources)
        json.dump(marker, f, indent=2)


def convert(source: str | os.PathLike, out: str | os.PathLike,
            progress: Callable[[str], None] = lambda name: None) -> dict[str, Any]:
    """`a1-jax convert`: a release folder -> our checkpoint, keeping the stored dtypes (bf16 stays bf16)."""
    source, out = os.fspath(source), os.fspath(out)
    prepare_output_folder(out)
    configs = ModelConfigs.from_folder(source)
    if is_converted(source):
        raise UserError(f"{source} is already an a1_jax checkpoint: nothing to convert")
    networks = build_networks(configs)
    states, plans = _release_plans(source, networks)  # every part checked before anything is written
    params, counts = {}, {}
    for name in NETWORKS:
        progress(name)
        params[name] = apply_plan(plans[name], states[name])
        counts[name] = int(sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(params[name])))
    try:
        save_checkpoint(out, source, params)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # nothing half-written is left behind
        raise
    return {"parameters": counts, "skipped": {name: len(plans[name].skipped) for name in NETWORKS}}
