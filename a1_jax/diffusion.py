"""CogVideoX noise schedules and the diffusion math shared by sampling and training (spec §6.1, §7).

The tables follow diffusers' `CogVideoXDDIMScheduler` / `CogVideoXDPMScheduler`: betas (scaled-linear in float64,
linear and squared-cosine in float32, as diffusers builds them), ᾱ = cumprod(1 − β), the SD3-style SNR shift
ᾱ ← ᾱ / (s + (1 − s)·ᾱ), then optionally the zero-terminal-SNR rescale of √ᾱ. The float64 tables (every CogVideoX
release) match diffusers' to ~1e-16; the float32 ones to a few fp32 ulps (torch's vectorised float32 linspace and
sqrt round some entries differently). `make_schedule` turns a config and a step count into per-step coefficient
arrays, computed on the host in the table's own precision as diffusers computes its 0-d tensors, then cast to fp32;
`step` is then two or three fp32 multiply-adds, pure and traceable (`index` may be a traced scalar), so one compiled
program serves every step of a sampling loop.

* DDIM (η = 0): `x̂₀` from the model output, `x_prev = a·x_t + b·x̂₀`.
* DPM: diffusers' DPM-Solver++(2M) with noise injection: first order on the first step (and when the previous
  timestep falls below 0), second order with the previous step's `x̂₀` otherwise; the injected noise is an argument.

Training (`noise_table(config)`, then `add_noise`, `velocity`, `x0_from_prediction`, `loss_weight` at traced integer
timesteps) uses the same table, the same √ᾱ / √(1 − ᾱ) rounded the same way, and the same `x̂₀` formula as `step`.
diffusers' `add_noise` / `get_velocity` instead take the roots in fp32 of the fp32-rounded table, which loses
precision in 1 − ᾱ at small t; ours agree with them to a few fp32 ulps.

Deliberate deviations: a step count for which diffusers' trailing spacing yields one timestep too many (61, 103, ...:
a float artefact ending at timestep −1) and epsilon prediction at a timestep with ᾱ = 0 (x̂₀ would be inf/NaN) are
`UserError`s instead of silently wrong samples. Arithmetic is fp32 whatever the input dtypes; diffusers multiplies
bf16 latents by the coefficients in bf16.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from a1_jax.config import from_mapping, read_json, require

KINDS = {"CogVideoXDDIMScheduler": "ddim", "CogVideoXDPMScheduler": "dpm"}
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SPACINGS = ("linspace", "leading", "trailing")


# ----------------------------------------------------------------------------------------------------------- config

@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """A diffusers CogVideoX scheduler config (`scheduler_config.json`); absent keys take diffusers' defaults.

    `clip_sample`, `clip_sample_range` and `sample_max_value` are accepted and, as in diffusers' CogVideoX schedulers
    (whose `step` never reads them), have no effect.
    """

    kind: str = "ddim"  # from `_class_name`: "ddim" (CogVideoXDDIMScheduler) or "dpm" (CogVideoXDPMScheduler)
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    trained_betas: Any = None  # not supported: must be null
    clip_sample: bool = True
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: str = "epsilon"
    clip_sample_range: float = 1.0
    sample_max_value: float = 1.0
    timestep_spacing: str = "leading"
    rescale_betas_zero_snr: bool = False
    snr_shift_scale: float = 3.0

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "SchedulerConfig":
        """Reads a `scheduler_config.json`, or the one inside folder `path`."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "scheduler_config.json")
        return cls.from_dict(read_json(path), path)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "scheduler config") -> "SchedulerConfig":
        """From diffusers' keys: keys starting with `_` are bookkeeping; any other unknown key is an error."""
        known = {field.name for field in dataclasses.fields(cls)} - {"kind"}
        unknown = sorted(key for key in data if not key.startswith("_") and key not in known)
        require(not unknown, source, f"unsupported scheduler key(s) {', '.join(unknown)} "
                                     f"(a CogVideoX scheduler takes {', '.join(sorted(known))})")
        name = data.get("_class_name")
        require(name in KINDS, source, f"_class_name {name!r} is not supported (only {', '.join(KINDS)})")
        return from_mapping(cls, {**data, "kind": KINDS[name]}, source)

    def validate(self, source: str) -> None:
        def number(key: str) -> None:
            value = getattr(self, key)
            require(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value), source,
                    f"{key} must be a finite number, got {value!r}")

        for key in ("clip_sample", "set_alpha_to_one", "rescale_betas_zero_snr"):
            require(isinstance(getattr(self, key), bool), source, f"{key} must be true or false")
        for key in ("num_train_timesteps", "steps_offset"):
            require(isinstance(getattr(self, key), int) and not isinstance(getattr(self, key), bool), source,
                    f"{key} must be an integer")
        for key in ("beta_start", "beta_end", "clip_sample_range", "sample_max_value", "snr_shift_scale"):
            number(key)
        require(self.kind in KINDS.values(), source, f"kind {self.kind!r} is not one of {tuple(KINDS.values())}")
        require(self.num_train_timesteps >= 2, source,
                f"num_train_timesteps must be at least 2, got {self.num_train_timesteps}")
        require(self.steps_offset >= 0, source, f"steps_offset must be >= 0, got {self.steps_offset}")
        require(self.trained_betas is None, source, "trained_betas is not supported (must be null)")
        require(self.beta_schedule in BETA_SCHEDULES, source,
                f"unsupported beta_schedule {self.beta_schedule!r} (supported: {', '.join(BETA_SCHEDULES)})")
        require(0 <= self.beta_start < 1 and 0 <= self.beta_end < 1, source,
                f"beta_start and beta_end must lie in [0, 1), got {self.beta_start}, {self.beta_end}")
        require(self.prediction_type in PREDICTION_TYPES, source,
                f"unsupported prediction_type {self.prediction_type!r} (supported: {', '.join(PREDICTION_TYPES)})")
        require(self.timestep_spacing in SPACINGS, source,
                f"unsupported timestep_spacing {self.timestep_spacing!r} (supported: {', '.join(SPACINGS)})")
        require(self.snr_shift_scale > 0, source, f"snr_shift_scale must be > 0, got {self.snr_shift_scale}")

    def diffusers_kwargs(self) -> dict[str, Any]:
        """The config as diffusers' scheduler constructor arguments (everything but `kind`)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "kind"}


# ----------------------------------------------------------------------------------------------------------- tables

def _cosine_betas(count: int, max_beta: float = 0.999) -> list[float]:
    """The squared-cosine ("Glide") schedule, in Python floats like diffusers' `betas_for_alpha_bar`."""
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return [min(1 - alpha_bar((i + 1) / count) / alpha_bar(i / count), max_beta) for i in range(count)]


def _table(config: SchedulerConfig) -> np.ndarray:
    """ᾱ in diffusers' own dtype: float64 for scaled_linear, float32 for the others (every later coefficient is
    computed in that dtype, as diffusers' 0-d tensor arithmetic is)."""
    count = config.num_train_timesteps
    if config.beta_schedule == "scaled_linear":
        betas = np.linspace(config.beta_start ** 0.5, config.beta_end ** 0.5, count, dtype=np.float64) ** 2
    elif config.beta_schedule == "linear":
        betas = np.linspace(config.beta_start, config.beta_end, count).astype(np.float32)
    else:
        betas = np.asarray(_cosine_betas(count), np.float32)
    dtype = betas.dtype.type
    # torch accumulates a float32 cumprod in float64 and rounds each entry.
    table = np.cumprod((dtype(1) - betas).astype(np.float64)).astype(dtype)
    shift = config.snr_shift_scale
    table = table / (shift + (1 - shift) * table)
    if config.rescale_betas_zero_snr:
        root = np.sqrt(table)
        first, last = root[0], root[-1]
        root = (root - last) * (first / (first - last))
        table = root ** 2
    return table.astype(dtype)


def alphas_cumprod(config: SchedulerConfig) -> np.ndarray:
    """ᾱ_t for t = 0 … num_train_timesteps − 1, float64 (exactly diffusers' table, which may be float32)."""
    return _table(config).astype(np.float64)


def inference_timesteps(config: SchedulerConfig, num_steps: int) -> np.ndarray:
    """diffusers' `set_timesteps(num_steps)`: the int64 timesteps, largest first."""
    count = config.num_train_timesteps
    require(isinstance(num_steps, (int, np.integer)) and 1 <= num_steps <= count, "num_steps",
            f"the number of steps must be between 1 and num_train_timesteps={count}, got {num_steps}")
    if config.timestep_spacing == "linspace":
        timesteps = np.linspace(0, count - 1, num_steps).round()[::-1].astype(np.int64)
    elif config.timestep_spacing == "leading":
        timesteps = (np.arange(num_steps) * (count // num_steps)).round()[::-1].astype(np.int64) + config.steps_offset
    else:
        timesteps = np.round(np.arange(count, 0, -count / num_steps)).astype(np.int64) - 1
    require(len(timesteps) == num_steps, "num_steps",
            f"timestep_spacing 'trailing' with {num_steps} steps gives {len(timesteps)} timesteps in diffusers "
            f"(a float rounding artefact ending at {timesteps[-1]}): choose another step count")
    require(timesteps.max() < count, "steps_offset",
            f"steps_offset {config.steps_offset} puts timestep {timesteps.max()} past num_train_timesteps={count}")
    return np.ascontiguousarray(timesteps)


# --------------------------------------------------------------------------------------------------------- sampling

@flax.struct.dataclass
class Schedule:
    """Per-step fp32 coefficients of one sampling run (index i = the i-th step, largest timestep first).

    Every step computes `x̂₀` from the model output with (`sqrt_alpha`, `sqrt_one_minus_alpha`) at t_i, then
    `x_prev = sample_coef·x_t − x0_coef·d (+ noise_coef·noise for DPM)`, where `d = x̂₀`, or for a DPM second-order
    step `d = x0_weight·x̂₀ − previous_x0_weight·x̂₀_previous`. DDIM's `x_prev = a·x_t + b·x̂₀` is stored as
    `x0_coef = −b` (bit-identical in IEEE arithmetic), so both solvers share one update.
    """

    timesteps: jax.Array  # [N] float32: what the DiT is fed
    sqrt_alpha: jax.Array  # [N] √ᾱ_t
    sqrt_one_minus_alpha: jax.Array  # [N] √(1 − ᾱ_t)
    sample_coef: jax.Array  # [N] DDIM a; DPM mult1
    x0_coef: jax.Array  # [N] DDIM −b; DPM mult2
    noise_coef: jax.Array  # [N] DPM's injected-noise scale (0 for DDIM)
    x0_weight: jax.Array  # [N] DPM second order: 1 + 1/(2r) (0 where unused)
    previous_x0_weight: jax.Array  # [N] DPM second order: 1/(2r) (0 where unused)
    second_order: jax.Array  # [N] bool: DPM takes the second-order step here (given a previous x̂₀)
    kind: str = flax.struct.field(pytree_node=False, default="ddim")
    prediction_type: str = flax.struct.field(pytree_node=False, default="v_prediction")


@flax.struct.dataclass
class State:
    """The scheduler's carry across steps: the last step's x̂₀ (DPM's second-order term), fp32 like the sample."""

    x0: jax.Array
    has_x0: jax.Array  # bool scalar: False before the first step


def _roots(alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(√ᾱ, √(1 − ᾱ)) in ᾱ's dtype, as diffusers' step takes them: the x̂₀ coefficients of sampling and training."""
    return alpha ** 0.5, (1 - alpha) ** 0.5


def _log_snr(alpha: np.ndarray) -> np.ndarray:
    """λ = log √(ᾱ / (1 − ᾱ)), in ᾱ's dtype; ±inf at ᾱ = 0 or 1."""
    return np.log((alpha / (1 - alpha)) ** 0.5)


def make_schedule(config: SchedulerConfig, num_steps: int) -> Schedule:
    """Everything the jitted loop needs for `num_steps` steps, built on the host in the table's precision."""
    table = _table(config)
    dtype = table.dtype.type
    timesteps = inference_timesteps(config, num_steps)
    alpha = table[timesteps]
    # diffusers' next ᾱ: at t − T//N (not the next listed timestep), or the final ᾱ once that falls below 0.
    previous_t = timesteps - config.num_train_timesteps // num_steps
    final = dtype(1.0) if config.set_alpha_to_one else table[0]
    alpha_prev = np.where(previous_t >= 0, table[np.maximum(previous_t, 0)], final).astype(dtype)
    require(config.prediction_type != "epsilon" or bool(np.all(alpha > 0)), "prediction_type",
            "epsilon prediction cannot denoise a timestep whose ᾱ is 0 (rescale_betas_zero_snr with a step at the "
            "last training timestep): x̂₀ would be inf/NaN; use v_prediction or another timestep_spacing")
    # The second-order step looks back at the previously listed timestep (the pipeline's `timesteps[i - 1]`).
    second_order = np.zeros(num_steps, bool)
    second_order[1:] = previous_t[1:] >= 0
    alpha_back = np.concatenate([alpha[:1], alpha[:-1]]).astype(dtype)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if config.kind == "ddim":
            sample_coef = ((1 - alpha_prev) / (1 - alpha)) ** 0.5
            x0_coef = -(alpha_prev ** 0.5 - alpha ** 0.5 * sample_coef)
            noise_coef = np.zeros_like(alpha)
            x0_weight = previous_x0_weight = np.zeros_like(alpha)
            second_order[:] = False
        else:
            lam, lam_next = _log_snr(alpha), _log_snr(alpha_prev)
            h = lam_next - lam
            r = (lam - _log_snr(alpha_back)) / h
            sample_coef = ((1 - alpha_prev) / (1 - alpha)) ** 0.5 * np.exp(-h)
            x0_coef = np.expm1(-2 * h) * alpha_prev ** 0.5
            noise_coef = (1 - alpha_prev) ** 0.5 * (1 - np.exp(-2 * h)) ** 0.5
            x0_weight = np.where(second_order, 1 + 1 / (2 * r), 0)
            previous_x0_weight = np.where(second_order, 1 / (2 * r), 0)

    def fp32(values: np.ndarray) -> jax.Array:
        values = np.asarray(values, dtype).astype(np.float32)
        assert np.all(np.isfinite(values)), f"non-finite scheduler coefficients {values}"  # an internal fault
        return jnp.asarray(values)

    sqrt_alpha, sqrt_one_minus_alpha = _roots(alpha)
    return Schedule(timesteps=fp32(timesteps), sqrt_alpha=fp32(sqrt_alpha),
                    sqrt_one_minus_alpha=fp32(sqrt_one_minus_alpha), sample_coef=fp32(sample_coef),
                    x0_coef=fp32(x0_coef), noise_coef=fp32(noise_coef), x0_weight=fp32(x0_weight),
                    previous_x0_weight=fp32(previous_x0_weight), second_order=jnp.asarray(second_order),
                    kind=config.kind, prediction_type=config.prediction_type)


def uses_noise(config_or_schedule: SchedulerConfig | Schedule) -> bool:
    """Whether `step` consumes a standard-normal `noise` (DPM's injection); DDIM is deterministic."""
    return config_or_schedule.kind == "dpm"


def init_state(sample: jax.Array) -> State:
    """The carry before the first step (no previous x̂₀); its shapes and dtypes never change across steps."""
    return State(x0=jnp.zeros(sample.shape, jnp.float32), has_x0=jnp.zeros((), bool))


def _predicted_x0(prediction_type: str, sqrt_alpha: jax.Array, sqrt_one_minus_alpha: jax.Array, sample: jax.Array,
                  output: jax.Array) -> jax.Array:
    """x̂₀ from the model output, in diffusers' operation order (the sampler and training share it)."""
    if prediction_type == "v_prediction":
        return sqrt_alpha * sample - sqrt_one_minus_alpha * output
    if prediction_type == "epsilon":
        return (sample - sqrt_one_minus_alpha * output) / sqrt_alpha
    return output


def step(schedule: Schedule, index: Any, model_output: jax.Array, sample: jax.Array, state: State,
         noise: jax.Array | None = None) -> tuple[jax.Array, State]:
    """One scheduler step at step `index` (an int or a traced int32 scalar): `(x_prev, new state)`, fp32.

    `noise` is standard normal like `sample`; DPM needs it, DDIM ignores it.
    """
    sample = sample.astype(jnp.float32)
    x0 = _predicted_x0(schedule.prediction_type, schedule.sqrt_alpha[index], schedule.sqrt_one_minus_alpha[index],
                       sample, model_output.astype(jnp.float32))
    direction = x0
    if schedule.kind == "dpm":
        if noise is None:
            raise ValueError("the DPM scheduler injects noise: pass `noise` (standard normal, shaped like `sample`)")
        second = schedule.second_order[index] & state.has_x0
        direction = jnp.where(second, schedule.x0_weight[index] * x0 - schedule.previous_x0_weight[index] * state.x0,
                              x0)
    prev = schedule.sample_coef[index] * sample - schedule.x0_coef[index] * direction
    if schedule.kind == "dpm":
        prev = prev + schedule.noise_coef[index] * noise.astype(jnp.float32)
    return prev, State(x0=x0, has_x0=jnp.ones((), bool))


# --------------------------------------------------------------------------------------------------------- training

@flax.struct.dataclass
class NoiseTable:
    """What training needs per training timestep t (fp32 [num_train_timesteps]), computed exactly as the sampler's
    coefficients (so a training x̂₀ at t equals the sampler's x̂₀ at t bit for bit)."""

    sqrt_alpha: jax.Array  # √ᾱ_t
    sqrt_one_minus_alpha: jax.Array  # √(1 − ᾱ_t)
    loss_weight: jax.Array  # 1 / (1 − ᾱ_t)
    prediction_type: str = flax.struct.field(pytree_node=False, default="v_prediction")


def noise_table(config: SchedulerConfig) -> NoiseTable:
    """The training table of `config` (pass it to the functions below, inside or outside jit)."""
    table = _table(config)
    require(config.prediction_type != "epsilon" or table[-1] > 0, "prediction_type",
            "epsilon prediction cannot be trained with rescale_betas_zero_snr: at the last timestep ᾱ = 0 and x̂₀ "
            "would be inf/NaN; use v_prediction")
    sqrt_alpha, sqrt_one_minus_alpha = _roots(table)
    return NoiseTable(sqrt_alpha=jnp.asarray(sqrt_alpha.astype(np.float32)),
                      sqrt_one_minus_alpha=jnp.asarray(sqrt_one_minus_alpha.astype(np.float32)),
                      loss_weight=jnp.asarray((1 / (1 - table)).astype(np.float32)),
                      prediction_type=config.prediction_type)


def _at(table: NoiseTable, t: jax.Array, like: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(√ᾱ_t, √(1 − ᾱ_t)) for `t` [B], shaped [B, 1, ...] to broadcast over `like` [B, ...]."""
    def pick(values: jax.Array) -> jax.Array:
        values = values[t]
        return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))

    return pick(table.sqrt_alpha), pick(table.sqrt_one_minus_alpha)


def add_noise(table: NoiseTable, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = √ᾱ_t·x₀ + √(1 − ᾱ_t)·ε, fp32; `t` [B] integer training timesteps."""
    a, b = _at(table, t, x0)
    return a * x0.astype(jnp.float32) + b * noise.astype(jnp.float32)


def velocity(table: NoiseTable, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """The v-prediction target v = √ᾱ_t·ε − √(1 − ᾱ_t)·x₀, fp32."""
    a, b = _at(table, t, x0)
    return a * noise.astype(jnp.float32) - b * x0.astype(jnp.float32)


def x0_from_prediction(table: NoiseTable, prediction: jax.Array, sample: jax.Array, t: jax.Array) -> jax.Array:
    """x̂₀ from the model's `prediction` (of the config's prediction type) at the noisy `sample` x_t, fp32: the
    formula `step` uses."""
    a, b = _at(table, t, sample)
    return _predicted_x0(table.prediction_type, a, b, sample.astype(jnp.float32), prediction.astype(jnp.float32))


def loss_weight(table: NoiseTable, t: jax.Array) -> jax.Array:
    """CogVideoX's per-sample weight 1 / (1 − ᾱ_t) of the squared x̂₀ error (spec §7), fp32 [B]."""
    return table.loss_weight[t]
