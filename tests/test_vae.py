"""CogVideoX VAE: parity with diffusers (frame chunking quirks, tiling, posterior), importer coverage, errors, CLI."""

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
import diffusers  # the parity reference: missing, these tests fail (never skip)
import numpy as np
import pytest
import torch
from flax import traverse_util
from flax.core import meta

from a1_jax import cli
from a1_jax.config import VAEConfig, read_json
from a1_jax.errors import UserError
from a1_jax.models import vae
from a1_jax.models.vae import AutoencoderKLCogVideoX, DiagonalGaussian, abstract_params, chunk_sizes, tile_plan
from a1_jax.parallel import axes
from a1_jax.parity import FP32_TOLERANCE, errors, torch_state
from a1_jax.parity import vae as vae_parity
from a1_jax.weights import plan_import
from a1_jax.weights.vae import DECODER_SKIP, load_vae_params, vae_rules

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
TINY, FIVE_B = CONFIGS / "vae_tiny.json", CONFIGS / "vae_5b.json"


def _rel_errors(outputs):
    return {name: row["max_rel_err"] for name, row in errors(outputs).items()}


@pytest.fixture(scope="module")
def tiny():
    """Tiny reference (random, norms perturbed), our model and params imported from it: shared by the parity tests."""
    args = argparse.Namespace(config=TINY, checkpoint=None, seed=0)
    config, reference, model, params = vae_parity.setup(args)
    return config, reference, model, params


# diffusers' frame counts: encode chunks of 8 (first 8 + T mod 8) give 1, 2, 3, 4, 5 latents; decode chunks of 2
# (first 2 + L mod 2) turn an even first chunk into 4x its frames: 2 latents -> 8 frames, 4 -> 16.
@pytest.mark.parametrize("frames,latents,decoded", [(1, 1, 1), (5, 2, 8), (9, 3, 9), (13, 4, 16), (17, 5, 17)])
def test_tiny_parity_per_frame_count(tiny, frames, latents, decoded):
    config, reference, model, params = tiny
    video = vae_parity.random_video((1, 3, frames, 32, 48), seed=frames)
    outputs = vae_parity.compare(reference, model, params, video, tiling=False, noise_seed=1)
    assert outputs["posterior_mean"][1].shape == (1, config.latent_channels, latents, 4, 6)
    assert outputs["decoded"][1].shape == (1, 3, decoded, 32, 48)
    rel = _rel_errors(outputs)  # also asserts our shapes equal diffusers'
    assert max(rel.values()) <= FP32_TOLERANCE, rel


def test_decoding_a_prefix_gives_the_first_frames_of_the_whole_decode(tiny):
    """`frames=n` decodes only the chunks the first n frames need, on the whole decode's chunk boundaries (the first
    3 latents -> 9 frames, then 2 -> 8 more): the same numbers, bit for bit, in fewer chunk calls."""
    config, _, model, params = tiny
    assert [vae.decoding_prefix(13, n, config) for n in (1, 9, 10, 17, 18, 49, 60)] == [3, 3, 5, 5, 7, 13, 13]
    assert [vae.decoding_prefix(12, n, config) for n in (8, 9, 40, 41)] == [2, 4, 10, 12]  # even: 2 first, 8 frames each
    latents = jnp.asarray(np.random.default_rng(0).standard_normal((1, 13, 4, 6, config.latent_channels)),
                          jnp.float32)
    whole = np.asarray(vae.decode(model, params, latents))
    calls = []
    part = np.asarray(vae.decode(model, params, latents, frames=18, progress=lambda done, total: calls.append(
        (done, total))))
    assert whole.shape[1] == 49 and part.shape[1] == 18 and calls[-1] == (3, 3)  # of 6
    np.testing.assert_array_equal(part, whole[:, :18])


def test_tiny_parity_tiled(tiny):
    """1.5 tiles each way: 2x2 tiles in both directions, each with its own frame chunking, blended and cropped."""
    config, reference, model, params = tiny
    height, width = vae_parity.default_size(config, tiling=True)
    assert height > config.sample_height // 2 and width > config.sample_width // 2  # so tiling really runs
    video = vae_parity.random_video((1, 3, 9, height, width), seed=3)
    tiled = vae_parity.compare(reference, model, params, video, tiling=True, noise_seed=2)
    assert tiled["decoded"][1].shape == video.shape
    rel = _rel_errors(tiled)
    assert max(rel.values()) <= FP32_TOLERANCE, rel
    # Tiling changes the numbers (per-tile GroupNorm statistics), so matching above proves the tiled path ran.
    whole = vae.encode(model, params, vae_parity.to_channels_last(video)).mean
    tiled_mean = vae_parity.to_channels_last(tiled["posterior_mean"][0])
    assert _rel_errors({"mean": (tiled_mean, whole)})["mean"] > 1e-3


def test_auto_tiling_tiles_where_the_memory_budget_needs_it(tiny, monkeypatch):
    """"auto": the demo (tiny) VAE runs untiled at the 480x720 canvas, the 5B VAE tiles there like the release (one
    bf16 or fp32 reference frame, the decoder's chunks); and on one input "auto" gives exactly the untiled numbers
    within the budget and the tiled ones beyond it."""
    demo = AutoencoderKLCogVideoX(VAEConfig.from_json(CONFIGS / "tiny" / "vae" / "config.json"))
    assert vae.encode_tiles(demo, (1, 1, 480, 720, 3), "auto") is None
    assert vae.decode_tiles(demo, (1, 13, 60, 90, 4), "auto") is None
    assert vae.decode_tiles(demo, (1, 13, 60, 90, 4), True) == tile_plan(demo.tile_latent, demo.tile_sample)
    for dtype in (jnp.bfloat16, jnp.float32):
        five_b = AutoencoderKLCogVideoX(VAEConfig.from_json(FIVE_B), dtype=dtype)
        assert vae.encode_tiles(five_b, (1, 1, 480, 720, 3), "auto") == tile_plan(five_b.tile_sample,
                                                                                   five_b.tile_latent)
        assert vae.decode_tiles(five_b, (1, 13, 60, 90, 16), "auto") == tile_plan(five_b.tile_latent,
                                                                                   five_b.tile_sample)
    with pytest.raises(ValueError, match="tiling"):
        vae.decode_tiles(demo, (1, 13, 60, 90, 4), "yes")

    config, _, model, params = tiny  # the geometry and video of test_tiny_parity_tiled: its programs are compiled
    height, width = vae_parity.default_size(config, tiling=True)
    video = vae_parity.to_channels_last(vae_parity.random_video((1, 3, 9, height, width), seed=3))
    means = {tiling: np.asarray(vae.encode(model, params, video, tiling).mean) for tiling in (False, True, "auto")}
    np.testing.assert_array_equal(means["auto"], means[False])
    assert np.abs(means[True] - means[False]).max() > 1e-3 * np.abs(means[False]).max()
    monkeypatch.setattr(vae, "TILING_BUDGET_BYTES", 0)
    np.testing.assert_array_equal(np.asarray(vae.encode(model, params, video, "auto").mean), means[True])


def test_sample_and_mode(tiny):
    config, _, model, params = tiny
    video = jnp.asarray(vae_parity.random_video((1, 1, 32, 48, 3), seed=4))
    posterior = vae.encode(model, params, video)
    assert posterior.mode() is posterior.mean
    a, b = posterior.sample(jax.random.key(0)), posterior.sample(jax.random.key(1))
    np.testing.assert_array_equal(a, posterior.sample(jax.random.key(0)))  # the key alone decides the draw
    assert float(jnp.max(jnp.abs(a - b))) > 0
    noise = jax.random.normal(jax.random.key(0), posterior.mean.shape)
    np.testing.assert_allclose(a, posterior.mean + jnp.exp(0.5 * posterior.logvar) * noise, rtol=1e-6, atol=1e-6)
    clamped = DiagonalGaussian.from_moments(jnp.array([[0.5, -100.0], [1.0, 100.0]]))
    np.testing.assert_array_equal(clamped.logvar, [[-30.0], [20.0]])
    np.testing.assert_array_equal(clamped.mode(), [[0.5], [1.0]])


def test_encoder_only_matches_full_model_and_has_no_decoder(tiny):
    config, reference, model, params = tiny
    state = torch_state(reference)
    encoder_params = load_vae_params(state, config, encoder_only=True)
    assert set(encoder_params) == {"encoder"}
    guider = AutoencoderKLCogVideoX(config, encoder_only=True)
    video = jnp.asarray(vae_parity.random_video((1, 5, 32, 48, 3), seed=5))
    ours = vae.encode(guider, encoder_params, video).mode()
    full = vae.encode(model, params, video).mode()
    np.testing.assert_array_equal(ours, full)
    with pytest.raises(ValueError, match="encoder_only"):
        vae.decode(guider, encoder_params, ours)


def test_bf16_compute_keeps_fp32_params_and_stays_close(tiny):
    config, _, _, params = tiny
    video = jnp.asarray(vae_parity.random_video((1, 1, 32, 48, 3), seed=6))
    fp32 = AutoencoderKLCogVideoX(config)
    bf16 = AutoencoderKLCogVideoX(config, dtype=jnp.bfloat16)
    low = vae.encode(bf16, params, video).mean
    high = vae.encode(fp32, params, video).mean
    assert low.dtype == jnp.bfloat16
    rel = _rel_errors({"mean": (low.astype(jnp.float32), high)})["mean"]
    assert 0 < rel < 5e-2


def test_5b_geometry_parity_at_small_size():
    # The smallest size all three spatial downsamplings keep whole: 2x3 latents.
    args = argparse.Namespace(config=FIVE_B, checkpoint=None, seed=0, frames=9, height=16, width=24, batch=None,
                              tiling=False)
    result = vae_parity.parity(args)
    assert result["latent_shape"] == [1, 16, 3, 2, 3] and result["decoded_shape"] == [1, 3, 9, 16, 24]
    assert result["ok"] and result["max_rel_err"] <= FP32_TOLERANCE, result


def test_demo_configuration_parity():
    """configs/tiny/vae (4-8 channels, the demo's VAE) against diffusers."""
    args = argparse.Namespace(config=CONFIGS / "tiny" / "vae", checkpoint=None, seed=0, frames=9, height=32,
                              width=48, batch=None, tiling=False)
    result = vae_parity.parity(args)
    assert result["ok"] and result["max_rel_err"] <= FP32_TOLERANCE, result


@pytest.fixture(scope="module")
def meta_5b_shapes():
    """Names and shapes of the real 5B VAE state dict, from a model built on torch's meta device (no memory)."""
    with torch.device("meta"):
        model = diffusers.AutoencoderKLCogVideoX.from_config(read_json(FIVE_B))
    return {name: tuple(value.shape) for name, value in model.state_dict().items()}


def test_importer_covers_every_5b_tensor(meta_5b_shapes):
    config = VAEConfig.from_json(FIVE_B)
    plan = plan_import(meta_5b_shapes, vae_rules(), abstract_params(config))  # raises on any gap or shape mismatch
    assert sum(len(names) for names, _, _ in plan.sources.values()) == len(meta_5b_shapes)
    assert plan.skipped == []
    # The shapes plan_import checked are those jax.eval_shape gives our model: spot-check the layouts.
    leaves = traverse_util.flatten_dict(meta.unbox(abstract_params(config)))
    assert leaves[("encoder", "conv_in", "conv", "kernel")].shape == (3, 3, 3, 3, 128)
    assert leaves[("decoder", "up_blocks_0_upsample", "conv", "kernel")].shape == (3, 3, 512, 512)
    sizes = {name: int(np.prod(shape)) for name, shape in meta_5b_shapes.items()}
    assert sum(sizes.values()) == 215_583_907  # spec §5.1
    assert sum(n for name, n in sizes.items() if name.startswith("encoder.")) == 92_215_456  # spec §3.3


def test_pose_guider_imports_encoder_and_skips_decoder_explicitly(meta_5b_shapes):
    config = VAEConfig.from_json(FIVE_B)
    target = abstract_params(config, encoder_only=True)
    plan = plan_import(meta_5b_shapes, vae_rules(), target, skip=DECODER_SKIP)
    assert plan.skipped and all(name.startswith("decoder.") for name in plan.skipped)
    assert all(names[0].startswith("encoder.") for names, _, _ in plan.sources.values())
    with pytest.raises(UserError, match="unexpected"):  # without the skip the decoder tensors are not silent
        plan_import(meta_5b_shapes, vae_rules(), target)


def test_every_parameter_has_logical_axes():
    boxed = traverse_util.flatten_dict(abstract_params(VAEConfig.from_json(TINY)))
    for path, leaf in boxed.items():
        assert isinstance(leaf, meta.Partitioned), path
        names = leaf.names
        assert len(names) == len(leaf.value.shape), path
        if path[-1] == "kernel":
            assert names[-2:] == (axes.CONV_IN, axes.CONV_OUT), path
        elif path[-2].startswith("norm"):
            assert names == (axes.NORM,), path
        else:
            assert names == (axes.CONV_OUT,), path


def test_missing_tensor_is_named(tiny):
    config, reference, _, _ = tiny
    state = torch_state(reference)
    del state["decoder.up_blocks.1.resnets.0.conv_shortcut.weight"]
    with pytest.raises(UserError, match=r"missing .*decoder/up_blocks_1_resnets_0/conv_shortcut/kernel"):
        load_vae_params(state, config)


@pytest.mark.parametrize("key,value,message", [
    ("down_block_types", ["DownEncoderBlock2D"] * 4, "unsupported down_block_types"),
    ("act_fn", "gelu", "unsupported act_fn"),
])
def test_bad_config_is_a_user_error(tmp_path, capsys, key, value, message):
    data = read_json(TINY)
    data[key] = value
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match=message):
        VAEConfig.from_json(path)
    assert cli.main(["parity", "vae", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_frame_chunks_follow_diffusers():
    assert chunk_sizes(49, 8) == (9, 8, 5)  # spec §5.4: 9, 8, 8, 8, 8, 8 frames
    assert chunk_sizes(13, 2) == (3, 2, 5)  # 3, 2, 2, 2, 2, 2 latents
    assert chunk_sizes(5, 8) == (5, 8, 0) and chunk_sizes(16, 8) == (8, 8, 1) and chunk_sizes(4, 2) == (2, 2, 1)


def test_chunk_driver_compiles_two_chunk_shapes_whatever_the_length(tiny):
    """The driver runs one jitted call per chunk: the first-chunk and steady-chunk shapes compile once each, so a
    longer video adds calls, not compiles (and never holds two chunks' working memory at once)."""
    config, _, model, params = tiny
    step = vae._chunk_step(model, "decode_chunk")
    latents = lambda frames: jnp.asarray(np.random.default_rng(frames).standard_normal((1, frames, 3, 5, 4)),
                                         jnp.float32)
    before = step._cache_size()
    short = vae.decode(model, params, latents(7))  # chunks of 3, 2, 2 latents
    assert step._cache_size() == before + 2
    long = vae.decode(model, params, latents(11))  # 3, 2, 2, 2, 2
    assert step._cache_size() == before + 2
    assert short.shape == (1, 25, 24, 40, 3) and long.shape == (1, 41, 24, 40, 3)


def test_5b_tile_geometry_is_the_reference_one():
    model = AutoencoderKLCogVideoX(VAEConfig.from_json(FIVE_B))
    assert (model.tile_sample, model.tile_latent) == ((240, 360), (30, 45))
    # spec §5.5: encode origins every 200 / 288 px, blends 5 / 9 latents, keep 25 x 36; decode the mirror image.
    assert tile_plan(model.tile_sample, model.tile_latent) == {
        "tile": (240, 360), "stride": (200, 288), "blend_extent": (5, 9), "keep": (25, 36)}
    assert tile_plan(model.tile_latent, model.tile_sample) == {
        "tile": (30, 45), "stride": (25, 36), "blend_extent": (40, 72), "keep": (200, 288)}


def test_cli_parity_end_to_end(capsys):
    code = cli.main(["parity", "vae", "--config", str(TINY), "--frames", "5", "--seed", "1"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(last)
    assert code == 0 and result["ok"] and result["component"] == "vae"
    assert result["input_shape"] == [1, 3, 5, 32, 48] and result["decoded_shape"] == [1, 3, 8, 32, 48]
    assert result["max_rel_err"] <= result["tol"] == FP32_TOLERANCE


def test_cli_bad_config_path(tmp_path, capsys):
    assert cli.main(["parity", "vae", "--config", str(tmp_path / "nope.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config not found" in err


def test_cli_parity_from_a_sharded_checkpoint_folder(tmp_path, capsys):
    """`--checkpoint DIR`: diffusers loads the folder, we import the same safetensors shards through the index."""
    from a1_jax.parity.vae import reference_model

    reference_model(TINY, None, seed=3).save_pretrained(tmp_path, max_shard_size="200KB")
    assert list(tmp_path.glob("*.safetensors.index.json")), "the tiny VAE should be saved in shards"
    code = cli.main(["parity", "vae", "--config", str(tmp_path), "--checkpoint", str(tmp_path), "--frames", "9"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and result["ok"] and result["max_rel_err"] <= FP32_TOLERANCE
