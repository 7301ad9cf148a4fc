"""The CogVideoX schedulers and diffusion math against diffusers' `CogVideoXDDIMScheduler` / `CogVideoXDPMScheduler`.

Trajectories: both sides start from the same random sample and step with the same stand-in model (a fixed random
linear function of the current sample plus a per-step offset); diffusers' DPM noise comes from its own seeded
generator and ours is fed the draws diffusers used. Ours runs as one `jax.jit` of a `lax.scan`. Tolerances: a step
run op by op from diffusers' own inputs equals diffusers' bit for bit on the release config and most variants (4 fp32
ulps otherwise, see `test_each_step_from_the_reference_inputs`); a compiled trajectory of N steps is held to N fp32
ulps of its largest value (`parity.scheduler.tolerance`: XLA fuses multiply-adds, torch does not).
"""

import dataclasses
import json
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler
from diffusers.schedulers import scheduling_dpm_cogvideox as dpm_module

from a1_jax import cli, diffusion
from a1_jax.diffusion import SchedulerConfig
from a1_jax.errors import UserError
from a1_jax.parity import errors
from a1_jax.parity import scheduler as sp

ULP = sp.ULP
# The release's scheduler (spec §6.1), written as diffusers writes scheduler_config.json.
RELEASE = {"_class_name": "CogVideoXDDIMScheduler", "_diffusers_version": "0.32.2", "num_train_timesteps": 1000,
           "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "trained_betas": None,
           "clip_sample": False, "clip_sample_range": 1.0, "sample_max_value": 1.0, "set_alpha_to_one": True,
           "steps_offset": 0, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
           "snr_shift_scale": 1.0, "timestep_spacing": "trailing"}
RELEASE_CONFIG = SchedulerConfig.from_dict(RELEASE)
# One change each from the release config (epsilon needs ᾱ > 0 at the first step, so it goes without zero-SNR).
VARIANTS = {
    "leading": dict(timestep_spacing="leading"),
    "linspace": dict(timestep_spacing="linspace"),
    "epsilon": dict(prediction_type="epsilon", rescale_betas_zero_snr=False),
    "sample": dict(prediction_type="sample"),
    "snr_shift_3": dict(snr_shift_scale=3.0),
    "no_zero_snr": dict(rescale_betas_zero_snr=False),
    "alpha_not_one": dict(set_alpha_to_one=False),
    "leading_offset_1": dict(timestep_spacing="leading", steps_offset=1),
    "linear_betas": dict(beta_schedule="linear"),
}
FP32_TABLES = ("linear_betas",)  # diffusers builds these tables in float32 (scaled_linear: float64)


def _config(kind: str = "ddim", **changes) -> SchedulerConfig:
    return dataclasses.replace(RELEASE_CONFIG, kind=kind, **changes)


def _diffusers(config: SchedulerConfig):
    cls = CogVideoXDPMScheduler if config.kind == "dpm" else CogVideoXDDIMScheduler
    return cls(**config.diffusers_kwargs())


def _trajectory_error(config: SchedulerConfig, steps: int, seed: int = 0) -> float:
    ours, expected = sp.compare(config, steps, seed)
    assert np.all(np.isfinite(expected))
    return errors({"x": (ours, expected)})["x"]["max_rel_err"]


# ------------------------------------------------------------------------------------------------------- tables

TABLES = {"release": {}, "snr_shift_3": VARIANTS["snr_shift_3"], "no_zero_snr": VARIANTS["no_zero_snr"],
          "linear_betas": VARIANTS["linear_betas"], "cosine_betas": dict(beta_schedule="squaredcos_cap_v2")}


@pytest.mark.parametrize("variant", sorted(TABLES))
def test_alphas_cumprod_is_diffusers_table(variant):
    config = _config(**TABLES[variant])
    expected = _diffusers(config).alphas_cumprod.double().numpy()
    ours = diffusion.alphas_cumprod(config)
    assert ours.dtype == np.float64 and ours.shape == (1000,)
    # float64 tables to 1e-12. float32 tables to 4 fp32 ulps of the largest entry: torch's vectorised float32
    # linspace and sqrt round a few betas / roots by one ulp, and the zero-SNR shift then cancels (measured: 2.0).
    tol = 4 * ULP if variant in ("linear_betas", "cosine_betas") else 1e-12
    assert np.max(np.abs(ours - expected)) / np.max(expected) <= tol
    assert (ours[-1] == 0) == config.rescale_betas_zero_snr


def test_inference_timesteps_equal_diffusers_for_every_step_count():
    spec = {10: np.arange(999, 0, -100), 20: np.arange(999, 0, -50)}  # spec §6.1
    for steps, expected in spec.items():
        np.testing.assert_array_equal(diffusion.inference_timesteps(RELEASE_CONFIG, steps), expected)
    artefacts = 0
    for spacing, offset in (("trailing", 0), ("leading", 0), ("leading", 1), ("linspace", 0)):
        config = _config(timestep_spacing=spacing, steps_offset=offset)
        reference = _diffusers(config)
        for steps in range(1, 1001):
            reference.set_timesteps(steps)
            expected = reference.timesteps.numpy()
            if expected.max() >= 1000:  # leading + steps_offset 1 at 1000 steps: diffusers would index past ᾱ
                with pytest.raises(UserError, match="steps_offset"):
                    diffusion.inference_timesteps(config, steps)
                continue
            if len(expected) != steps:  # diffusers' trailing float artefact (61, 103, ... steps): we refuse
                artefacts += 1
                with pytest.raises(UserError, match=f"with {steps} steps gives {steps + 1} timesteps"):
                    diffusion.inference_timesteps(config, steps)
                continue
            ours = diffusion.inference_timesteps(config, steps)
            assert ours.dtype == np.int64
            np.testing.assert_array_equal(ours, expected, err_msg=f"{spacing} offset {offset}, {steps} steps")
    assert 0 < artefacts < 100


def test_schedule_feeds_the_dit_the_timesteps():
    schedule = diffusion.make_schedule(RELEASE_CONFIG, 10)
    assert schedule.timesteps.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(schedule.timesteps), np.arange(999, 0, -100))
    assert not diffusion.uses_noise(schedule) and diffusion.uses_noise(_config("dpm"))


# ------------------------------------------------------------------------------------------------- trajectories

@pytest.mark.parametrize("kind", ["ddim", "dpm"])
@pytest.mark.parametrize("steps", [10, 20, 50])
def test_release_trajectory_matches_diffusers(kind, steps):
    assert _trajectory_error(_config(kind), steps) <= sp.tolerance(steps)


@pytest.mark.parametrize("kind", ["ddim", "dpm"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_trajectory_matches_diffusers(variant, kind):
    assert _trajectory_error(_config(kind, **VARIANTS[variant]), 10, seed=1) <= sp.tolerance(10)


@pytest.mark.parametrize("kind", ["ddim", "dpm"])
@pytest.mark.parametrize("variant", ["release"] + sorted(VARIANTS))
def test_each_step_from_the_reference_inputs(variant, kind):
    """Every step (op by op, no jit) from diffusers' own sample, x̂₀ and noise: its sample and x̂₀ equal diffusers'
    bit for bit with float64 tables and v/sample prediction. Not with float32 tables (torch's float32 kernels round a
    few coefficients differently) nor epsilon (XLA divides by a broadcast scalar as a multiply by its reciprocal)."""
    config = _config(kind, **VARIANTS.get(variant, {}))
    steps = 10
    inputs = sp.random_inputs(steps, seed=2)
    reference = sp.reference_trajectory(config, steps, inputs, seed=2)
    schedule = diffusion.make_schedule(config, steps)
    sample, worst = inputs.sample, 0.0
    for i in range(steps):
        output = inputs.gain * sample + inputs.offsets[i]  # fp32, rounded as torch rounds it
        state = diffusion.State(x0=jnp.asarray(reference.x0[i - 1] if i else np.zeros_like(sample)),
                                has_x0=jnp.asarray(i > 0))
        noise = None if reference.noise is None else jnp.asarray(reference.noise[i])
        prev, state = diffusion.step(schedule, i, jnp.asarray(output), jnp.asarray(sample), state, noise)
        for ours, expected in ((prev, reference.samples[i]), (state.x0, reference.x0[i])):
            worst = max(worst, float(np.max(np.abs(np.asarray(ours) - expected)) / np.max(np.abs(expected))))
        sample = reference.samples[i]
    exact = variant not in FP32_TABLES and config.prediction_type != "epsilon"
    # Inexact cases: one ulp in a coefficient or in x̂₀'s division, carried by up to three products (DPM's second-order
    # weight 1 + 1/(2r) is up to ~2): 4 ulps of the largest value (measured: ≤ 1.4 epsilon, ≤ 2.1 linear betas).
    assert worst == 0.0 if exact else worst <= 4 * ULP


def test_dpm_fresh_state_takes_a_first_order_step():
    """A DPM loop entered at step i > 0 with no previous x̂₀ steps first order, as diffusers does with
    `old_pred_original_sample=None`; given one, it steps second order (so the flag matters)."""
    config, steps, i = _config("dpm"), 10, 3
    reference = _diffusers(config)
    reference.set_timesteps(steps)
    t = reference.timesteps
    rng = np.random.default_rng(3)
    sample, output, old_x0, noise = (rng.standard_normal((2, 4, 5), np.float32) for _ in range(4))
    with mock.patch.object(dpm_module, "randn_tensor", lambda *args, **kwargs: torch.from_numpy(noise)):
        first, _ = reference.step(torch.from_numpy(output), None, t[i], t[i - 1], torch.from_numpy(sample))
    schedule = diffusion.make_schedule(config, steps)
    ours, _ = diffusion.step(schedule, i, output, sample, diffusion.init_state(sample), noise=noise)
    np.testing.assert_array_equal(np.asarray(ours), first.numpy())
    with_previous = diffusion.State(x0=jnp.asarray(old_x0), has_x0=jnp.asarray(True))
    second, _ = diffusion.step(schedule, i, output, sample, with_previous, noise=noise)
    assert np.max(np.abs(np.asarray(second) - first.numpy())) > 1e-3


def test_step_is_fp32_whatever_the_input_dtypes():
    schedule = diffusion.make_schedule(_config("dpm"), 10)
    sample = jnp.ones((2, 3), jnp.bfloat16)
    prev, state = jax.jit(diffusion.step)(schedule, jnp.int32(4), sample, sample, diffusion.init_state(sample),
                                          jnp.zeros((2, 3), jnp.bfloat16))
    assert prev.dtype == jnp.float32 and state.x0.dtype == jnp.float32 and state.has_x0.dtype == jnp.bool_
    with pytest.raises(ValueError, match="injects noise"):
        diffusion.step(schedule, 0, sample, sample, diffusion.init_state(sample))


# ------------------------------------------------------------------------------------------------------ training

def _training_inputs(seed: int = 4):
    rng = np.random.default_rng(seed)
    x0, noise = (rng.standard_normal((6, 3, 4, 5), np.float32) for _ in range(2))
    t = np.array([0, 1, 250, 500, 998, 999], np.int64)
    return x0, noise, t


@pytest.mark.parametrize("variant", ["release", "snr_shift_3", "no_zero_snr"])
def test_training_math_matches_diffusers(variant):
    """add_noise / velocity / x̂₀ (the recipe's get_velocity(v, x_t, t)) / loss weight, at traced t under jit."""
    config = _config(**VARIANTS.get(variant, {}))
    reference = _diffusers(config)
    table = diffusion.noise_table(config)
    x0, noise, t = _training_inputs()
    tx, tn, tt = torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)
    noisy = jax.jit(diffusion.add_noise)(table, x0, noise, t)
    target = jax.jit(diffusion.velocity)(table, x0, noise, t)
    v = np.random.default_rng(5).standard_normal(x0.shape).astype(np.float32)
    expected_noisy = reference.add_noise(tx, tn, tt).numpy()
    x0_hat = jax.jit(diffusion.x0_from_prediction)(table, v, expected_noisy, t)
    recipe_x0 = reference.get_velocity(torch.from_numpy(v), torch.from_numpy(expected_noisy), tt).numpy()
    expected = {"add_noise": (noisy, expected_noisy), "velocity": (target, reference.get_velocity(tx, tn, tt).numpy()),
                "x0": (x0_hat, recipe_x0)}
    for name, (ours, theirs) in expected.items():
        assert ours.dtype == jnp.float32
        # diffusers takes √ᾱ, √(1 − ᾱ) in fp32 with torch's pow (≤ 1 ulp off each); ours are the float64 roots rounded
        # once. Two terms of ≤ 1 ulp each plus the final rounding: 3 ulps of the largest value (measured ≤ 1).
        assert np.max(np.abs(np.asarray(ours) - theirs)) <= 3 * ULP * np.max(np.abs(theirs)), name
    # The recipe weighs with the float64 table: 1 / (1 − ᾱ_t) rounded once to fp32.
    weight = jax.jit(diffusion.loss_weight)(table, t)
    expected_weight = 1 / (1 - reference.alphas_cumprod.double().numpy()[t])
    np.testing.assert_allclose(np.asarray(weight), expected_weight, rtol=ULP / 2, atol=0)


@pytest.mark.parametrize("kind", ["ddim", "dpm"])
def test_training_x0_is_the_sampler_x0(kind):
    """At the same t, x0_from_prediction and the sampler's step compute the same x̂₀ to the bit, which is diffusers'
    `pred_original_sample` (the pipeline's v -> x0)."""
    config = _config(kind)
    table = diffusion.noise_table(config)
    schedule = diffusion.make_schedule(config, 10)
    x0, noise, _ = _training_inputs()
    for i, t in enumerate(np.asarray(schedule.timesteps).astype(np.int64)):
        ours = diffusion.x0_from_prediction(table, noise, x0, jnp.full((6,), t))
        _, state = diffusion.step(schedule, i, noise, x0, diffusion.init_state(x0), noise=noise)
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(state.x0))
    reference = _diffusers(_config("ddim"))
    reference.set_timesteps(10)
    _, expected = reference.step(torch.from_numpy(noise), reference.timesteps[4], torch.from_numpy(x0),
                                 return_dict=False)
    ours = diffusion.x0_from_prediction(table, noise, x0, jnp.full((6,), int(reference.timesteps[4])))
    np.testing.assert_array_equal(np.asarray(ours), expected.numpy())


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon", "sample"])
def test_x0_from_prediction_recovers_x0(prediction_type):
    config = _config(prediction_type=prediction_type, rescale_betas_zero_snr=prediction_type != "epsilon")
    table = diffusion.noise_table(config)
    x0, noise, t = _training_inputs()
    noisy = diffusion.add_noise(table, x0, noise, t)
    prediction = {"v_prediction": diffusion.velocity(table, x0, noise, t), "epsilon": noise, "sample": x0}
    recovered = diffusion.x0_from_prediction(table, prediction[prediction_type], noisy, t)
    # v: √ᾱ(√ᾱx₀ + √(1−ᾱ)ε) − √(1−ᾱ)(√ᾱε − √(1−ᾱ)x₀) = x₀, a few fp32 roundings of |x₀|, |ε| ≲ 5.
    # ε: dividing by √ᾱ_999 ≈ 0.068 (no zero-SNR) amplifies the rounding of x_t ~15 times.
    tol = {"v_prediction": 2e-6, "epsilon": 2e-5, "sample": 0.0}[prediction_type]
    assert np.max(np.abs(np.asarray(recovered) - x0)) <= tol


def test_epsilon_with_zero_terminal_snr_cannot_be_trained():
    with pytest.raises(UserError, match="prediction_type"):
        diffusion.noise_table(_config(prediction_type="epsilon"))


# ------------------------------------------------------------------------------------------------------- configs

def test_defaults_are_diffusers_defaults():
    for name, cls in (("CogVideoXDDIMScheduler", CogVideoXDDIMScheduler),
                      ("CogVideoXDPMScheduler", CogVideoXDPMScheduler)):
        ours = SchedulerConfig.from_dict({"_class_name": name})
        theirs = {key: value for key, value in cls().config.items() if not key.startswith("_")}
        assert ours.diffusers_kwargs() == theirs
        assert ours.kind == diffusion.KINDS[name]


def test_from_json_reads_a_file_or_its_folder(tmp_path):
    (tmp_path / "scheduler_config.json").write_text(json.dumps(RELEASE | {"_class_name": "CogVideoXDPMScheduler"}))
    by_folder = SchedulerConfig.from_json(tmp_path)
    assert by_folder == SchedulerConfig.from_json(tmp_path / "scheduler_config.json")
    assert by_folder == _config("dpm")
    with pytest.raises(UserError, match="config not found"):
        SchedulerConfig.from_json(tmp_path / "absent")


@pytest.mark.parametrize("edit, words", [
    (dict(thresholding=True), "thresholding"),
    (dict(use_karras_sigmas=False), "use_karras_sigmas"),
    (dict(_class_name="DDIMScheduler"), "_class_name 'DDIMScheduler'"),
    (dict(beta_schedule="sigmoid"), "beta_schedule 'sigmoid'"),
    (dict(prediction_type="flow_prediction"), "prediction_type 'flow_prediction'"),
    (dict(timestep_spacing="karras"), "timestep_spacing 'karras'"),
    (dict(trained_betas=[0.1] * 1000), "trained_betas"),
    (dict(set_alpha_to_one="yes"), "set_alpha_to_one"),
    (dict(snr_shift_scale=0), "snr_shift_scale"),
    (dict(num_train_timesteps=1), "num_train_timesteps"),
    (dict(steps_offset=-1), "steps_offset"),
])
def test_unsupported_config_is_a_user_error_naming_the_key(tmp_path, edit, words):
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps(RELEASE | edit))
    with pytest.raises(UserError, match=words):
        SchedulerConfig.from_json(path)


@pytest.mark.parametrize("steps, changes, words", [
    (0, {}, "num_steps"),
    (1001, {}, "num_steps"),
    (61, {}, "trailing' with 61 steps"),
    (10, dict(prediction_type="epsilon"), "prediction_type"),  # zero-SNR ᾱ = 0 at t = 999
    (1000, dict(timestep_spacing="leading", steps_offset=1), "steps_offset"),
])
def test_bad_step_count_is_a_user_error(steps, changes, words):
    with pytest.raises(UserError, match=words):
        diffusion.make_schedule(_config(**changes), steps)


def test_cli_parity_scheduler_end_to_end(tmp_path, capsys):
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps(RELEASE))
    assert cli.main(["parity", "scheduler", "--config", str(path)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["ok"] and result["component"] == "scheduler"
    assert set(result["outputs"]) == {f"{kind}/{steps}" for kind in ("ddim", "dpm") for steps in (10, 20, 50)}
    assert result["max_rel_err"] <= result["tol"] == sp.tolerance(50)
    for name, row in result["outputs"].items():
        assert row["max_rel_err"] <= row["tol"] == sp.tolerance(int(name.split("/")[1]))
    path.write_text(json.dumps(RELEASE | {"thresholding": True}))
    assert cli.main(["parity", "scheduler", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "thresholding" in err
