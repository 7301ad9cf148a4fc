"""The training run config: one YAML file (`configs/train/*.yaml`), read into frozen dataclasses.

    model:      what to start from (configs, weights, an optional CogVideoX-I2V-style transformer) and its seed
    stage:      which DiT parameters train (regexes on '/'-joined parameter paths; the rest are frozen)
    data:       the training window and batch, conditioning dropout, the reference frame's pixel noise
    optimizer:  AdamW with linear warmup then cosine decay, global-norm clipping, gradient accumulation
    compute:    compute dtype (master weights stay fp32), remat policy, attention kernel
    ema_decay, seed, steps, save_every, keep

Every key is checked: an unknown key or a bad value is a `UserError` naming it. Paths in the file are relative to
the file's folder (or absolute); `model.config` may also name a folder under `configs/` (`tiny`, `5b`). The mesh is
a command-line choice (`a1-jax train --mesh`): a run can resume on another mesh.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

from a1_jax.config import from_mapping, require
from a1_jax.errors import UserError

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ModelSection:
    config: str = "tiny"  # release-layout configs: a folder, or a name under configs/
    weights: str | None = None  # release folder, converted checkpoint or training workdir; None: seeded random init
    init_transformer: str | None = None  # CogVideoX-I2V-style transformer folder whose weights replace the DiT's
    seed: int = 0  # random init of whatever `weights` does not give

    def validate(self, source: str) -> None:
        require(isinstance(self.config, str) and self.config, source, "model.config must name a config folder")
        require(isinstance(self.seed, int), source, f"model.seed must be an integer, got {self.seed!r}")


@dataclasses.dataclass(frozen=True)
class StageSection:
    name: str = "all"
    trainable: tuple[str, ...] = (".*",)  # regexes, matched in full against DiT parameter paths
    frozen: tuple[str, ...] = ()  # exceptions to `trainable`

    def validate(self, source: str) -> None:
        for pattern in self.trainable + self.frozen:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as e:
                raise UserError(f"{source}: stage pattern {pattern!r} is not a regular expression ({e})") from None
        require(bool(self.trainable), source, "stage.trainable must list at least one pattern")


@dataclasses.dataclass(frozen=True)
class DataSection:
    batch_size: int = 1  # global examples per optimizer step (all hosts, all microbatches)
    frames: int = 49  # pixel frames of the training window (frame 0 = the reference frame)
    height: int = 480
    width: int = 720
    face_dropout: float = 0.1  # probability of all-zero face tokens (what CFG's unconditional half sees)
    # Pixel noise on the reference frame before the VAE, σ = exp(N(mean, std)) (CogVideoX I2V recipe). Not the
    # sampler's `image_noise`, the standard normal that draws the image latent from its posterior.
    pixel_noise_mean: float = -3.0
    pixel_noise_std: float = 0.5
    read_threads: int = 4

    def validate(self, source: str) -> None:
        for key in ("batch_size", "frames", "height", "width", "read_threads"):
            value = getattr(self, key)
            require(isinstance(value, int) and value > 0, source, f"data.{key} must be a positive integer")
        require((self.frames - 1) % 4 == 0, source,
                f"data.frames must be 1 + 4k (the VAE compresses time 4x), got {self.frames}")
        require(0.0 <= self.face_dropout <= 1.0, source, "data.face_dropout must be a probability in [0, 1]")
        require(self.pixel_noise_std >= 0, source, "data.pixel_noise_std must be >= 0")


@dataclasses.dataclass(frozen=True)
class OptimizerSection:
    learning_rate: float = 1e-5  # peak, after warmup
    warmup_steps: int = 100
    decay_steps: int = 10000  # total length of the schedule (warmup included), then it stays at the end value
    end_learning_rate: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 1e-4  # on matrices and conv kernels only (not norms, biases, position tables)
    clip_norm: float = 1.0  # global norm of the trainable gradients; 0 = no clipping
    grad_accum: int = 1  # microbatches per step (each batch_size / grad_accum examples)

    def validate(self, source: str) -> None:
        for key in ("learning_rate", "end_learning_rate", "b1", "b2", "eps", "weight_decay", "clip_norm"):
            value = getattr(self, key)
            require(isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0, source,
                    f"optimizer.{key} must be a number >= 0, got {value!r}")
        for key in ("warmup_steps", "decay_steps", "grad_accum"):
            value = getattr(self, key)
            require(isinstance(value, int) and value >= (key == "grad_accum"), source,
                    f"optimizer.{key} must be an integer >= {int(key == 'grad_accum')}, got {value!r}")
        require(self.decay_steps > self.warmup_steps, source, "optimizer.decay_steps must exceed warmup_steps")


@dataclasses.dataclass(frozen=True)
class ComputeSection:
    dtype: str = "bfloat16"  # compute dtype of the DiT and the encoders; the trained weights stay fp32
    remat: str = "full"  # a key of models.layers.REMAT_POLICIES
    attention_kernel: str = "auto"

    def validate(self, source: str) -> None:
        from a1_jax.models.layers import ATTENTION_KERNELS, REMAT_POLICIES

        require(self.dtype in DTYPES, source, f"compute.dtype must be one of {DTYPES}, got {self.dtype!r}")
        require(self.remat in REMAT_POLICIES, source,
                f"compute.remat must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}")
        require(self.attention_kernel in ATTENTION_KERNELS, source,
                f"compute.attention_kernel must be one of {ATTENTION_KERNELS}, got {self.attention_kernel!r}")


SECTIONS = {"model": ModelSection, "stage": StageSection, "data": DataSection, "optimizer": OptimizerSection,
            "compute": ComputeSection}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelSection = ModelSection()
    stage: StageSection = StageSection()
    data: DataSection = DataSection()
    optimizer: OptimizerSection = OptimizerSection()
    compute: ComputeSection = ComputeSection()
    ema_decay: float | None = None  # keep an exponential moving average of the DiT's params (the sampler uses it)
    seed: int = 0  # data order, timesteps, noise
    steps: int = 1000  # stop after this many optimizer steps (`--steps` overrides)
    save_every: int = 500  # checkpoint every N steps and at the end (`--save-every` overrides)
    keep: int = 3  # checkpoints kept

    def validate(self, source: str) -> None:
        require(self.ema_decay is None or 0.0 < self.ema_decay < 1.0, source, "ema_decay must be null or in (0, 1)")
        for key in ("steps", "save_every", "keep"):
            value = getattr(self, key)
            require(isinstance(value, int) and value > 0, source, f"{key} must be a positive integer, got {value!r}")
        require(isinstance(self.seed, int) and 0 <= self.seed < 2 ** 32, source, "seed must be an integer in [0, 2^32)")
        require(self.data.batch_size % self.optimizer.grad_accum == 0, source,
                f"data.batch_size {self.data.batch_size} must be a multiple of optimizer.grad_accum "
                f"{self.optimizer.grad_accum}")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _resolve(path: str | None, base: str) -> str | None:
    if path is None:
        return None
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base, path))


def from_dict(data: dict[str, Any], source: str = "train config", base: str = ".") -> TrainConfig:
    """A TrainConfig from the YAML mapping; relative paths are taken from `base`."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: the training config must be a mapping of sections")
    top = {field.name for field in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - top)
    require(not unknown, source, f"unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(top))})")
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key in SECTIONS:
            section = SECTIONS[key]
            value = {} if value is None else value
            require(isinstance(value, dict), source, f"{key} must be a mapping")
            known = {field.name for field in dataclasses.fields(section)}
            bad = sorted(set(value) - known)
            require(not bad, source, f"unknown key(s) {', '.join(f'{key}.{b}' for b in bad)} "
                                     f"(known: {', '.join(sorted(known))})")
            if key == "model":
                value = dict(value)
                value["weights"] = _resolve(value.get("weights"), base)
                value["init_transformer"] = _resolve(value.get("init_transformer"), base)
                config = value.get("config", ModelSection.config)
                if isinstance(config, str) and os.sep in config:
                    value["config"] = _resolve(config, base)
            values[key] = from_mapping(section, value, source)
        else:
            values[key] = value
    return from_mapping(TrainConfig, values, source)


def load(path: str | os.PathLike) -> TrainConfig:
    """Reads a training YAML file; a missing or malformed file is a `UserError`."""
    import yaml

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"training config not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML ({e})".replace("\n", " ")) from None
    return from_dict(data or {}, path, os.path.dirname(os.path.abspath(path)))
