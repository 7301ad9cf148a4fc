"""`a1-jax train`: the training loop, its workdir, checkpoints, metrics and resume.

    a1-jax train --config configs/train/stage1.yaml --data DATA --workdir RUN [--steps N] [--save-every N]
                 [--mesh fsdp] [--init CHECKPOINT]

The workdir:

    RUN/train_config.yaml   the resolved config the run started with (a resume must pass the same one)
    RUN/model/              our checkpoint of the model the run started from (configs + all four networks)
    RUN/checkpoints/<step>/ Orbax CheckpointManager steps: params, ema (if configured), opt_state, meta (step, rng,
                            stage, data kind, the leaves that have learned) and data (the Grain iterator's state, one
                            file per host)
    RUN/metrics.jsonl       one JSON line per step: step, loss, grad_norm, learning_rate, step_seconds, ...

`a1-jax animate --checkpoint RUN` (and `load_params(RUN, ...)`) read `model/` with the DiT replaced by the latest
step's `ema`, else its `params`. The same command on an existing workdir resumes from its last checkpoint: params,
optimizer state, data iterator and rng are restored (onto whatever mesh this run uses), metrics lines past that step
are dropped, and the run logs exactly the losses an uninterrupted one would (each step's randomness is
`fold_in(key(seed), step)`, the data stream is the restored iterator's). Checkpoints are saved asynchronously every
`save_every` steps and at the end, `keep` of them kept; Orbax writes each into a temporary folder and renames it when
complete, so a run killed mid-save resumes from the previous one. `model/` too is written under a temporary name
and renamed; a run killed before it is complete writes it again.

What a resume guarantees: on the same mesh (and process count), the losses, parameters, optimizer state and EMA of
an interrupted and resumed run are bit-identical to an uninterrupted run's (tested, CPU). On another mesh the state
is the same but the sharded reductions add in another order: losses follow within fp32 rounding (tested: 1e-4
relative after 10 steps, one device vs fsdp=4 x tensor=2). A resume needs the process count the checkpoints were
written with (each host's data position is its own); another count is a `UserError`.

Every check (config, data, stage patterns, `--init`, process count, batch split) runs before anything is written:
a bad input leaves the workdir as it was. Multi-host: process 0 decides what hosts must agree on (resume or
start, the step to resume from) and hands it to all (`parallel.agree`); hosts wait for each other where one
writes what the others read next (`parallel.barrier`).

Metrics stay on the devices while the next steps are dispatched and are read back `READBACK` steps at a time (never
the step just dispatched, so reading does not stall the device); every step's line still lands in `metrics.jsonl`,
and `step_seconds` is the mean over its read-back window. The summary lists `dead`: the trainable leaves that never
learned in the run (gradient always zero, or value never changed); `a1-jax train` warns when it is not empty.

A NaN or Inf loss or gradient norm stops the run before anything of that step is saved or logged: a `UserError`
(exit 2, one line naming the step and the last good checkpoint). It comes from the data, the config (learning
rate) or the weights, not from a bug of ours.

Frame datasets go through the frozen encoders every step (outside the jitted step, as at inference); a dataset
with a latent cache of the configured window (`make-dataset --latents`) skips them. Speed: tokens/s counts the
DiT's joint sequence (face + video tokens) of every example; MFU = model FLOPs per step (3 × `dit.forward_flops`:
forward + backward, remat recomputation not counted) / step time / (devices × peak FLOP/s per device).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from a1_jax import diffusion, parallel
from a1_jax.errors import UserError
from a1_jax.models import dit
from a1_jax.train import config as train_config
from a1_jax.train import init, state as train_state, step as train_step
from a1_jax.train.data import latents as latent_cache
from a1_jax.train.data import records
from a1_jax.weights import checkpoint as ckpt

CONFIG_FILE = "train_config.yaml"
METRICS_FILE = "metrics.jsonl"
PARTIAL = ".partial"  # suffix of model/ while it is written
READBACK = 8  # steps whose metrics are read back together (while as many newer steps run)
PEAK_BF16_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5": 459e12, "TPU v6 lite": 918e12,
                   "H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, per chip (datasheets)
PEAK_FP32_FLOPS = {"H100": 67e12, "H200": 67e12, "A100": 19.5e12}
CPU_FP32_FLOPS_PER_CYCLE = 32  # two 256-bit FMA pipes per core (AVX2 / Zen 4 AVX-512): an estimate


def peak_flops_per_device(device: jax.Device, dtype: str) -> float | None:
    """Dense peak FLOP/s of one device for matmuls in `dtype`; CPU: an estimate from the cores this process may
    use × their clock × 32 fp32 FLOP/cycle, split over the CPU devices; None when unknown."""
    kind = device.device_kind
    if device.platform == "cpu":
        try:
            with open("/proc/cpuinfo") as f:
                mhz = next(float(line.split(":")[1]) for line in f if line.startswith("cpu MHz"))
        except (OSError, StopIteration, ValueError):
            return None
        cores = len(os.sched_getaffinity(0))
        return cores * mhz * 1e6 * CPU_FP32_FLOPS_PER_CYCLE / len(jax.local_devices(backend="cpu"))
    table = PEAK_BF16_FLOPS if dtype == "bfloat16" else PEAK_FP32_FLOPS
    if kind in table:  # TPU kinds are exact names ("TPU v5" vs "TPU v5 lite")
        return table[kind]
    return next((value for name, value in table.items() if not name.startswith("TPU") and name in kind), None)


# ------------------------------------------------------------------------------------------------------ workdir
def check_workdir(workdir: str, config: train_config.TrainConfig) -> bool:
    """True if `workdir` is this config's training workdir (a resume), False if it is new or empty; writes nothing.
    A folder that is neither, or a workdir of another config, is a `UserError`."""
    import yaml

    path = os.path.join(workdir, CONFIG_FILE)
    wanted = config.as_dict()
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            saved = yaml.safe_load(f)
        changed = sorted(f"{section}.{key}" if isinstance(wanted.get(section), dict) else section
                         for section in set(wanted) | set(saved or {})
                         for key in (wanted[section] if isinstance(wanted.get(section), dict) else [None])
                         if _get(saved, section, key) != _get(wanted, section, key))
        if changed:
            raise UserError(f"{workdir} was started with another training config (differs in {', '.join(changed)}); "
                            "resume with the same config, or choose a new --workdir")
        return True
    if os.path.exists(workdir) and (not os.path.isdir(workdir) or os.listdir(workdir)):
        raise UserError(f"--workdir {workdir} exists and is not a training workdir (no {CONFIG_FILE}): choose a new "
                        "or empty folder")
    parent = os.path.dirname(os.path.abspath(workdir))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise UserError(f"cannot write the workdir {workdir}: {parent} is not a writable folder")
    return False


def write_config(workdir: str, config: train_config.TrainConfig) -> None:
    """A new workdir with its `train_config.yaml` (written by process 0, atomically)."""
    import yaml

    path = os.path.join(workdir, CONFIG_FILE)
    try:
        if jax.process_index() == 0:
            os.makedirs(workdir, exist_ok=True)
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                yaml.safe_dump(_plain(config.as_dict()), f, sort_keys=False)
            os.replace(path + ".tmp", path)
    except OSError as e:
        raise UserError(f"cannot write the workdir {workdir}: {e.strerror or e}") from None
    parallel.barrier("a1_jax.train.config")


def write_model(model_dir: str, base: init.BaseModel, sources: dict[str, str]) -> None:
    """Our checkpoint of the model the run starts from, written as `model.partial` (every process writes its shards)
    and renamed to `model/` once complete; what an interrupted run left is removed first. `sources`: where each
    network came from (`init.weight_sources`), kept in its marker."""
    partial = model_dir + PARTIAL
    if jax.process_index() == 0:
        for leftover in (partial, model_dir):  # model/ without its marker: an older, interrupted save
            shutil.rmtree(leftover, ignore_errors=True)
    parallel.barrier("a1_jax.train.model.clean")
    ckpt.save_checkpoint(partial, base.config_folder, base.params, sources=sources)
    parallel.barrier("a1_jax.train.model.saved")
    if jax.process_index() == 0:
        os.rename(partial, model_dir)
    parallel.barrier("a1_jax.train.model.renamed")


def checkpoint_processes(workdir: str) -> int | None:
    """How many processes wrote the workdir's latest checkpoint (its data item has one file per process), or None."""
    import re

    found = ckpt.trained_step(workdir) if os.path.isdir(os.path.join(workdir, ckpt.WORKDIR_CHECKPOINTS)) else None
    if found is None:
        return None
    folder = os.path.join(workdir, ckpt.WORKDIR_CHECKPOINTS, str(found[0]), ckpt.ITEM_DATA)
    counts = {int(m.group(1)) for name in (os.listdir(folder) if os.path.isdir(folder) else [])
              if (m := re.fullmatch(r"process_\d+-of-(\d+)\.json", name))}
    return counts.pop() if len(counts) == 1 else None


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _get(tree: Any, section: str, key: str | None) -> Any:
    value = (tree or {}).get(section)
    if key is not None:
        value = (value or {}).get(key)
    return _plain(value)


def truncate_metrics(path: str, last_step: int) -> None:
    """Keeps the lines of steps <= `last_step` (what the restored state has done); drops the rest and any torn line."""
    if not os.path.isfile(path) or jax.process_index() != 0:
        return
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= last_step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                break  # a line torn by a kill: nothing after it was written by a finished step
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def _manager(workdir: str, keep: int):
    import grain
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True,
                                           cleanup_tmp_directories=True)  # what a killed save left
    handlers = {ckpt.ITEM_PARAMS: ocp.StandardCheckpointHandler(), ckpt.ITEM_OPT_STATE: ocp.StandardCheckpointHandler(),
                ckpt.ITEM_EMA: ocp.PyTreeCheckpointHandler(),  # restored partially: the trainable leaves
                ckpt.ITEM_META: ocp.JsonCheckpointHandler(), ckpt.ITEM_DATA: grain.checkpoint.CheckpointHandler()}
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, ckpt.WORKDIR_CHECKPOINTS)), options=options,
                                 item_handlers=handlers)


# ------------------------------------------------------------------------------------------------------- the run
@dataclasses.dataclass
class Run:
    """Everything the loop needs, built once."""

    config: train_config.TrainConfig
    mesh: jax.sharding.Mesh
    rules: parallel.Rules
    networks: ckpt.Networks  # compute-dtype modules (the DiT's params fp32)
    encoder_params: dict | None  # VAE, pose guider, SigLIP (None with a latent cache)
    cached: bool
    iterator: Any
    state: train_state.TrainState
    step_fn: Any
    batch_shardings: train_step.Batch
    manager: Any  # the Orbax CheckpointManager of checkpoints/
    trainable: list[str]  # the trainable leaves' names, in the order of the step's `learned` flags
    learned: np.ndarray  # bool per trainable leaf: learned in some step of the run so far (restored with the state)
    flops_per_step: int
    tokens_per_step: int


def make_mesh(name: str) -> tuple[jax.sharding.Mesh, parallel.Rules]:
    """A preset's mesh; a preset of fixed sizes smaller than the devices (`single`) takes the first devices of a
    one-process run."""
    preset = parallel.load_preset(name)
    sizes = preset.sizes.values()
    devices = None
    if -1 not in sizes and math.prod(sizes) < jax.device_count() and jax.process_count() == 1:
        devices = jax.devices()[:math.prod(sizes)]
    return parallel.make_mesh(preset, devices), preset.rules


def _compute_networks(networks: ckpt.Networks, dtype: Any) -> ckpt.Networks:
    """The same modules computing in `dtype` (params stay fp32: master weights); SigLIP runs in fp32 as at inference."""
    return ckpt.Networks(transformer=networks.transformer.clone(dtype=dtype),
                         vae=networks.vae.clone(dtype=dtype), pose_guider=networks.pose_guider.clone(dtype=dtype),
                         siglip=networks.siglip)


def check_geometry(config: train_config.TrainConfig, configs: ckpt.ModelConfigs, mesh: jax.sharding.Mesh,
                   rules: parallel.Rules) -> None:
    """The training window fits the model (whole latent patches) and the global batch splits over hosts and over
    the mesh's batch axes."""
    d, t = config.data, configs.transformer
    side = configs.vae.spatial_compression * t.patch_size
    if d.height % side or d.width % side:
        raise UserError(f"data.height x data.width {d.height}x{d.width} must be multiples of {side} for this model "
                        f"(VAE compression {configs.vae.spatial_compression} x patch size {t.patch_size})")
    hosts, ways = jax.process_count(), parallel.batch_ways(mesh, rules)
    if d.batch_size % hosts or d.batch_size % (ways * config.optimizer.grad_accum):
        raise UserError(f"data.batch_size {d.batch_size} must be a multiple of the {hosts} hosts and of the mesh's "
                        f"{ways} batch shards x {config.optimizer.grad_accum} microbatches")


def abstract_batch(config: train_config.TrainConfig, configs: ckpt.ModelConfigs) -> train_step.Batch:
    d, c = config.data, configs.vae.latent_channels
    s = configs.vae.spatial_compression
    frames, h, w = (d.frames - 1) // configs.transformer.temporal_compression_ratio + 1, d.height // s, d.width // s
    f32 = jnp.float32
    b = d.batch_size
    return train_step.Batch(video=jax.ShapeDtypeStruct((b, frames, h, w, 2 * c), f32),
                            image=jax.ShapeDtypeStruct((b, 1, h, w, 2 * c), f32),
                            pose=jax.ShapeDtypeStruct((b, frames, h, w, c), f32),
                            face=jax.ShapeDtypeStruct((b, configs.siglip.num_patches, configs.siglip.hidden_size), f32),
                            drop_face=jax.ShapeDtypeStruct((b,), jnp.bool_),
                            position=jax.ShapeDtypeStruct((b,), jnp.uint32))


def _dataset(config: train_config.TrainConfig, data_dir: str, configs: ckpt.ModelConfigs, fingerprint: Any):
    """(iterator, cached?) of this host's batches; a latent cache of the configured window is used when present
    (`fingerprint()`: the encoders' hash of the model trained here, which the cache must have been made with)."""
    from a1_jax.train.data.pipeline import training_dataset

    d = config.data
    block = records.read_index(data_dir).get("latents")
    hosts = jax.process_count()
    cached = block is not None and (block["frames"], block["height"], block["width"]) == (d.frames, d.height, d.width)
    if cached:
        wanted = abstract_batch(config, configs)
        shapes = {name: list(getattr(wanted, field).shape[1:]) for name, field in latent_cache.FIELDS.items()}
        if block["shapes"] != shapes:
            raise UserError(f"the latent cache of {data_dir} holds arrays of another geometry ({block['shapes']}) than "
                            f"this model and window need ({shapes}): make the cache with this model's encoders")
        if block.get("fingerprint") != fingerprint():
            raise UserError(f"the latent cache of {data_dir} was made with other encoder weights "
                            f"({block.get('checkpoint')}) than the model trained here: remake it with "
                            "`a1-jax make-dataset --latents` from this model")
        dataset = latent_cache.latent_dataset(data_dir, batch_size=d.batch_size // hosts, seed=config.seed,
                                              face_dropout=d.face_dropout, read_threads=d.read_threads)
    else:
        dataset = training_dataset(data_dir, batch_size=d.batch_size // hosts, frames=d.frames, height=d.height,
                                   width=d.width, seed=config.seed, face_dropout=d.face_dropout,
                                   read_threads=d.read_threads)
    return iter(dataset), cached


def build_step(config: train_config.TrainConfig, configs: ckpt.ModelConfigs, transformer: dit.DiT, labels: Any,
               optimizer: Any, state_shardings: train_state.TrainState, mesh: jax.sharding.Mesh,
               rules: parallel.Rules) -> tuple[Any, train_step.Batch]:
    """The jitted step and the batch shardings (also what the sharding plan compiles on abstract inputs)."""
    settings = train_step.LossSettings(table=diffusion.noise_table(configs.scheduler),
                                       scaling_factor=configs.vae.scaling_factor,
                                       num_timesteps=configs.scheduler.num_train_timesteps)
    step = train_step.make_train_step(transformer, optimizer, labels, settings, grad_accum=config.optimizer.grad_accum,
                                      ema_decay=config.ema_decay)
    abstract = abstract_batch(config, configs)
    batch_shardings = jax.tree_util.tree_map(lambda x: parallel.logical_sharding(x, mesh, rules),
                                             train_step.batch_axes(abstract),
                                             is_leaf=lambda x: isinstance(x, tuple))
    return train_step.jit_train_step(step, state_shardings, batch_shardings), batch_shardings


def setup(config: train_config.TrainConfig, data_dir: str, workdir: str, mesh_name: str,
          resumed: bool) -> tuple[Run, int | None]:
    """Builds the run, checking every input before it writes the workdir (`train_config.yaml` unless `resumed`,
    `model/` unless complete); restores the latest checkpoint when there is one (returns its step, else None)."""
    mesh, rules = make_mesh(mesh_name)
    model_dir = os.path.join(workdir, ckpt.WORKDIR_MODEL)
    have_model = bool(parallel.agree(int(ckpt.is_converted(model_dir))))
    if have_model:  # started before: the same base model, from the workdir
        source = dataclasses.replace(config, model=dataclasses.replace(config.model, weights=model_dir,
                                                                       init_transformer=None))
        base = init.base_model(source, mesh, rules)
    else:
        base = init.base_model(config, mesh, rules)
    check_geometry(config, base.configs, mesh, rules)
    transformer_params = base.params["transformer"]
    labels = train_state.stage_labels(transformer_params, config.stage)
    encoders = {name: base.params[name] for name in ("vae", "pose_guider", "siglip")}
    iterator, cached = _dataset(config, data_dir, base.configs,
                                lambda: latent_cache.encoder_fingerprint(encoders, mesh))
    # Every input is checked: now the workdir is written.
    if not resumed:
        write_config(workdir, config)
    if not have_model:
        write_model(model_dir, base, init.weight_sources(base, config))
    del base.params["transformer"]
    compute = jnp.dtype(config.compute.dtype)
    networks = _compute_networks(base.networks, compute)

    optimizer = train_state.make_optimizer(config.optimizer, labels)
    param_shardings = ckpt.param_shardings(base.networks, mesh, rules)["transformer"]
    paths = train_state.trainable_paths(labels)
    ema_paths = paths if config.ema_decay is not None else None
    init_fn = lambda params: train_state.init_state(params, optimizer, config.seed, ema_paths)
    abstract = jax.eval_shape(init_fn, transformer_params)
    shardings = train_state.state_shardings(abstract, param_shardings, mesh)
    step_fn, batch_shardings = build_step(config, base.configs, networks.transformer, labels, optimizer, shardings,
                                          mesh, rules)

    manager = _manager(workdir, config.keep)
    latest = parallel.agree(-1 if manager.latest_step() is None else manager.latest_step())
    restored = None if latest < 0 else latest
    names = ["/".join(path) for path in paths]
    if restored is None:
        state = jax.jit(init_fn, out_shardings=shardings, donate_argnums=0)(transformer_params)
        learned = np.zeros(len(names), bool)
    else:
        del transformer_params
        state, learned_names = restore(manager, restored, abstract, shardings, iterator)
        learned = np.array([name in learned_names for name in names], bool)

    d, t = config.data, base.configs.transformer
    latent_frames = (d.frames - 1) // t.temporal_compression_ratio + 1
    h, w = d.height // base.configs.vae.spatial_compression, d.width // base.configs.vae.spatial_compression
    grid_h, grid_w = dit.patch_grid(t, h, w)
    faces = base.configs.siglip.num_patches
    flops = 3 * dit.forward_flops(t, d.batch_size, latent_frames, h, w, faces)
    tokens = d.batch_size * (faces + latent_frames * grid_h * grid_w)
    run = Run(config=config, mesh=mesh, rules=rules, networks=networks,
              encoder_params=None if cached else base.params, cached=cached, iterator=iterator, state=state,
              step_fn=step_fn, batch_shardings=batch_shardings, manager=manager, trainable=names, learned=learned,
              flops_per_step=flops, tokens_per_step=tokens)
    return run, restored


def restore(manager: Any, step: int, abstract: train_state.TrainState, shardings: train_state.TrainState,
            iterator: Any) -> tuple[train_state.TrainState, list[str]]:
    """The state of checkpoint `step` on `shardings` (any mesh) and the names of the leaves that had learned; the
    data iterator moved to where it was."""
    import grain
    import orbax.checkpoint as ocp

    def target(tree, tree_shardings):
        return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                                      tree_shardings)

    items = {ckpt.ITEM_PARAMS: ocp.args.StandardRestore(target(abstract.params, shardings.params)),
             ckpt.ITEM_OPT_STATE: ocp.args.StandardRestore(target(abstract.opt_state, shardings.opt_state)),
             ckpt.ITEM_META: ocp.args.JsonRestore(), ckpt.ITEM_DATA: grain.checkpoint.CheckpointRestore(iterator)}
    if abstract.ema is not None:  # the item holds the whole DiT (for the sampler); the state keeps the trainable part
        ema = target(abstract.ema, shardings.ema)
        items[ckpt.ITEM_EMA] = ocp.args.PyTreeRestore(
            ema, restore_args=jax.tree_util.tree_map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), ema),
            partial_restore=True)
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    meta = restored[ckpt.ITEM_META]
    replicated = shardings.rng
    state = train_state.TrainState(step=jax.device_put(jnp.int32(meta["step"]), replicated),
                                   params=restored[ckpt.ITEM_PARAMS], opt_state=restored[ckpt.ITEM_OPT_STATE],
                                   ema=restored[ckpt.ITEM_EMA] if abstract.ema is not None else None,
                                   rng=jax.device_put(jnp.asarray(meta["rng"], jnp.uint32), replicated))
    return state, meta.get("learned", [])


def save(run: Run) -> None:
    """Checkpoints the state, the data position and which leaves have learned (asynchronously)."""
    import grain
    import orbax.checkpoint as ocp

    state = run.state
    step = int(state.step)
    meta = {"step": step, "rng": np.asarray(state.rng).tolist(), "stage": run.config.stage.name,
            "data": "latents" if run.cached else "frames",
            "learned": [name for name, flag in zip(run.trainable, run.learned) if flag]}
    items = {ckpt.ITEM_PARAMS: ocp.args.StandardSave(state.params),
             ckpt.ITEM_OPT_STATE: ocp.args.StandardSave(state.opt_state), ckpt.ITEM_META: ocp.args.JsonSave(meta),
             ckpt.ITEM_DATA: grain.checkpoint.CheckpointSave(run.iterator)}
    if state.ema is not None:  # the whole DiT, as the sampler reads it: frozen leaves are their params
        items[ckpt.ITEM_EMA] = ocp.args.PyTreeSave(train_state.overlay(state.params, state.ema))
    run.manager.save(step, args=ocp.args.Composite(**items))


def next_batch(run: Run, step: int) -> train_step.Batch:
    """This step's global batch as the DiT's conditions (through the frozen encoders for a frame dataset)."""
    from a1_jax import conditions

    host = next(run.iterator)
    if run.cached:
        fields = {field.name: host[field.name] for field in dataclasses.fields(train_step.Batch)}
        return train_step.Batch(**parallel.global_batch(fields, run.mesh, run.rules))
    fields = {"video": host["video"], "control": host["control"], "drop_face": host["drop_face"],
              "position": host["position"],
              "face_pixels": conditions.face_pixels(host["face"], run.networks.siglip.config.image_size)}
    frames = parallel.global_batch(fields, run.mesh, run.rules)
    # The reference frame's pixel noise: example p of step s draws from fold_in(fold_in(fold_in(key, s), 1), p).
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(run.config.seed), step), 1)
    keys = jax.vmap(jax.random.fold_in, (None, 0))(key, frames["position"])
    d = run.config.data
    with parallel.activate(run.mesh, run.rules):
        encoded = conditions.window_conditions(run.networks, run.encoder_params, frames["video"], frames["control"],
                                               frames["face_pixels"], keys,
                                               pixel_noise=(d.pixel_noise_mean, d.pixel_noise_std),
                                               dtype=jnp.dtype(run.config.compute.dtype))
    batch = train_step.Batch(**encoded, drop_face=frames["drop_face"], position=frames["position"])
    return jax.device_put(batch, run.batch_shardings)


class _Log:
    """Reads back the metrics of dispatched steps, oldest first, and writes their `metrics.jsonl` lines; a
    non-finite loss or gradient norm stops the run (a `UserError`) before anything of its step is logged."""

    def __init__(self, run: Run, path: str, workdir: str, last_saved: int | None, bar: Any, peak: float | None):
        self.run, self.path, self.workdir, self.bar, self.peak = run, path, workdir, bar, peak
        self.last_saved = last_saved
        self.pending: list[tuple[int, dict, float]] = []  # (step, metrics on the device, data seconds)
        self.clock = time.perf_counter()
        self.losses: list[float] = []
        self.step_seconds: list[float] = []  # per step, each its read-back window's mean

    def add(self, step: int, metrics: dict, data_seconds: float) -> None:
        self.pending.append((step, metrics, data_seconds))
        if len(self.pending) >= 2 * READBACK:
            self.read(READBACK)

    def read(self, count: int | None = None) -> None:
        """The oldest `count` pending steps (all when None), in one transfer."""
        count = len(self.pending) if count is None else count
        if not count:
            return
        entries, self.pending = self.pending[:count], self.pending[count:]
        values = jax.device_get([metrics for _, metrics, _ in entries])
        now = time.perf_counter()
        seconds, self.clock = (now - self.clock) / count, now
        run, lines = self.run, []
        for (step, _, data_seconds), value in zip(entries, values):
            loss, grad_norm = float(value["loss"]), float(value["grad_norm"])
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                self._write(lines)
                raise UserError(f"training stopped at step {step}: the loss is {loss} and the gradient norm "
                                f"{grad_norm}; nothing of this step was saved, the last good checkpoint is "
                                f"{'step ' + str(self.last_saved) if self.last_saved else 'none'} in {self.workdir}: "
                                "lower the learning rate or check the data, then rerun the same command to resume "
                                "from it")
            run.learned |= np.asarray(value["learned"], bool)
            self.losses.append(loss)
            self.step_seconds.append(seconds)
            mfu = None if self.peak is None else run.flops_per_step / seconds / run.mesh.size / self.peak
            lines.append({"step": step, "loss": loss, "grad_norm": grad_norm,
                          "learning_rate": float(train_state.learning_rate(run.config.optimizer)(step - 1)),
                          "step_seconds": round(seconds, 4), "data_seconds": round(data_seconds, 4),
                          "tokens_per_s": round(run.tokens_per_step / seconds, 1), "mfu": mfu})
        self._write(lines)
        last = lines[-1]
        self.bar.update(len(lines))
        self.bar.set_postfix(loss=f"{last['loss']:.4f}", s_per_step=f"{seconds:.3g}",
                             tok_s=f"{last['tokens_per_s']:.0f}", mfu="n/a" if mfu is None else f"{mfu:.2%}")

    def _write(self, lines: list[dict]) -> None:
        if lines and jax.process_index() == 0:
            with open(self.path, "a", encoding="utf-8") as f:
                f.writelines(json.dumps(line) + "\n" for line in lines)


def train(config: train_config.TrainConfig, data_dir: str, workdir: str, *, steps: int | None = None,
          save_every: int | None = None, mesh: str = "fsdp", progress: bool = False) -> dict:
    """Trains (or resumes) in `workdir` until `steps` optimizer steps are done; returns the run's summary."""
    from tqdm import tqdm

    steps = config.steps if steps is None else steps
    save_every = config.save_every if save_every is None else save_every
    if steps < 1 or save_every < 1:
        raise UserError(f"--steps and --save-every must be positive, got {steps} and {save_every}")
    records.read_index(data_dir)  # a bad data folder fails before any model work
    resumed = bool(parallel.agree(int(check_workdir(workdir, config))))
    written = checkpoint_processes(workdir) if resumed else None
    if written is not None and written != jax.process_count():
        raise UserError(f"the checkpoints in {workdir} were written by {written} processes, this run has "
                        f"{jax.process_count()}: resume with {written} (each host's data position is its own)")
    run, restored = setup(config, data_dir, workdir, mesh, resumed)
    start = int(run.state.step)
    metrics_path = os.path.join(workdir, METRICS_FILE)
    truncate_metrics(metrics_path, start if resumed else 0)
    peak = peak_flops_per_device(jax.devices()[0], config.compute.dtype)

    bar = tqdm(total=steps, initial=min(start, steps), desc="train", unit="step",
               disable=None if progress and jax.process_index() == 0 else True)
    log = _Log(run, metrics_path, workdir, restored, bar, peak)
    # Several CPU processes on a frame dataset: dispatching the step while the encoders' programs were still in
    # flight hung or failed in gloo's cross-process collectives (2 processes, every try; where XLA's CPU runtime
    # orders them is not pinned down). There every batch and every step is waited for; GPU and TPU run a device's
    # programs in dispatch order, and on a latent cache every program waits on the previous step anyway. Even so, on
    # a 2-core box at load 25 both processes timed out (30 s) setting up a gloo context in the encoders (issue 13).
    serial = not run.cached and jax.process_count() > 1 and run.mesh.devices.flat[0].platform == "cpu"
    try:
        for step in range(start + 1, steps + 1):
            begin = time.perf_counter()
            batch = next_batch(run, step)
            if serial:
                jax.block_until_ready(batch)
            data_seconds = time.perf_counter() - begin
            with parallel.activate(run.mesh, run.rules):
                run.state, metrics = run.step_fn(run.state, batch)
            if serial:
                jax.block_until_ready(run.state)
            log.add(step, metrics, data_seconds)
            if step == start + 1:
                log.read()  # the first step of a process compiles: timed on its own
            if step % save_every == 0 or step == steps:
                log.read()  # nothing non-finite is saved
                save(run)
                log.last_saved = step
        log.read()
        run.manager.wait_until_finished()
    finally:
        bar.close()
        run.manager.close()

    times = log.step_seconds[1:]  # the first step of a process includes compilation
    step_seconds = statistics.median(times) if times else None
    dead = [name for name, flag in zip(run.trainable, run.learned) if not flag]
    return {"workdir": workdir, "stage": config.stage.name, "data": "latents" if run.cached else "frames",
            "steps": int(run.state.step), "resumed_from": restored, "steps_run": len(log.losses),
            "first_loss": log.losses[0] if log.losses else None, "loss": log.losses[-1] if log.losses else None,
            "checkpoint": log.last_saved, "step_seconds": step_seconds,
            "tokens_per_s": None if not step_seconds else run.tokens_per_step / step_seconds,
            "flops_per_step": run.flops_per_step, "peak_flops_per_device": peak, "devices": run.mesh.size,
            "mfu": None if not step_seconds or peak is None else run.flops_per_step / step_seconds / run.mesh.size / peak,
            "mesh": dict(run.mesh.shape), "processes": jax.process_count(), "trainable": len(run.trainable),
            "dead": dead, "ok": True}


def run_train(args) -> dict:
    """`a1-jax train`."""
    parallel.initialize_distributed()  # first: before any other JAX call
    config = train_config.load(args.config)
    if args.init is not None:
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, weights=args.init))
    summary = train(config, args.data, args.workdir, steps=args.steps, save_every=args.save_every, mesh=args.mesh,
                    progress=True)
    if summary["dead"] and jax.process_index() == 0:
        print(f"a1-jax: warning: {len(summary['dead'])} of {summary['trainable']} trainable parameters never learned "
              f"(zero gradient or no change in every step): {', '.join(summary['dead'])}", file=sys.stderr)
    return summary
