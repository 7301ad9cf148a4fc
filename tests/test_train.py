"""Training on the tiny configuration: overfitting real clips, a sharded step against the single-device one, kill -9
and resume, a checkpoint restored onto another mesh, the trained workdir in the sampler, the NaN stop, stage
freezing, initialisation from an I2V-style transformer, and the latent cache. One frame dataset (the sample drivers),
its latent cache and one tiny base model are made per session; runs are a few steps."""

import copy
import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml
from flax import traverse_util

from a1_jax import conditions, diffusion, parallel
from a1_jax.cli import main
from a1_jax.config import DiTConfig, SiglipConfig, VAEConfig
from a1_jax.errors import UserError
from a1_jax.models import vae
from a1_jax.parity import pipeline as reference
from a1_jax.sampling import Animator
from a1_jax.train import config as train_config
from a1_jax.train import init, state as train_state, step as train_step, trainer
from a1_jax.train.data import latents, records
from a1_jax.train.data.pipeline import decode_window
from a1_jax.train.data.writer import make_dataset
from a1_jax.weights import checkpoint

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny"
TINY_YAML = REPO / "configs" / "train" / "tiny.yaml"
SHARD_TOLERANCE = 2e-5  # max|sharded - single| / max|single| after one step, fp32 (reduction order differs)
HANG_GUARD = 1800  # seconds a subprocess may take: a few minutes on a quiet CPU, ~10x that on the shared 2-core box
BF16_TOLERANCE = 2e-2  # |loss(bf16 compute) - loss(fp32)| / loss(fp32) on one batch: bf16 has 8 mantissa bits


# ---------------------------------------------------------------------------------------------------------- helpers
def _yaml(base: pathlib.Path, **changes) -> dict:
    """The tiny training config starting from the session's base model, with `section.key` changes."""
    data = yaml.safe_load(TINY_YAML.read_text())
    data["model"]["weights"] = str(base)
    for dotted, value in changes.items():
        section, _, key = dotted.partition("__")
        if key:
            data[section][key] = value
        else:
            data[section] = value
    return data


def _config(base, **changes) -> train_config.TrainConfig:
    return train_config.from_dict(_yaml(base, **changes), "test config")


def _write_config(folder: pathlib.Path, base, **changes) -> pathlib.Path:
    path = folder / "train.yaml"
    path.write_text(yaml.safe_dump(_yaml(base, **changes)))
    return path


def _losses(workdir) -> list[float]:
    return [json.loads(line)["loss"] for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def _flat(tree) -> dict:
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def _saved(workdir: pathlib.Path) -> bool:
    """A training step of `workdir` is completely checkpointed (Orbax has renamed its temporary folder)."""
    return (workdir / checkpoint.WORKDIR_CHECKPOINTS).is_dir() and checkpoint.trained_step(workdir) is not None


def _relative_error(a: dict, b: dict) -> float:
    return max(float(np.abs(a[k] - b[k]).max() / max(np.abs(b[k]).max(), 1e-12)) for k in b)


def _settings(configs):
    return train_step.LossSettings(table=diffusion.noise_table(configs.scheduler),
                                   scaling_factor=configs.vae.scaling_factor,
                                   num_timesteps=configs.scheduler.num_train_timesteps)


def _latent_batch(data, size: int) -> train_step.Batch:
    """The first `size` latent records of the (seeded) stream, faces kept."""
    iterator = iter(latents.latent_dataset(str(data), batch_size=size, seed=0, face_dropout=0.0, num_epochs=1,
                                           shard_index=0, shard_count=1))
    batch = next(iterator)
    return train_step.Batch(**{field.name: jnp.asarray(batch[field.name]) for field in dataclasses.fields(train_step.Batch)})


def _tiny_release(folder, **dit_changes):
    dit = dataclasses.replace(DiTConfig.from_json(TINY / "transformer" / "config.json"), **dit_changes)
    return reference.write_release(folder, transformer=dit, vae=VAEConfig.from_json(TINY / "vae" / "config.json"),
                                   siglip=SiglipConfig.from_json(TINY / "siglip-so400m-patch14-384" / "config.json"))


# --------------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def base(tmp_path_factory) -> pathlib.Path:
    """The tiny configuration with random weights as our converted checkpoint (made with torch: no XLA compile).

    The VAE's posterior log-variance is shifted by -10 (std e^-5), as a trained VAE's is small: a random encoder's
    logvar is about 0, which would make every latent sample mostly fresh noise that no model can learn."""
    from safetensors.numpy import load_file, save_file

    folder = tmp_path_factory.mktemp("base")
    _tiny_release(folder / "release")
    weights = folder / "release" / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    bias = state["encoder.conv_out.conv.bias"].copy()
    bias[bias.shape[0] // 2:] -= 10.0  # conv_out gives [mean | logvar]
    state["encoder.conv_out.conv.bias"] = bias
    save_file(state, weights)
    checkpoint.convert(folder / "release", folder / "model")
    return folder / "model"


@pytest.fixture(scope="session")
def clips(shared, tmp_path_factory) -> pathlib.Path:
    """`make-dataset` on the three sample drivers (4 clips of 38-49 frames)."""
    videos = tmp_path_factory.mktemp("train_videos")
    for name in ("drive_1", "drive_4", "drive_7"):
        (videos / f"{name}.mp4").symlink_to(shared / "data" / "driving" / f"{name}.mp4")
    out = tmp_path_factory.mktemp("train_clips") / "data"
    summary = make_dataset(str(videos), str(out), landmarker_path=str(shared / "models" / "face_landmarker.task"))
    assert summary["clips"] == 4
    return out


@pytest.fixture(scope="session")
def cached(clips, base, tmp_path_factory) -> pathlib.Path:
    """The same clips with a latent cache of the tiny window (9 frames at 96x144) from the base model's encoders."""
    out = tmp_path_factory.mktemp("train_cached") / "data"
    (out / records.DATASET_NAME).mkdir(parents=True)
    (out / records.DATASET_NAME / records.CONFIG).symlink_to(clips / records.DATASET_NAME / records.CONFIG)
    (out / records.INDEX_FILE).write_text((clips / records.INDEX_FILE).read_text())
    summary = latents.make_latents(str(out), str(base), frames=9, height=96, width=144)
    assert summary["latent_records"] == 18  # 49-frame clips: 6 windows of 9; 38- and 40-frame clips: 4
    return out


def _train_command(folder, clips, workdir) -> list[str]:
    return [sys.executable, "-m", "a1_jax", "train", "--config", str(folder / "train.yaml"), "--data", str(clips),
            "--workdir", str(workdir), "--steps", "8", "--save-every", "3", "--mesh", "single"]


def _environment() -> dict:
    """The subprocesses use the test run's compilation cache (tests/conftest.py): they load what the session's runs,
    in-process or not, compiled before them (the same executables, so the same numbers)."""
    return {**os.environ, "JAX_DEFAULT_MATMUL_PRECISION": "highest"}


def _reading_cache(env: dict) -> dict:
    """`env` for a process the test kills: it reads the compilation cache but writes nothing there. JAX writes an
    entry in place, not atomically, so a kill mid-write would leave a truncated entry that every later reader of the
    shared cache would warn about and compile again."""
    return {**env, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "1e9"}  # no compile takes that long


@pytest.fixture(scope="session")
def frames_run(clips, base, tmp_path_factory) -> pathlib.Path:
    """8 steps on the frame dataset (the encoders run every step), EMA kept, checkpoints every 3: the uninterrupted
    run, as a real `python -m a1_jax train` process."""
    folder = tmp_path_factory.mktemp("frames_run")
    _write_config(folder, base, ema_decay=0.99)
    done = subprocess.run(_train_command(folder, clips, folder / "run"), env=_environment(),
                          capture_output=True, text=True, timeout=HANG_GUARD)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["data"] == "frames" and summary["steps"] == 8 and summary["checkpoint"] == 8
    return folder


@pytest.fixture(scope="session")
def overfit_run(cached, base, tmp_path_factory) -> pathlib.Path:
    """300 steps (batch 4) on the latent cache, checkpoints at 150 and 300."""
    workdir = tmp_path_factory.mktemp("overfit") / "run"
    summary = trainer.train(_overfit_config(base), str(cached), str(workdir), steps=300, save_every=150, mesh="single")
    assert summary["data"] == "latents" and summary["steps"] == 300
    return workdir


def _overfit_config(base):
    return _config(base, data__face_dropout=0.0, data__batch_size=4, optimizer__learning_rate=2e-3,
                   optimizer__warmup_steps=10, optimizer__decay_steps=301, optimizer__end_learning_rate=2e-4)


# ------------------------------------------------------------------------------------------------------------ tests
def test_train_overfits_real_clips_to_half_the_loss(overfit_run, cached):
    """300 steps (batch 4) on the 18 cached windows of the sample drivers halve the training loss, measured on all of
    them with the same timesteps and noise before and after (one fixed key): the real loss on real data, comparable."""
    configs = checkpoint.ModelConfigs.from_folder(overfit_run)
    networks = checkpoint.build_networks(configs)
    before = checkpoint.load_params(overfit_run / "model", networks)["transformer"]
    after = checkpoint.load_params(overfit_run, networks)["transformer"]
    batch = _latent_batch(cached, 18)
    keys = jax.random.split(jax.random.key(7), 18)
    loss = jax.jit(lambda p: train_step.example_losses(networks.transformer, p, batch, keys, _settings(configs)).mean())
    start, end = float(loss(before)), float(loss(after))
    assert 0.5 < start < 5 and end <= 0.5 * start, (start, end)


def _one_step(config: train_config.TrainConfig, mesh_name: str, batch: train_step.Batch) -> tuple:
    """(state, metrics, the step's lowered HLO text) of one train step from the base model's state on `batch`."""
    mesh, rules = trainer.make_mesh(mesh_name)
    model = init.base_model(config, mesh, rules)
    params = model.params["transformer"]
    labels = train_state.stage_labels(params, config.stage)
    optimizer = train_state.make_optimizer(config.optimizer, labels)
    ema = train_state.trainable_paths(labels) if config.ema_decay else None
    init_fn = lambda p: train_state.init_state(p, optimizer, 0, ema)
    shardings = train_state.state_shardings(jax.eval_shape(init_fn, params), checkpoint.param_shardings(
        model.networks, mesh, rules)["transformer"], mesh)
    transformer = model.networks.transformer.clone(dtype=jnp.dtype(config.compute.dtype))
    step, batch_shardings = trainer.build_step(config, model.configs, transformer, labels, optimizer, shardings,
                                               mesh, rules)
    state = jax.jit(init_fn, out_shardings=shardings)(params)
    batch = jax.device_put(batch, batch_shardings)
    with parallel.activate(mesh, rules):
        text = step.lower(state, batch).as_text()
        state, metrics = step(state, batch)
    return state, metrics, text


def _step_config(base, **changes) -> train_config.TrainConfig:
    """The one-step tests' config: batch 4, EMA kept (the bf16 test checks its dtype; it changes no param)."""
    return _config(base, data__batch_size=4, ema_decay=0.99, **changes)


@pytest.fixture(scope="module")
def fp32_step(cached, base) -> tuple:
    """`_one_step` in fp32 on one device: the reference of the shard test and of the bf16 test, computed once."""
    return _one_step(_step_config(base), "single", _latent_batch(cached, 4))


def test_shard_step_on_fsdp4_tensor2_and_accumulation_equal_the_single_device_step(cached, base, fp32_step):
    """One train step from the same state and batch (4 examples) on one device, on fsdp=4 x tensor=2 (8 devices),
    and on one device in 2 accumulated microbatches: the loss, gradient norm and every updated parameter agree to
    SHARD_TOLERANCE (fp32; the reductions add in another order)."""
    batch = _latent_batch(cached, 4)
    results = {}
    for name, accumulate in (("single", 1), ("fsdp_tensor", 1), ("single", 2)):
        if (name, accumulate) == ("single", 1):
            state, metrics, _ = fp32_step
        else:
            state, metrics, _ = _one_step(_step_config(base, optimizer__grad_accum=accumulate), name, batch)
        specs = " ".join(str(leaf.sharding.spec) for leaf in jax.tree_util.tree_leaves(state.params))
        results[name, accumulate] = (float(metrics["loss"]), float(metrics["grad_norm"]), _flat(state.params), specs)
    single = results["single", 1]
    assert "tensor" in results["fsdp_tensor", 1][3] and "fsdp" in results["fsdp_tensor", 1][3]
    for other in (results["fsdp_tensor", 1], results["single", 2]):
        assert abs(other[0] - single[0]) <= SHARD_TOLERANCE * single[0]
        assert abs(other[1] - single[1]) <= SHARD_TOLERANCE * single[1]
        assert _relative_error(other[2], single[2]) <= SHARD_TOLERANCE


def test_train_bf16_compute_keeps_fp32_master_weights(cached, base, fp32_step):
    """One step computing in bf16 and one in fp32 (the shard test's) from the same fp32 state and batch: after the
    bf16 step the params, the optimizer state and the EMA are all fp32; the step really computes in bf16 (bf16 dots
    in its HLO, a loss that differs from fp32's), and its loss is within BF16_TOLERANCE of the fp32 loss."""
    runs = {"float32": fp32_step,
            "bfloat16": _one_step(_step_config(base, compute__dtype="bfloat16"), "single", _latent_batch(cached, 4))}
    state, metrics, text = runs["bfloat16"]
    for tree in (state.params, state.opt_state, state.ema):
        floats = [leaf.dtype for leaf in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.floating)]
        assert floats and set(floats) == {jnp.dtype(jnp.float32)}
    assert state.ema and "bf16" in text and "bf16" not in runs["float32"][2]
    loss16, loss32 = float(metrics["loss"]), float(runs["float32"][1]["loss"])
    assert loss16 != loss32 and abs(loss16 - loss32) <= BF16_TOLERANCE * loss32, (loss16, loss32)


def test_train_ema_warms_up_and_covers_the_trainable_leaves_only():
    """`ema_update` against a NumPy loop over 40 updates: decay_t = min(decay, (1 + t) / (10 + t)) (0.1 at the first
    update); `init_state` keeps an EMA of the trainable leaves only (a frozen leaf's average is itself)."""
    rng = np.random.default_rng(0)
    params = {"a": {"kernel": rng.standard_normal((3, 4)).astype(np.float32)},
              "b": {"bias": rng.standard_normal(5).astype(np.float32)}}
    labels = {"a": {"kernel": train_state.TRAINABLE}, "b": {"bias": train_state.FROZEN}}
    paths = train_state.trainable_paths(labels)
    state = train_state.init_state(params, optax.sgd(0.1), 0, paths)
    assert list(traverse_util.flatten_dict(state.ema)) == [("a", "kernel")]
    decay, ema, expected = 0.99, state.ema, params["a"]["kernel"].astype(np.float64)
    update = jax.jit(lambda e, p, t: train_state.ema_update(e, p, decay, t))
    for t in range(40):
        params = jax.tree_util.tree_map(lambda x: x + rng.standard_normal(x.shape).astype(np.float32), params)
        ema = update(ema, params, t)
        d = min(decay, (1 + t) / (10 + t))
        expected = d * expected + (1 - d) * params["a"]["kernel"]
        np.testing.assert_allclose(np.asarray(ema["a"]["kernel"]), expected, rtol=1e-5, atol=1e-6)
    assert float(train_state.ema_decay_at(decay, 0)) == pytest.approx(0.1)
    assert float(train_state.ema_decay_at(decay, 10 ** 6)) == pytest.approx(decay)


def test_resume_after_kill_9_logs_the_uninterrupted_losses(frames_run, clips):
    """`python -m a1_jax train` killed with SIGKILL mid-run, then the same command again: the metrics file reads as
    one run whose losses equal the uninterrupted run's exactly (CPU), the resume started from a checkpoint, and the
    final params and EMA are bit-identical to the uninterrupted run's."""
    import orbax.checkpoint as ocp

    folder = frames_run
    workdir = folder / "killed"
    command, env = _train_command(folder, clips, workdir), _environment()
    metrics = workdir / "metrics.jsonl"
    _kill_when(command, env, lambda: _saved(workdir), "the run")  # once a checkpoint is complete (step 3 or 6)
    assert 3 <= len(metrics.read_text().splitlines()) < 8

    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=HANG_GUARD)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["resumed_from"] in (3, 6) and summary["steps"] == 8
    assert _losses(workdir) == _losses(folder / "run")
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == list(range(1, 9))
    with ocp.StandardCheckpointer() as saved:
        for item in ("params", "ema"):
            a = _flat(saved.restore(os.path.abspath(folder / "run" / "checkpoints" / "8" / item)))
            b = _flat(saved.restore(os.path.abspath(workdir / "checkpoints" / "8" / item)))
            assert all(np.array_equal(a[k], b[k]) for k in a), item


def test_checkpoint_written_on_one_device_resumes_on_fsdp_tensor(overfit_run, cached, base, tmp_path):
    """The overfit run's step-150 checkpoint (one device) resumed on fsdp=4 x tensor=2 for 10 steps: params,
    optimizer state, data position and rng land on the new mesh, and the losses follow the single-device run's
    steps 151-160 (fp32 tolerance: the sharded reductions add in another order)."""
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(overfit_run, moved)
    shutil.rmtree(moved / "checkpoints" / "300")
    summary = trainer.train(_overfit_config(base), str(cached), str(moved), steps=160, save_every=10,
                            mesh="fsdp_tensor")
    assert summary["resumed_from"] == 150 and summary["mesh"]["fsdp"] == 4 and summary["mesh"]["tensor"] == 2
    a, b = np.array(_losses(overfit_run)), np.array(_losses(moved))
    assert len(b) == 160 and np.array_equal(a[:150], b[:150])
    assert np.abs(a[150:160] - b[150:]).max() <= 1e-4 * a[150:160].max(), (a[150:160], b[150:])


def test_trained_checkpoint_workdir_animates(frames_run):
    """`Animator.from_pretrained(WORKDIR)` holds the last step's EMA as its DiT and the workdir's encoders, and runs
    the sampler's stages on them (conditions, one denoising step, the decode) on a 96x144 canvas."""
    import orbax.checkpoint as ocp

    workdir = frames_run / "run"
    assert checkpoint.trained_step(workdir) == (8, "ema")
    animator = Animator.from_pretrained(workdir)
    with ocp.StandardCheckpointer() as saved:
        ema = _flat(saved.restore(os.path.abspath(workdir / "checkpoints" / "8" / "ema")))
        params = _flat(saved.restore(os.path.abspath(workdir / "checkpoints" / "8" / "params")))
    ours = _flat(animator.params["transformer"])
    assert all(np.array_equal(v, ema[k]) for k, v in ours.items())
    assert not all(np.array_equal(v, params[k]) for k, v in ours.items())
    rng = np.random.default_rng(0)
    reference_latent = animator.encode_reference(rng.integers(0, 256, (96, 144, 3), np.uint8),
                                                 rng.integers(0, 256, (512, 512, 3), np.uint8))
    conditions = animator.conditions(reference_latent, rng.integers(0, 256, (9, 96, 144, 3), np.uint8),
                                     jax.random.key(0))
    latents_, _ = animator.denoise(conditions, steps=1, key=jax.random.key(1))
    frames = animator.decode(latents_)
    assert frames.shape == (9, 96, 144, 3) and frames.dtype == np.uint8
    assert np.isfinite(np.asarray(latents_)).all() and frames.std() > 0


def test_train_stops_on_a_nan_loss_keeping_the_last_good_checkpoint(cached, base, tmp_path, capsys):
    """A learning rate of 1e30 makes step 2's loss non-finite: exit 2, one stderr line naming step 2 and checkpoint
    1; nothing of step 2 is logged or saved."""
    config = _write_config(tmp_path, base, optimizer__learning_rate=1e30, optimizer__warmup_steps=0)
    code = main(["train", "--config", str(config), "--data", str(cached), "--workdir", str(tmp_path / "run"),
                 "--steps", "5", "--save-every", "1", "--mesh", "single"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "step 2" in err[0] and "step 1" in err[0]
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1]
    assert checkpoint.trained_step(tmp_path / "run") == (1, "params")


def test_train_stage_patterns_freeze_the_rest_and_dead_leaves_are_reported(cached, base, tmp_path, capsys):
    """`a1-jax train`, stage 'motion' plus the face connector, with every face dropped (face_dropout 1): after 3
    steps every frozen leaf is bit-identical to the start and every trainable one moved, except the connector's
    first kernel, whose input (the face tokens) is always zero: it alone is the summary's `dead`, and a warning
    names it."""
    stage = {"name": "motion", "trainable": ["patch_embed/proj_.*", "patch_embed/pose_proj_.*", "blocks/attn/.*"],
             "frozen": []}
    config = _write_config(tmp_path, base, stage=stage, optimizer__warmup_steps=0, data__face_dropout=1.0)
    assert main(["train", "--config", str(config), "--data", str(cached), "--workdir", str(tmp_path / "run"),
                 "--steps", "3", "--save-every", "3", "--mesh", "single"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    dead = ["patch_embed/pose_proj_0/kernel"]
    assert summary["dead"] == dead
    warning = [line for line in captured.err.splitlines() if "warning" in line]
    assert len(warning) == 1 and all(name in warning[0] for name in dead)
    networks = checkpoint.build_networks(checkpoint.ModelConfigs.from_folder(tmp_path / "run"))
    start = _flat(checkpoint.load_params(base, networks)["transformer"])
    end = _flat(checkpoint.load_params(tmp_path / "run", networks)["transformer"])
    trainable = {k for k in start if k.startswith(("patch_embed/proj_", "patch_embed/pose_proj_", "blocks/attn/"))}
    assert trainable and len(trainable) < len(start) and summary["trainable"] == len(trainable)
    assert all(np.array_equal(start[k], end[k]) for k in set(start) - trainable | set(dead))
    assert all(not np.array_equal(start[k], end[k]) for k in trainable - set(dead))


def test_train_init_from_an_i2v_transformer_grows_the_inputs_and_a_live_connector(base, tmp_path):
    """A diffusers transformer with [noise | image] input channels (8 = 2 x 4 latent channels) and no face
    connector: its noise and image kernels land in channels 0:4 and 8:12, the pose channels 4:8 are zero, the rest
    is the source's; the new connector's last layer is zero and its first LeCun normal. So at step 0 neither the pose
    latents nor the face tokens change the output, yet the gradient reaches the connector's last layer (and through
    it, once it moves, the first: both zero would leave both at exactly zero forever)."""
    from safetensors.numpy import load_file, save_file

    _tiny_release(tmp_path / "i2v", in_channels=8)
    weights = tmp_path / "i2v" / "transformer" / "diffusion_pytorch_model.safetensors"
    state = {k: v for k, v in load_file(weights).items() if not k.startswith("patch_embed.pose_proj.")}
    save_file(state, weights)
    config = _config(base, model__init_transformer=str(tmp_path / "i2v"))
    mesh, rules = trainer.make_mesh("single")
    model = init.base_model(config, mesh, rules)
    params = model.params["transformer"]
    kernel = np.asarray(params["patch_embed"]["proj_kernel"])
    source = np.transpose(state["patch_embed.proj.weight"], (2, 3, 1, 0))  # [O, I, kh, kw] -> [kh, kw, I, O]
    assert np.array_equal(kernel[:, :, :4], source[:, :, :4]) and np.array_equal(kernel[:, :, 8:], source[:, :, 4:])
    assert not kernel[:, :, 4:8].any() and np.abs(source).min() > 0
    connector = {name: {k: np.asarray(v) for k, v in params["patch_embed"][name].items()}
                 for name in ("pose_proj_0", "pose_proj_2")}
    assert not connector["pose_proj_2"]["kernel"].any() and not connector["pose_proj_2"]["bias"].any()
    first = connector["pose_proj_0"]["kernel"]
    assert abs(first.std() * np.sqrt(first.shape[0]) - 1) < 0.2 and not connector["pose_proj_0"]["bias"].any()
    assert np.array_equal(np.asarray(params["blocks"]["attn"]["to_q"]["kernel"][1]),
                          state["transformer_blocks.1.attn1.to_q.weight"].T)
    assert model.report["init_transformer"]["zero_filled"] == ["patch_embed/pose_proj_0/bias",
                                                               "patch_embed/pose_proj_2/bias",
                                                               "patch_embed/pose_proj_2/kernel"]
    assert model.report["init_transformer"]["new"] == ["patch_embed/pose_proj_0/kernel"]
    rng = np.random.default_rng(0)
    latents_ = rng.standard_normal((1, 3, 12, 12, 18)).astype(np.float32)
    face = rng.standard_normal((1, 16, 48)).astype(np.float32)
    other = latents_.copy()
    other[:, :, 4:8] = rng.standard_normal(other[:, :, 4:8].shape)
    transformer = model.networks.transformer
    apply = jax.jit(lambda p, x, f: transformer.apply({"params": p}, x, f, jnp.array([500.0])))
    assert np.array_equal(np.asarray(apply(params, latents_, face)), np.asarray(apply(params, other, face)))
    assert np.array_equal(np.asarray(apply(params, latents_, face)), np.asarray(apply(params, latents_, 3 * face)))
    grads = jax.grad(lambda p: jnp.sum(apply(p, latents_, face) ** 2))(params)["patch_embed"]
    assert np.abs(np.asarray(grads["pose_proj_2"]["kernel"])).max() > 0
    with pytest.raises(UserError, match="input channels"):
        init.grow_input_channels(np.zeros((6, 6, 5, 64), np.float32), 12, 4)


def test_data_latent_cache_holds_the_encoders_outputs(cached, base):
    """A cached record equals the frozen encoders on its window with the writer's key (within float16 rounding):
    pose latents, the window's posterior, the noise-augmented reference's posterior and the face tokens; the
    fingerprint tells other encoders apart."""
    index = records.read_index(str(cached))
    block = index["latents"]
    assert (block["frames"], block["height"], block["width"]) == (9, 96, 144)
    from array_record.python.array_record_data_source import ArrayRecordDataSource

    stored = latents.parse(ArrayRecordDataSource([os.path.join(cached, block["shards"][0]["path"])])[7],
                           block["shapes"])
    clip = records.parse_clip(ArrayRecordDataSource(records.shard_paths(str(cached), index))[int(stored["clip"])])
    video, control = decode_window(clip, stored["frames"], 96, 144)
    configs = checkpoint.ModelConfigs.from_folder(base)
    networks = checkpoint.build_networks(configs)
    params = checkpoint.load_params(base, networks)
    face = conditions.face_pixels(records.decode_image(clip.face)[None], configs.siglip.image_size)
    fresh = conditions.window_conditions(networks, params, jnp.asarray(video[None]), jnp.asarray(control[None]),
                                         jnp.asarray(face), jax.random.fold_in(jax.random.key(0), 7)[None],
                                         pixel_noise=(-3.0, 0.5), dtype=jnp.float32)  # the writer's key of record 7
    for name, field in latents.FIELDS.items():
        want = np.asarray(fresh[field][0])
        assert stored[name].shape == want.shape
        assert np.abs(stored[name] - want).max() <= 2 ** -10 * np.abs(want).max(), name
    # The reference latent is of the noise-augmented frame: far from the clean frame's.
    clean = vae.encode(networks.vae, params["vae"], jnp.asarray(video[None, :1]), tiling=True).mean[0]
    assert np.abs(stored["image_latent"][..., :4] - np.asarray(clean)).max() > 0.01 * np.abs(clean).max()
    assert stored["frames"][0] == 0 and np.array_equal(np.diff(stored["frames"][1:]), np.ones(7))
    other = copy.deepcopy(params)
    other["vae"] = jax.tree_util.tree_map(lambda x: x + 1, other["vae"])
    assert latents.encoder_fingerprint(other) != block["fingerprint"] == latents.encoder_fingerprint(params)


def test_train_face_dropout_zeroes_the_face_tokens(cached, base):
    """An example flagged `drop_face` sees all-zero face tokens: changing its tokens changes nothing, while the same
    change moves the loss of an example that keeps its face."""
    configs = checkpoint.ModelConfigs.from_folder(base)
    networks = checkpoint.build_networks(configs)
    params = checkpoint.load_params(base, networks)["transformer"]
    batch = _latent_batch(cached, 2).replace(drop_face=jnp.array([True, False]))
    keys = jax.random.split(jax.random.key(3), 2)
    losses = jax.jit(lambda b: train_step.example_losses(networks.transformer, params, b, keys, _settings(configs)))
    before, after = np.asarray(losses(batch)), np.asarray(losses(batch.replace(face=batch.face * 3 + 1)))
    assert before[0] == after[0] and abs(before[1] - after[1]) > 1e-4 * before[1]


# ------------------------------------------------------------------------- conditions used, stages from an I2V model
IDENTITY_YAML = REPO / "configs" / "train" / "tiny_identity.yaml"
MOTION_STAGE = {"name": "motion", "trainable": ["patch_embed/proj_.*", "blocks/attn/.*"], "frozen": []}
POSE_MARGIN = 0.05  # loss(another clip's pose latents) / loss(own) - 1 after the motion run, at least
FACE_MARGIN = 0.005  # loss(zero face tokens) / loss(own) - 1 after the identity run, at least


@pytest.fixture(scope="session")
def i2v(tmp_path_factory) -> pathlib.Path:
    """`tools/tiny_i2v.py`: diffusers' CogVideoXTransformer3DModel, [noise | image] inputs, no face connector."""
    import runpy

    folder = tmp_path_factory.mktemp("i2v") / "transformer"
    runpy.run_path(str(REPO / "tools" / "tiny_i2v.py"))["write_tiny_i2v"](folder)
    return folder


def _stage_run(folder, cached, base, i2v, **changes) -> tuple[pathlib.Path, dict]:
    """`configs/train/tiny_identity.yaml` (with `changes`) on the session's base encoders and latent cache."""
    data = yaml.safe_load(IDENTITY_YAML.read_text())
    data["model"].update(weights=str(base), init_transformer=str(i2v))
    data.update(changes)
    summary = trainer.train(train_config.from_dict(data, str(IDENTITY_YAML)), str(cached), str(folder / "run"),
                            mesh="single")
    return folder / "run", summary


@pytest.fixture(scope="session")
def identity_run(cached, base, i2v, tmp_path_factory) -> tuple[pathlib.Path, dict]:
    return _stage_run(tmp_path_factory.mktemp("identity"), cached, base, i2v)


@pytest.fixture(scope="session")
def motion_run(cached, base, i2v, tmp_path_factory) -> tuple[pathlib.Path, dict]:
    return _stage_run(tmp_path_factory.mktemp("motion"), cached, base, i2v, stage=MOTION_STAGE)


def _condition_losses(workdir, cached) -> dict[str, dict[str, float]]:
    """The denoising loss on all 18 cached windows x 4 timesteps (50 … 950), one fixed noise, of the model a run
    started from and of its trained DiT (the EMA the sampler reads): with each window's own conditions, with
    another clip's pose latents, with zero face tokens."""
    configs = checkpoint.ModelConfigs.from_folder(workdir)
    networks = checkpoint.build_networks(configs)
    batch = _latent_batch(cached, 18)
    clips_ = np.asarray(next(iter(latents.latent_dataset(str(cached), batch_size=18, seed=0, num_epochs=1,
                                                         shard_index=0, shard_count=1)))["clip"])
    order = np.argsort(clips_, kind="stable")
    other = np.empty(18, int)
    other[order] = np.roll(order, 6)  # 6 windows of one clip, 4 of each other: every window gets another clip's
    assert (clips_[other] != clips_).all()
    repeat = lambda x: jnp.repeat(x, 4, axis=0)
    batch = jax.tree_util.tree_map(repeat, batch)
    timesteps = jnp.tile(jnp.linspace(50, 950, 4).astype(jnp.int32), 18)
    keys = jax.random.split(jax.random.key(7), 72)
    variants = {"own": batch, "other_pose": batch.replace(pose=batch.pose.reshape(18, 4, *batch.pose.shape[1:])[
        other].reshape(batch.pose.shape)), "zero_face": batch.replace(drop_face=jnp.ones(72, bool))}
    loss = jax.jit(lambda p, b: train_step.example_losses(networks.transformer, p, b, keys, _settings(configs),
                                                          timesteps).mean())
    models = {"start": checkpoint.load_params(workdir / checkpoint.WORKDIR_MODEL, networks)["transformer"],
              "trained": checkpoint.load_params(workdir, networks)["transformer"]}
    return {name: {variant: float(loss(params, b)) for variant, b in variants.items()}
            for name, params in models.items()}


def test_train_motion_stage_uses_the_pose_latents(motion_run, cached):
    """Stage 1 from the I2V-style transformer (pose channels zero: at the start another clip's pose latents change
    nothing): after training, the loss with each window's own pose latents is lower than with another clip's by
    POSE_MARGIN at least."""
    losses = _condition_losses(motion_run[0], cached)
    assert losses["start"]["own"] == losses["start"]["other_pose"]
    trained = losses["trained"]
    assert trained["other_pose"] >= (1 + POSE_MARGIN) * trained["own"], losses


def test_train_identity_stage_from_i2v_learns_every_leaf_and_uses_the_face(identity_run, cached, base):
    """`configs/train/tiny_identity.yaml` from the I2V-style transformer (no face connector: a new one, last layer
    zero): every trainable leaf learned (`dead: []`); the face tokens change nothing at the start, and after
    training the loss with each clip's face tokens is lower than with zero face tokens by FACE_MARGIN at least.
    With both connector layers zero (the reference's zero_module) both checks fail (BUILD_NOTES, issue 13). The
    sampler's DiT is the EMA of the trainable leaves and the base's frozen leaves."""
    import orbax.checkpoint as ocp

    workdir, summary = identity_run
    assert summary["dead"] == [] and summary["trainable"] > 4 and summary["stage"] == "identity"
    losses = _condition_losses(workdir, cached)
    assert losses["start"]["own"] == losses["start"]["zero_face"]
    assert losses["trained"]["zero_face"] >= (1 + FACE_MARGIN) * losses["trained"]["own"], losses

    networks = checkpoint.build_networks(checkpoint.ModelConfigs.from_folder(workdir))
    start = _flat(checkpoint.load_params(workdir / checkpoint.WORKDIR_MODEL, networks)["transformer"])
    sampler = _flat(checkpoint.load_params(workdir, networks)["transformer"])
    step, item = checkpoint.trained_step(workdir)
    with ocp.StandardCheckpointer() as saved:
        params = _flat(saved.restore(os.path.abspath(workdir / checkpoint.WORKDIR_CHECKPOINTS / str(step) / "params")))
    trainable = {k for k in start if k.startswith(("patch_embed/pose_proj_", "patch_embed/text_proj/",
                                                  "blocks/attn/"))}
    assert item == "ema" and len(trainable) == summary["trainable"]
    assert all(np.array_equal(sampler[k], start[k]) for k in set(start) - trainable)
    assert all(not np.array_equal(sampler[k], params[k]) and not np.array_equal(sampler[k], start[k])
               for k in trainable)


# ------------------------------------------------------------------------------------- interrupted work, bad input
def _kill_when(command, env, ready, what) -> None:
    """Starts `command` (reading the compilation cache only), SIGKILLs it as soon as `ready()` holds; fails if it
    ended first."""
    process = subprocess.Popen(command, env=_reading_cache(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + HANG_GUARD
    while time.time() < deadline and process.poll() is None and not ready():
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    _, err = process.communicate()
    assert process.returncode == -signal.SIGKILL, f"{what} ended before it could be killed: {err[-2000:]}"


def test_data_latent_cache_killed_early_then_rerun_completes(cached, base, tmp_path):
    """`make-dataset --latents` SIGKILLed while its first shard is written: the same command again starts over and
    writes the same cache as an uninterrupted run (the session's), nothing partial left; once more, it reports it."""
    out = tmp_path / "data"
    (out / records.DATASET_NAME).mkdir(parents=True)
    (out / records.DATASET_NAME / records.CONFIG).symlink_to(cached / records.DATASET_NAME / records.CONFIG)
    index = records.read_index(str(cached))
    del index["latents"]
    records.write_index(str(out), index)
    command = [sys.executable, "-m", "a1_jax", "make-dataset", "--out", str(out), "--latents", str(base),
               "--frames", "9", "--height", "96", "--width", "144"]
    partial = pathlib.Path(latents.shard_dir(str(out)) + ".partial")
    _kill_when(command, os.environ, lambda: partial.is_dir() and os.listdir(partial), "the latent cache")
    assert "latents" not in records.read_index(str(out))

    done = subprocess.run(command, capture_output=True, text=True, timeout=HANG_GUARD)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["latent_records"] == 18 and not partial.exists()
    ours, session = records.read_index(str(out))["latents"], records.read_index(str(cached))["latents"]
    assert ours["fingerprint"] == session["fingerprint"] and ours["shapes"] == session["shapes"]
    for a, b in zip(ours["shards"], session["shards"]):
        assert (out / a["path"]).read_bytes() == (cached / b["path"]).read_bytes()
    again = subprocess.run(command, capture_output=True, text=True, timeout=HANG_GUARD)
    assert again.returncode == 0 and json.loads(again.stdout.strip().splitlines()[-1])["existing"]


def test_train_killed_while_writing_its_first_checkpoint_then_rerun_completes(cached, base, tmp_path):
    """`a1-jax train` SIGKILLed while it writes `model/` (the base model, its first checkpoint; under a temporary
    name): the same command again writes it anew and trains; `model/` holds the base model."""
    config = _write_config(tmp_path, base)
    workdir = tmp_path / "run"
    command = [sys.executable, "-m", "a1_jax", "train", "--config", str(config), "--data", str(cached),
               "--workdir", str(workdir), "--steps", "2", "--save-every", "1", "--mesh", "single"]
    partial = workdir / (checkpoint.WORKDIR_MODEL + trainer.PARTIAL)
    _kill_when(command, _environment(), partial.is_dir, "the first checkpoint")
    assert not checkpoint.is_converted(workdir / checkpoint.WORKDIR_MODEL)

    done = subprocess.run(command, env=_environment(), capture_output=True, text=True, timeout=HANG_GUARD)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["resumed_from"] is None and not partial.exists()
    networks = checkpoint.build_networks(checkpoint.ModelConfigs.from_folder(base))
    written = _flat(checkpoint.load_params(workdir / checkpoint.WORKDIR_MODEL, networks)["vae"])
    assert all(np.array_equal(v, written[k]) for k, v in _flat(checkpoint.load_params(base, networks)["vae"]).items())


def test_train_bad_inputs_are_one_line_and_write_nothing(cached, base, tmp_path, capsys):
    """An --init folder that is not a model, an init_transformer that is not a transformer, trainable patterns that
    match nothing, a latent cache of another geometry, a window the model cannot patch: exit 2, one stderr line,
    no workdir. (Mismatched process counts: the two-process test.)"""
    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    (not_a_model / "notes.txt").write_text("hello")
    geometry = tmp_path / "other_geometry"
    (geometry / records.DATASET_NAME).mkdir(parents=True)
    for sub in (records.CONFIG, latents.CONFIG):
        (geometry / records.DATASET_NAME / sub).symlink_to(cached / records.DATASET_NAME / sub)
    index = records.read_index(str(cached))
    index["latents"]["shapes"]["face_tokens"] = [729, 1152]  # as the 5B SigLIP makes them
    records.write_index(str(geometry), index)
    cases = {"init": ({}, ["--init", str(not_a_model)], cached, "not a SkyReels-A1 checkpoint"),
             "init_transformer": ({"model__init_transformer": str(not_a_model)}, [], cached, "safetensors"),
             "patterns": ({"stage": {"name": "typo", "trainable": ["blocks/atn/.*"]}}, [], cached, "blocks/atn"),
             "geometry": ({}, [], geometry, "another geometry"),
             "window": ({"data__height": 100}, [], cached, "multiples of")}
    for name, (changes, extra, data, message) in cases.items():
        (tmp_path / name).mkdir()
        config = _write_config(tmp_path / name, base, **changes)
        code = main(["train", "--config", str(config), "--data", str(data), "--workdir", str(tmp_path / name / "run"),
                     "--mesh", "single", *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], (name, err)
        assert not (tmp_path / name / "run").exists(), name


def test_train_cli_refuses_a_foreign_workdir_and_a_changed_config_writing_nothing(frames_run, clips, base, tmp_path,
                                                                                 capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    config = str(frames_run / "train.yaml")
    assert main(["train", "--config", config, "--data", str(clips), "--workdir", str(foreign), "--mesh", "single"]) == 2
    changed = _write_config(tmp_path, base, optimizer__learning_rate=5e-4)
    metrics = (frames_run / "run" / "metrics.jsonl").read_bytes()
    assert main(["train", "--config", str(changed), "--data", str(clips), "--workdir", str(frames_run / "run"),
                 "--mesh", "single"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "not a training workdir" in err[0] and "optimizer.learning_rate" in err[1]
    assert os.listdir(foreign) == ["notes.txt"] and (frames_run / "run" / "metrics.jsonl").read_bytes() == metrics


# -------------------------------------------------------------------------------------------------------- multi-host
TWO_HOST_TOLERANCE = 1e-5  # |loss(2 processes) - loss(1 process)| / loss, every step


def _two_processes(command: list[str], killed: bool = False) -> list[subprocess.Popen]:
    """`command` started as processes 0 and 1 of a 2-process run on 127.0.0.1, 4 CPU devices each; `killed`: the test
    will kill them (`_reading_cache`)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in _environment().items() if not k.startswith("A1_JAX_")}
    env = _reading_cache(env) if killed else env
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
               A1_JAX_COORDINATOR=f"127.0.0.1:{port}", A1_JAX_NUM_PROCESSES="2")
    return [subprocess.Popen(command, env={**env, "A1_JAX_PROCESS_ID": str(i)}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for i in range(2)]


def test_train_on_two_processes_matches_one_and_resumes_after_both_are_killed(cached, base, tmp_path, capsys):
    """The same `a1-jax train` command as 2 processes of 4 CPU devices (A1_JAX_COORDINATOR / NUM_PROCESSES /
    PROCESS_ID on 127.0.0.1), each reading its half of every batch, both SIGKILLed after the first checkpoint and
    started again: the run resumes, and its 6 losses equal the 1-process 8-device run's (same `fsdp` mesh, global
    batch 8) within TWO_HOST_TOLERANCE. Resuming that workdir with 1 process is refused, writing nothing."""
    config = _write_config(tmp_path, base, data__batch_size=8)
    workdir = tmp_path / "two"
    command = [sys.executable, "-m", "a1_jax", "train", "--config", str(config), "--data", str(cached),
               "--workdir", str(workdir), "--steps", "6", "--save-every", "2", "--mesh", "fsdp"]
    one = trainer.train(train_config.load(config), str(cached), str(tmp_path / "one"), steps=6, save_every=2,
                        mesh="fsdp")
    assert one["devices"] == 8 and one["processes"] == 1

    processes = _two_processes(command, killed=True)
    deadline = time.time() + HANG_GUARD
    while time.time() < deadline and all(p.poll() is None for p in processes) and not _saved(workdir):
        time.sleep(0.01)
    for process in processes:
        process.send_signal(signal.SIGKILL)
    outputs = [process.communicate() for process in processes]
    assert all(p.returncode == -signal.SIGKILL for p in processes), [err[-2000:] for _, err in outputs]
    assert _saved(workdir), "no checkpoint before the kill"

    processes = _two_processes(command)
    outputs = [process.communicate(timeout=HANG_GUARD) for process in processes]
    assert all(p.returncode == 0 for p in processes), [err[-3000:] for _, err in outputs]
    summaries = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert all(s["processes"] == 2 and s["devices"] == 8 and s["steps"] == 6 for s in summaries)
    assert summaries[0]["resumed_from"] in (2, 4)
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, 7))
    ours, theirs = np.array([line["loss"] for line in lines]), np.array(_losses(tmp_path / "one"))
    assert np.abs(ours - theirs).max() <= TWO_HOST_TOLERANCE * theirs.max(), (ours, theirs)

    before = (workdir / "metrics.jsonl").read_bytes(), sorted(os.listdir(workdir / checkpoint.WORKDIR_CHECKPOINTS))
    assert main(["train", "--config", str(config), "--data", str(cached), "--workdir", str(workdir), "--steps", "15",
                 "--mesh", "fsdp"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "written by 2 processes" in err[0]
    assert ((workdir / "metrics.jsonl").read_bytes(), sorted(os.listdir(workdir / checkpoint.WORKDIR_CHECKPOINTS))
            ) == before
