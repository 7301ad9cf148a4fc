"""SkyReels-A1 checkpoints: the release folder and our Orbax checkpoint, read the same way.

Both are folders with the release's layout of configs:

    transformer/config.json  vae/config.json  pose_guider/config.json
    siglip-so400m-patch14-384/config.json  scheduler/scheduler_config.json

* The **release** (Hugging Face `Skywork/SkyReels-A1`) keeps safetensors beside each config. `text_encoder/` and
  `tokenizer/` are ignored: the reference loads T5 but never calls it.
* **Ours** (`a1-jax convert`) keeps the same configs plus `params/`, the four networks' parameters
  (`{transformer, vae, pose_guider, siglip}`) as Orbax checkpoints of about `PIECE_BYTES` each (`params/<network>-<k>/`,
  a subtree each; a bigger leaf is a piece of its own), and the marker file `a1_jax_checkpoint.json`, written last.
  Pieces bound memory: a convert holds one piece at a time, a restore adds at most one piece to what is already
  loaded (largest first), and each restores straight into the target shardings, every device reading its own shards.
  An interrupted convert resumes where it stopped (each piece is written atomically by Orbax).
* A **training workdir** (`a1-jax train --workdir`) holds `model/`, our checkpoint of the model training started
  from, and `checkpoints/<step>/`, an Orbax CheckpointManager's steps with the items `params` (the DiT's full tree),
  optionally `ema` (same tree), `opt_state`, `meta` and `data`. It reads as `model/` with the transformer replaced
  by the latest step's `ema` if it has one, else its `params` (only that item is read, into the target shardings).

The face-token count is SigLIP's patch count (729 for So400m/14 at 384), whatever `max_text_seq_length` the
transformer config says: the release code hard-codes it (spec §2.1), and CogVideoX's own config says 226.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import shutil
import zlib
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import meta

from a1_jax import parallel
from a1_jax.parallel import axes
from a1_jax.config import DiTConfig, SiglipConfig, VAEConfig, require
from a1_jax.diffusion import SchedulerConfig
from a1_jax.errors import UserError
from a1_jax.models import dit, siglip, vae
from a1_jax.weights import safetensors_io
from a1_jax.weights.dit import DIT_RULES
from a1_jax.weights.rules import leaf_shape, plan_import, read_leaf
from a1_jax.weights.siglip import RULES as SIGLIP_RULES, SKIP as SIGLIP_SKIP
from a1_jax.weights.vae import DECODER_SKIP, vae_rules

NETWORKS = ("transformer", "vae", "pose_guider", "siglip")
# Where each part lives in a checkpoint folder (the release's names).
FOLDERS = {"transformer": "transformer", "vae": "vae", "pose_guider": "pose_guider",
           "siglip": "siglip-so400m-patch14-384", "scheduler": "scheduler"}
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")
MARKER = "a1_jax_checkpoint.json"
CONVERTING = "a1_jax_convert.json"  # an unfinished convert: its source and pieces (a rerun resumes it)
PARAMS = "params"
FORMAT_VERSION = 2  # 1: `params/` was one Orbax tree
PIECE_BYTES = 512 * 2 ** 20
WRITE_CHUNK_BYTES = 64 * 2 ** 20
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
    return dict(_abstract_params(networks))


@functools.lru_cache(maxsize=8)
def _abstract_params(networks: Networks) -> dict[str, Any]:
    # Tracing every network takes seconds; loading a model asks for the shardings and then the values.
    inputs = _init_inputs(networks)
    return {name: jax.eval_shape(lambda name=name: _init(getattr(networks, name), jax.random.key(0), inputs[name]))
            for name in NETWORKS}


def param_shardings(networks: Networks, mesh: jax.sharding.Mesh, rules: parallel.Rules) -> dict[str, Any]:
    """The NamedSharding of every parameter on `mesh`, from its logical axes and the preset's `rules`."""
    return parallel.shardings(abstract_params(networks), mesh, rules)


def _random_value(rng: np.random.Generator, networks: Networks, network: str, path: tuple[str, ...],
                  leaf: meta.Partitioned) -> np.ndarray:
    """One parameter drawn as its module's initializer draws it, by its name: biases zero, norm scales one, the DiT's
    learned position table its sin-cos start, SigLIP's position table normal(width^-1/2), every kernel lecun normal
    (std 1/sqrt(fan-in), fan-in = every axis but the output and the scan's `layers` axis; untruncated, where flax
    truncates at 2 std). A name without a rule is an internal error: a new parameter must get one here."""
    shape, name = leaf.value.shape, path[-1]
    if name in ("bias", "proj_bias"):
        return np.zeros(shape, np.float32)
    if name == "scale":
        return np.ones(shape, np.float32)
    if name == "pos_embedding":
        return dit.learned_position_start(networks.transformer.config, shape[-1])
    if name == "position_embedding":
        return rng.standard_normal(shape, np.float32) * np.float32(shape[-1] ** -0.5)
    if name in ("kernel", "proj_kernel"):
        fan_in = np.prod([n for n, axis in zip(shape[:-1], leaf.names) if axis != axes.LAYERS])
        return rng.standard_normal(shape, np.float32) * np.float32(fan_in ** -0.5)
    raise ValueError(f"no random initializer for {network}/{'/'.join(path)}")


def init_params(networks: Networks, seed: int, shardings: Any = None) -> dict[str, Any]:
    """Seeded random params for every network (the tiny configuration runs on these), placed on `shardings`.

    Drawn on the host with NumPy (`_random_value`), each from its own generator seeded by `seed` and its path, so
    the values depend on neither the mesh nor the order of the tree. Jitting the modules' own init instead compiled
    one program per network with a random draw per parameter: ~41 CPU s for the tiny networks (1/8 of a cold
    `animate --example`), where this takes well under a second."""
    require_memory(networks, shardings, "random weights")
    abstract, params = abstract_params(networks), {}
    for name in NETWORKS:
        leaves, tree = jax.tree_util.tree_flatten_with_path(abstract[name],
                                                            is_leaf=lambda x: isinstance(x, meta.Partitioned))
        dtype = getattr(networks, name).param_dtype
        values = []
        for path, leaf in leaves:
            keys = tuple(str(getattr(k, "key", k)) for k in path)
            rng = np.random.default_rng([seed, zlib.crc32("/".join((name, *keys)).encode())])
            values.append(np.asarray(_random_value(rng, networks, name, keys, leaf), dtype=dtype))
        values = jax.tree_util.tree_unflatten(tree, values)
        params[name] = jax.device_put(values, None if shardings is None else shardings[name])
    return params


# --- Memory: refuse what cannot fit, before reading anything -----------------------------------------------------------


def available_host_bytes() -> int | None:
    """Memory this process can still take: Linux's MemAvailable, capped by a cgroup (v2) limit; None if unknown."""
    found = []
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            found += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except OSError:
        pass
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current", encoding="ascii") as f:
            if limit != "max":
                found.append(int(limit) - int(f.read()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def bytes_per_device(networks: Networks, shardings: Any) -> dict[Any, int]:
    """Parameter bytes each device will hold (its shards; a replicated leaf counts on every device)."""
    targets = meta.unbox(abstract_params(networks))
    if shardings is None:
        shardings = jax.tree_util.tree_map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), targets)
    held: dict[Any, int] = {}
    for leaf, sharding in zip(jax.tree_util.tree_leaves(targets), jax.tree_util.tree_leaves(shardings)):
        shard = int(np.prod(sharding.shard_shape(leaf.shape), dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
        for device in sharding.addressable_devices:
            held[device] = held.get(device, 0) + shard
    return held


def require_memory(networks: Networks, shardings: Any, what: str) -> None:
    """A `UserError` when the parameters cannot fit: on the CPU backend all of them against the host's available
    memory (every CPU device is host memory), else each device's shards against its free memory."""
    held = bytes_per_device(networks, shardings)
    dtype = np.dtype(networks.transformer.param_dtype).name
    hint = " (load in bfloat16: --dtype bfloat16)" if dtype == "float32" else ""
    on_host = {d: n for d, n in held.items() if d.platform == "cpu"}
    if on_host:
        need, free = sum(on_host.values()), available_host_bytes()
        if free is not None and need > free:
            raise UserError(f"{what} need {need / 1e9:.1f} GB for their {dtype} parameters and this host has "
                            f"{free / 1e9:.1f} GB available{hint}")
    for device, need in held.items():
        stats = device.memory_stats() if device.platform != "cpu" else None
        if stats and "bytes_limit" in stats and need > stats["bytes_limit"] - stats.get("bytes_in_use", 0):
            raise UserError(f"{what} need {need / 1e9:.1f} GB on {device} for their {dtype} parameters, which has "
                            f"{(stats['bytes_limit'] - stats.get('bytes_in_use', 0)) / 1e9:.1f} GB free{hint}")


def _targets(networks: Networks, shardings: Any) -> dict[str, dict[tuple[str, ...], jax.ShapeDtypeStruct]]:
    """Per network, every leaf's path -> ShapeDtypeStruct in its network's dtype, on its sharding (one device
    by default)."""
    targets = meta.unbox(abstract_params(networks))
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree_util.tree_map(lambda _: device, targets)
    placed = jax.tree_util.tree_map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                                    targets, shardings)
    return {name: traverse_util.flatten_dict(placed[name]) for name in NETWORKS}


def _nbytes(x: Any) -> int:
    return int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize


# --- The release layout (safetensors) --------------------------------------------------------------------------------


# Each network's rule table and the names it deliberately leaves out (the pose guider is a full VAE, read encoder-only).
IMPORTS = {"transformer": (DIT_RULES, ()), "vae": (vae_rules(), ()), "pose_guider": (vae_rules(), DECODER_SKIP),
           "siglip": (SIGLIP_RULES, SIGLIP_SKIP)}


def plan_states(states: Mapping[str, Any], networks: Networks, where: str = "the weights") -> dict[str, Any]:
    """Checks every network's PyTorch-named tensors (`{network: mapping with .shapes()}`) against the networks on
    shapes alone: `{network: ImportPlan}`, or one UserError listing every problem."""
    targets = abstract_params(networks)
    plans, problems = {}, []
    for name in NETWORKS:
        rules, skip = IMPORTS[name]
        try:
            plans[name] = plan_import(states[name].shapes(), rules, targets[name], skip=skip,
                                      what=f"{FOLDERS[name]}/ weights")
        except UserError as e:
            problems.append(str(e))
    if problems:
        raise UserError(f"{where}: " + " | ".join(problems))
    return plans


def params_from_states(states: Mapping[str, Any], plans: Mapping[str, Any], networks: Networks,
                       shardings: Any) -> dict[str, Any]:
    """Leaf by leaf, largest first: a leaf is read into host memory in its network's dtype, placed, and dropped, so
    the peak is the parameters plus about one leaf."""
    targets = _targets(networks, shardings)
    order = sorted(((name, path) for name in NETWORKS for path in targets[name]),
                   key=lambda item: -_nbytes(targets[item[0]][item[1]]))
    flat: dict[str, dict] = {name: {} for name in NETWORKS}
    for name, path in order:
        target = targets[name][path]
        host = read_leaf(plans[name], states[name], path, target.dtype)
        flat[name][path] = jax.device_put(host, target.sharding)
        del host
    return {name: traverse_util.unflatten_dict(flat[name]) for name in NETWORKS}


def _release_states(folder: str) -> dict[str, safetensors_io.SafetensorsCheckpoint]:
    """Every part's safetensors, opened (headers only); every unreadable part named at once."""
    states, problems = {}, []
    for name in NETWORKS:
        try:
            states[name] = safetensors_io.open_checkpoint(os.path.join(folder, FOLDERS[name]))
        except UserError as e:
            problems.append(str(e))
    if problems:
        raise UserError(f"{folder}: " + " | ".join(problems))
    return states


def _load_release(folder: str, networks: Networks, shardings: Any) -> dict[str, Any]:
    states = _release_states(folder)
    return params_from_states(states, plan_states(states, networks, folder), networks, shardings)


# --- Our checkpoint: the parameters in Orbax pieces ------------------------------------------------------------------


def is_converted(folder: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(folder, MARKER))


Key = tuple[str, ...]  # (network, *path in its params)


def plan_pieces(sizes: Mapping[Key, int], piece_bytes: int = PIECE_BYTES) -> dict[str, list[Key]]:
    """`{piece name: its leaves}`: each network's leaves, largest first, packed into pieces of at most `piece_bytes`
    (a bigger leaf alone). Named `<network>-<k>`, k from 0 for the largest; the same sizes give the same plan."""
    pieces: dict[str, list[Key]] = {}
    for name in NETWORKS:
        leaves = sorted((key for key in sizes if key[0] == name), key=lambda key: (-sizes[key], key))
        current, filled = None, 0
        for key in leaves:
            if current is None or filled + sizes[key] > piece_bytes:
                current, filled = f"{name}-{len([p for p in pieces if p.startswith(name + '-')]):02d}", 0
                pieces[current] = []
            pieces[current].append(key)
            filled += sizes[key]
    return pieces


@contextlib.contextmanager
def _no_host_copies():
    """While it is active, Orbax writes NumPy leaves without its defensive deep copy (every piece is written and
    waited for before its arrays are dropped, so nothing can change them mid-write)."""
    import orbax.checkpoint as ocp

    handlers = ocp.type_handlers
    previous = handlers.get_type_handler(np.ndarray)
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # Orbax warns on every override of a registered handler
    try:
        handlers.register_type_handler(np.ndarray, handlers.NumpyHandler(deepcopy_host_arrays=False), override=True)
        yield
    finally:
        handlers.register_type_handler(np.ndarray, previous, override=True)
        absl.setLevel(level)


def _write_pieces(params_dir: str, pieces: Mapping[str, list[Key]], read: Callable[[list[Key]], dict[Key, Any]],
                  progress: Callable[[int], None], resume: bool = True) -> None:
    """Writes the pieces one at a time; with `resume`, only those not written yet (an interrupted run's stay)."""
    import orbax.checkpoint as ocp

    os.makedirs(params_dir, exist_ok=True)
    with _no_host_copies(), ocp.StandardCheckpointer() as checkpointer:
        for piece, keys in pieces.items():
            path = os.path.join(params_dir, piece)
            if not (resume and os.path.isdir(path)):
                leaves = read(keys)
                # Written in chunks: TensorStore then encodes one chunk at a time (whole, a 3 GB leaf peaked at 3x).
                chunked = {key: ocp.SaveArgs(chunk_byte_size=WRITE_CHUNK_BYTES) for key in leaves}
                checkpointer.save(path, traverse_util.unflatten_dict(leaves),
                                  save_args=traverse_util.unflatten_dict(chunked))
                checkpointer.wait_until_finished()
                del leaves
            progress(piece)


def _stored_pieces(params_dir: str) -> dict[str, dict[Key, Any]]:
    """`{piece: {key: stored metadata (shape, dtype)}}` of a converted checkpoint's `params/`."""
    import orbax.checkpoint as ocp

    pieces = {}
    try:
        names = sorted(entry for entry in os.listdir(params_dir) if os.path.isdir(os.path.join(params_dir, entry)))
        with ocp.StandardCheckpointer() as checkpointer:
            for piece in names:
                stored = checkpointer.metadata(os.path.join(params_dir, piece))
                stored = getattr(stored, "item_metadata", stored)
                pieces[piece] = traverse_util.flatten_dict(dict(stored))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise UserError(f"cannot read the Orbax parameters in {params_dir} ({e})") from None
    return pieces


def _check_stored(stored: Mapping[Key, Any], wanted: Mapping[Key, Any]) -> None:
    """Names and shapes stored vs what the configs build, explained the way the importer explains a release."""
    stored_shapes = {"/".join(k): tuple(v.shape) for k, v in stored.items()}
    wanted_shapes = {"/".join(k): tuple(v.shape) for k, v in wanted.items()}
    missing = sorted(set(wanted_shapes) - set(stored_shapes))
    unexpected = sorted(set(stored_shapes) - set(wanted_shapes))
    misshaped = sorted(f"{k}: stored {stored_shapes[k]}, config builds {wanted_shapes[k]}"
                       for k in set(wanted_shapes) & set(stored_shapes) if stored_shapes[k] != wanted_shapes[k])
    problems = [f"{len(items)} {kind} ({', '.join(items[:10])}{', ...' if len(items) > 10 else ''})"
                for kind, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
                if items]
    if problems:
        raise UserError(f"the checkpoint's parameters do not match its configs: {'; '.join(problems)}")


def _load_orbax(folder: str, networks: Networks, shardings: Any) -> dict[str, Any]:
    """Piece by piece, largest first, each restored into its target shardings."""
    import orbax.checkpoint as ocp

    version = _read_json(os.path.join(folder, MARKER)).get("version")
    if version != FORMAT_VERSION:
        raise UserError(f"{folder} was written by another version of a1_jax (checkpoint format {version}, this one "
                        f"reads {FORMAT_VERSION}): convert the release folder again")
    targets = {(name, *path): target for name, leaves in _targets(networks, shardings).items()
               for path, target in leaves.items()}
    params_dir = os.path.abspath(os.path.join(folder, PARAMS))
    pieces = _stored_pieces(params_dir)
    _check_stored({key: value for stored in pieces.values() for key, value in stored.items()}, targets)
    flat = {}
    order = sorted(pieces, key=lambda piece: -sum(_nbytes(targets[key]) for key in pieces[piece]))
    with ocp.StandardCheckpointer() as checkpointer:
        for piece in order:
            target = traverse_util.unflatten_dict({key: targets[key] for key in pieces[piece]})
            flat.update(traverse_util.flatten_dict(checkpointer.restore(os.path.join(params_dir, piece), target)))
    return {name: traverse_util.unflatten_dict({key[1:]: leaf for key, leaf in flat.items() if key[0] == name})
            for name in NETWORKS}


def load_params(folder: str | os.PathLike, networks: Networks, shardings: Any = None) -> dict[str, Any]:
    """Params of every network from a release folder, our converted checkpoint or a training workdir, on `shardings`
    (default: the first device), cast to each network's `param_dtype`. Refused before anything is read when they
    cannot fit (`require_memory`)."""
    folder = os.fspath(folder)
    require_memory(networks, shardings, f"the weights of {folder}")
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


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_json(path: str, value: dict) -> None:
    """Atomically: a reader sees the old file or the new one, never half of it."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)
    os.replace(path + ".tmp", path)


def _finish(out: str, origin: dict | None, sources: Mapping[str, str] | None = None) -> None:
    """The marker, written last: only now is the folder a checkpoint. (Then a convert's own record goes.)"""
    marker = {"format": "a1_jax", "version": FORMAT_VERSION, "networks": list(NETWORKS), "converted_from": origin}
    if sources:
        marker["sources"] = dict(sources)
    _write_json(os.path.join(out, MARKER), marker)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(out, CONVERTING))


def _discard_unfinished_writes(params_dir: str, pieces: Mapping[str, Any]) -> None:
    """Removes what an interrupted run left half-written (Orbax's temporary folders) or what the plan does not name."""
    if os.path.isdir(params_dir):
        for entry in os.listdir(params_dir):
            if entry not in pieces:
                shutil.rmtree(os.path.join(params_dir, entry), ignore_errors=True)


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
    """Writes our checkpoint: the configs of `config_folder` and `params` (host or device arrays) in Orbax pieces.
    The marker file is written last, so a folder without it is an interrupted save, never mistaken for a checkpoint;
    saving again over such a folder starts it afresh. `sources`: where each network's weights came from
    (`"random (seed 0)"`, a path), kept in the marker for `weight_sources`. With several processes every one calls
    it (each writes its shards of every piece); process 0 alone clears the folder and writes configs and marker."""
    out = os.path.abspath(os.fspath(out))
    if is_converted(out):
        raise UserError(f"{out} is already a checkpoint")
    flat = {(name, *path): leaf for name in NETWORKS for path, leaf in traverse_util.flatten_dict(params[name]).items()}
    pieces = plan_pieces({key: _nbytes(leaf) for key, leaf in flat.items()})
    params_dir = os.path.join(out, PARAMS)
    if jax.process_index() == 0:
        shutil.rmtree(params_dir, ignore_errors=True)
        os.makedirs(out, exist_ok=True)
        _copy_configs(os.fspath(config_folder), out)
    parallel.barrier("a1_jax.save_checkpoint.cleared")
    # Every piece is written by every process: skipping the ones "already there" (what a resumed convert does) would
    # let one process skip a piece another has just begun, and the collective save would never complete.
    _write_pieces(params_dir, pieces, lambda keys: {key: flat[key] for key in keys}, lambda piece: None,
                  resume=False)
    parallel.barrier("a1_jax.save_checkpoint.written")
    if jax.process_index() == 0:
        _finish(out, None, sources)


def _prepare_convert(out: str, origin: dict) -> str:
    """Checks the output before any work. "fresh": a new or empty folder (or this convert's own record of another
    state of the release); "resume": this convert's own unfinished run; "done": this convert, finished."""
    record = os.path.join(out, CONVERTING)
    if os.path.exists(record):
        started = _read_json(record)
        if started.get("source") != origin["source"]:
            raise UserError(f"output {out} holds an unfinished convert of {started.get('source')}: rerun that "
                            "command, or delete the folder")
        return "resume" if started == origin else "fresh"
    if is_converted(out):
        if _read_json(os.path.join(out, MARKER)).get("converted_from") == origin:
            return "done"
        raise UserError(f"output {out} is already a converted checkpoint: choose a new path")
    if os.path.isdir(out) and set(os.listdir(out)) <= {CONVERTING + ".tmp"}:
        return "fresh"  # killed while writing its record: nothing else was written
    prepare_output_folder(out)
    return "fresh"


def _origin(source: str, states: Mapping[str, safetensors_io.SafetensorsCheckpoint],
            pieces: Mapping[str, Any]) -> dict:
    """What a convert reads (every weight file's size and modification time) and how it splits it: a rerun resumes
    only when these are unchanged."""
    files = sorted(path for state in states.values() for path in state.files)
    return {"source": source, "pieces": list(pieces),
            "files": {os.path.relpath(path, source): [os.stat(path).st_size, os.stat(path).st_mtime_ns]
                      for path in files}}


def convert(source: str | os.PathLike, out: str | os.PathLike,
            progress: Callable[[int, int], None] = lambda done, total: None) -> dict[str, Any]:
    """`a1-jax convert`: a release folder -> our checkpoint, keeping the stored dtypes (bf16 stays bf16).

    Streams: one piece (about `PIECE_BYTES`, or one bigger tensor) is in memory at a time. Interrupted (even by
    kill -9), the same command resumes: finished pieces are kept, half-written ones discarded. `progress(bytes
    done, bytes in all)` after each piece."""
    source, out = os.path.abspath(os.fspath(source)), os.path.abspath(os.fspath(out))
    configs = ModelConfigs.from_folder(source)
    if is_converted(source):
        raise UserError(f"{source} is already an a1_jax checkpoint: nothing to convert")
    networks = build_networks(configs)
    states = _release_states(source)
    plans = plan_states(states, networks, source)  # every part checked before anything is written
    leaves = {(name, *path): (leaf_shape(plans[name], states[name].shapes(), path),
                              states[name][plans[name].sources[path][0][0]].dtype)
              for name in NETWORKS for path in plans[name].sources}
    sizes = {key: _nbytes(jax.ShapeDtypeStruct(*leaf)) for key, leaf in leaves.items()}
    pieces = plan_pieces(sizes)
    origin = _origin(source, states, pieces)
    state = _prepare_convert(out, origin)
    summary = {"parameters": {name: sum(int(np.prod(shape, dtype=np.int64)) for key, (shape, _) in leaves.items()
                                        if key[0] == name) for name in NETWORKS},
               "skipped": {name: len(plans[name].skipped) for name in NETWORKS}, "pieces": len(pieces),
               "bytes": sum(sizes.values()), "resumed": state != "fresh"}
    params_dir = os.path.join(out, PARAMS)
    if state == "done":
        return {**summary, "written_pieces": 0}
    if state == "fresh":
        shutil.rmtree(params_dir, ignore_errors=True)  # pieces of another state of the release, if any
        os.makedirs(out, exist_ok=True)
        _write_json(os.path.join(out, CONVERTING), origin)
    _discard_unfinished_writes(params_dir, pieces)
    kept = set(os.listdir(params_dir)) if os.path.isdir(params_dir) else set()
    _copy_configs(source, out)
    done = 0

    def piece_written(piece: str) -> None:
        nonlocal done
        done += sum(sizes[key] for key in pieces[piece])
        progress(done, summary["bytes"])

    read = lambda keys: {key: read_leaf(plans[key[0]], states[key[0]], key[1:]) for key in keys}
    _write_pieces(params_dir, pieces, read, piece_written)
    _finish(out, origin)
    return {**summary, "written_pieces": len(pieces) - len(kept)}
