"""`a1-jax train`: the training loop, its workdir, checkpoints, metrics and resume.

    a1-jax train --config configs/train/stage1.yaml --data DATA --workdir RUN [--steps N] [--save-every N]
                 [--mesh fsdp] [--init CHECKPOINT]

The workdir:

    RUN/train_config.yaml   the resolved config the run started with (a resume must pass the same one)
    RUN/model/              our checkpoint of the model the run started from (configs + all four networks)
    RUN/checkpoints/<step>/ Orbax CheckpointManager steps: params, ema (if configured), opt_state, meta (step, rng,
                            stage, data kind) and data (the Grain iterator's state, one file per host)
    RUN/metrics.jsonl       one JSON line per step: step, loss, grad_norm, learning_rate, step_seconds, ...

`a1-jax animate --checkpoint RUN` (and `load_params(RUN, ...)`) read `model/` with the DiT replaced by the latest
step's `ema`, else its `params`. The same command on an existing workdir resumes from its last checkpoint: params,
optimizer state, data iterator and rng are restored (onto whatever mesh this run uses), metrics lines past that step
are dropped, and the run logs exactly the losses an uninterrupted one would (each step's randomness is
`fold_in(key(seed), step)`, the data stream is the restored iterator's). Checkpoints are saved asynchronously every
`save_every` steps and at the end, `keep` of them kept; Orbax writes each into a temporary folder and renames it when
complete, so a run killed mid-save resumes from the previous one.

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
import statistics
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
def prepare_workdir(workdir: str, config: train_config.TrainConfig) -> bool:
    """Creates the workdir or checks it belongs to this config; True if it already existed (a resume)."""
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
    try:
        os.makedirs(workdir, exist_ok=True)
        if jax.process_index() == 0:
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                yaml.safe_dump(_plain(wanted), f, sort_keys=False)
            os.replace(path + ".tmp", path)
    except OSError as e:
        raise UserError(f"cannot write the workdir {workdir}: {e.strerror or e}") from None
    return False


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

    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True)
    trees = {item: ocp.StandardCheckpointHandler() for item in ("params", "ema", "opt_state")}
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, ckpt.WORKDIR_CHECKPOINTS)), options=options,
                                 item_handlers={**trees, "meta": ocp.JsonCheckpointHandler(),
                                                "data": grain.checkpoint.CheckpointHandler()})


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


def _dataset(config: train_config.TrainConfig, data_dir: str, fingerprint: str | None):
    """(iterator, cached?) of this host's batches; a latent cache of the configured window is used when present."""
    from a1_jax.train.data.pipeline import training_dataset

    d = config.data
    index = records.read_index(data_dir)
    hosts = jax.process_count()
    if d.batch_size % hosts:
        raise UserError(f"data.batch_size {d.batch_size} must be a multiple of the {hosts} hosts")
    block = index.get("latents")
    cached = block is not None and (block["frames"], block["height"], block["width"]) == (d.frames, d.height, d.width)
    if cached:
        if fingerprint is not None and block.get("fingerprint") != fingerprint:
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
                            drop_face=jax.ShapeDtypeStruct((b,), jnp.bool_))


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


def setup(config: train_config.TrainConfig, data_dir: str, workdir: str, mesh_name: str) -> tuple[Run, int | None]:
    """Builds the run; restores the latest checkpoint when there is one (returns its step, else None)."""
    mesh, rules = make_mesh(mesh_name)
    model_dir = os.path.join(workdir, ckpt.WORKDIR_MODEL)
    if ckpt.is_converted(model_dir):  # started before: the same base model, from the workdir
        source = dataclasses.replace(config, model=dataclasses.replace(config.model, weights=model_dir,
                                                                       init_transformer=None))
        base = init.base_model(source, mesh, rules)
    else:
        base = init.base_model(config, mesh, rules)
        ckpt.save_checkpoint(model_dir, base.config_folder, base.params, sources=init.weight_sources(base, config))
    compute = jnp.dtype(config.compute.dtype)
    networks = _compute_networks(base.networks, compute)
    transformer_params = base.params.pop("transformer")
    fingerprint = latent_cache.encoder_fingerprint(base.params)
    iterator, cached = _dataset(config, data_dir, fingerprint)
    encoder_params = None if cached else base.params

    labels = train_state.stage_labels(transformer_params, config.stage)
    optimizer = train_state.make_optimizer(config.optimizer, labels)
    param_shardings = ckpt.param_shardings(base.networks, mesh, rules)["transformer"]
    init_fn = lambda params: train_state.init_state(params, optimizer, config.seed, config.ema_decay is not None)
    abstract = jax.eval_shape(init_fn, transformer_params)
    shardings = train_state.state_shardings(abstract, param_shardings, mesh)
    step_fn, batch_shardings = build_step(config, base.configs, networks.transformer, labels, optimizer, shardings,
                                          mesh, rules)

    manager = _manager(workdir, config.keep)
    restored = manager.latest_step()
    if restored is None:
        state = jax.jit(init_fn, out_shardings=shardings, donate_argnums=0)(transformer_params)
    else:
        del transformer_params
        state = restore(manager, restored, abstract, shardings, iterator)
    manager.close()

    d, t = config.data, base.configs.transformer
    latent_frames = (d.frames - 1) // t.temporal_compression_ratio + 1
    h, w = d.height // base.configs.vae.spatial_compression, d.width // base.configs.vae.spatial_compression
    grid_h, grid_w = dit.patch_grid(t, h, w)
    faces = base.configs.siglip.num_patches
    flops = 3 * dit.forward_flops(t, d.batch_size, latent_frames, h, w, faces)
    tokens = d.batch_size * (faces + latent_frames * grid_h * grid_w)
    run = Run(config=config, mesh=mesh, rules=rules, networks=networks, encoder_params=encoder_params, cached=cached,
              iterator=iterator, state=state, step_fn=step_fn, batch_shardings=batch_shardings, flops_per_step=flops,
              tokens_per_step=tokens)
    return run, restored


def restore(manager: Any, step: int, abstract: train_state.TrainState, shardings: train_state.TrainState,
            iterator: Any) -> train_state.TrainState:
    """The state of checkpoint `step` on `shardings` (any mesh), and the data iterator moved to where it was."""
    import grain
    import orbax.checkpoint as ocp

    def target(tree, tree_shardings):
        return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                                      tree_shardings)

    items = {"params": ocp.args.StandardRestore(target(abstract.params, shardings.params)),
             "opt_state": ocp.args.StandardRestore(target(abstract.opt_state, shardings.opt_state)),
             "meta": ocp.args.JsonRestore(), "data": grain.checkpoint.CheckpointRestore(iterator)}
    if abstract.ema is not None:
        items["ema"] = ocp.args.StandardRestore(target(abstract.ema, shardings.ema))
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    meta = restored["meta"]
    replicated = shardings.rng
    return train_state.TrainState(step=jax.device_put(jnp.int32(meta["step"]), replicated), params=restored["params"],
                                  opt_state=restored["opt_state"],
                                  ema=restored["ema"] if abstract.ema is not None else None,
                                  rng=jax.device_put(jnp.asarray(meta["rng"], jnp.uint32), replicated))


def save(manager: Any, state: train_state.TrainState, iterator: Any, run: Run) -> None:
    import grain
    import orbax.checkpoint as ocp

    step = int(state.step)
    items = {"params": ocp.args.StandardSave(state.params), "opt_state": ocp.args.StandardSave(state.opt_state),
             "meta": ocp.args.JsonSave({"step": step, "rng": np.asarray(state.rng).tolist(),
                                        "stage": run.config.stage.name, "data": "latents" if run.cached else "frames"}),
             "data": grain.checkpoint.CheckpointSave(iterator)}
    if state.ema is not None:
        items["ema"] = ocp.args.StandardSave(state.ema)
    manager.save(step, args=ocp.args.Composite(**items))


def next_batch(run: Run, step: int) -> train_step.Batch:
    """This step's global batch as the DiT's conditions (through the frozen encoders for a frame dataset)."""
    host = next(run.iterator)
    if run.cached:
        fields = {name: host[name] for name in ("video", "image", "pose", "face", "drop_face")}
        return train_step.Batch(**parallel.global_batch(fields, run.mesh, run.rules))
    siglip_size = run.networks.siglip.config.image_size
    fields = {"video": host["video"], "control": host["control"], "drop_face": host["drop_face"],
              "face_pixels": train_step.siglip_pixels(host["face"], siglip_size)}
    frames = parallel.global_batch(fields, run.mesh, run.rules)
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(run.config.seed), step), 1)
    d = run.config.data
    with parallel.activate(run.mesh, run.rules):
        batch = train_step.encode_batch(run.networks, run.encoder_params, frames, key,
                                        image_noise=(d.image_noise_mean, d.image_noise_std),
                                        dtype=jnp.dtype(run.config.compute.dtype))
    return jax.device_put(batch, run.batch_shardings)


def train(config: train_config.TrainConfig, data_dir: str, workdir: str, *, steps: int | None = None,
          save_every: int | None = None, mesh: str = "fsdp", progress: bool = False) -> dict:
    """Trains (or resumes) in `workdir` until `steps` optimizer steps are done; returns the run's summary."""
    from tqdm import tqdm

    steps = config.steps if steps is None else steps
    save_every = config.save_every if save_every is None else save_every
    if steps < 1 or save_every < 1:
        raise UserError(f"--steps and --save-every must be positive, got {steps} and {save_every}")
    records.read_index(data_dir)  # a bad data folder fails before any model work
    resumed = prepare_workdir(workdir, config)
    run, restored = setup(config, data_dir, workdir, mesh)
    start = int(run.state.step)
    metrics_path = os.path.join(workdir, METRICS_FILE)
    truncate_metrics(metrics_path, start if resumed else 0)
    peak = peak_flops_per_device(jax.devices()[0], config.compute.dtype)
    devices = run.mesh.size

    manager = _manager(workdir, config.keep)
    bar = tqdm(total=steps, initial=min(start, steps), desc="train", unit="step", disable=None if progress else True)
    times, losses, last_saved = [], [], restored
    try:
        for step in range(start + 1, steps + 1):
            begin = time.perf_counter()
            batch = next_batch(run, step)
            data_seconds = time.perf_counter() - begin
            with parallel.activate(run.mesh, run.rules):
                run.state, metrics = run.step_fn(run.state, batch)
            loss, grad_norm = (float(v) for v in jax.device_get((metrics["loss"], metrics["grad_norm"])))
            seconds = time.perf_counter() - begin
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                raise UserError(f"training stopped at step {step}: the loss is {loss} and the gradient norm "
                                f"{grad_norm}; nothing of this step was saved, the last good checkpoint is "
                                f"{'step ' + str(last_saved) if last_saved else 'none'} in {workdir}: lower the "
                                "learning rate or check the data, then rerun the same command to resume from it")
            if step > start + 1:  # the first step of a process includes compilation
                times.append(seconds)
            losses.append(loss)
            flops_per_s = run.flops_per_step / seconds
            record = {"step": step, "loss": loss, "grad_norm": grad_norm,
                      "learning_rate": float(train_state.learning_rate(config.optimizer)(step - 1)),
                      "step_seconds": round(seconds, 4), "data_seconds": round(data_seconds, 4),
                      "tokens_per_s": round(run.tokens_per_step / seconds, 1),
                      "mfu": None if peak is None else flops_per_s / devices / peak}
            if jax.process_index() == 0:
                with open(metrics_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", s_per_step=f"{seconds:.2f}",
                            tok_s=f"{record['tokens_per_s']:.0f}",
                            mfu="n/a" if peak is None else f"{record['mfu']:.2%}")
            if step % save_every == 0 or step == steps:
                save(manager, run.state, run.iterator, run)
                last_saved = step
        manager.wait_until_finished()
    finally:
        bar.close()
        manager.close()

    step_seconds = statistics.median(times) if times else None
    return {"workdir": workdir, "stage": config.stage.name, "data": "latents" if run.cached else "frames",
            "steps": int(run.state.step), "resumed_from": restored, "steps_run": len(losses),
            "first_loss": losses[0] if losses else None, "loss": losses[-1] if losses else None,
            "checkpoint": last_saved, "step_seconds": step_seconds,
            "tokens_per_s": None if not step_seconds else run.tokens_per_step / step_seconds,
            "flops_per_step": run.flops_per_step, "peak_flops_per_device": peak, "devices": devices,
            "mfu": None if not step_seconds or peak is None else run.flops_per_step / step_seconds / devices / peak,
            "mesh": dict(run.mesh.shape), "ok": True}


def run_train(args) -> dict:
    """`a1-jax train`."""
    parallel.initialize_distributed()  # first: before any other JAX call
    config = train_config.load(args.config)
    if args.init is not None:
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, weights=args.init))
    return train(config, args.data, args.workdir, steps=args.steps, save_every=args.save_every, mesh=args.mesh,
                 progress=True)
