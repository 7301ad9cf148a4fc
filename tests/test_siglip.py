"""The identity branch: SigLIP vision tower vs transformers (fp32, CPU), its importer on the full So400m geometry,
the checkpoint's image preprocessing, the MediaPipe-driven aligned face crop, errors and the CLI."""

import argparse
import json
import pathlib
import subprocess
import sys

import imageio.v3 as iio
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax.core import meta

from a1_jax.config import SiglipConfig
from a1_jax.errors import UserError
from a1_jax.models.siglip import SiglipVisionTower, param_shapes, preprocess
from a1_jax.motion import face_align
from a1_jax.motion.landmarker import detect_image
from a1_jax.parallel import axes
from a1_jax.parity import FP32_TOLERANCE
from a1_jax.parity import siglip as siglip_parity
from a1_jax.weights.siglip import load_siglip, plan

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "siglip_tiny.json"
SO400M = REPO / "configs" / "siglip_so400m.json"
TINY_TEXT = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, vocab_size=64,
                 max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)
# The other config kind: a full SiglipModel config (text tower ignored), patch 16, odd MLP width, 3 layers.
TINY_FULL_P16 = {"model_type": "siglip", "architectures": ["SiglipModel"], "text_config": TINY_TEXT,
                 "vision_config": dict(hidden_size=40, intermediate_size=72, num_hidden_layers=3,
                                       num_attention_heads=5, image_size=48, patch_size=16, layer_norm_eps=1e-5)}


def _args(config, checkpoint=None, seed=0, batch=None, **bench) -> argparse.Namespace:
    return argparse.Namespace(config=str(config), checkpoint=checkpoint and str(checkpoint), seed=seed, batch=batch,
                              **bench)


def _write(path: pathlib.Path, data: dict) -> pathlib.Path:
    path.write_text(json.dumps(data))
    return path


def _so400m_vision() -> transformers.SiglipVisionConfig:
    data = json.loads(SO400M.read_text())
    fields = SiglipConfig.__dataclass_fields__
    return transformers.SiglipVisionConfig(**{k: v for k, v in data.items() if k in fields})


# --- the tower against transformers ---------------------------------------------------------------------------------

def test_parity_tiny_vision_config_patch14():
    result = siglip_parity.parity(_args(TINY, seed=3))
    assert result["input_shape"] == [2, 3, 56, 56]
    assert result["max_rel_err"] <= FP32_TOLERANCE, result
    # transformers' SiglipVisionModel carries the pooling head by default: skipped by name, and said so.
    assert result["skipped"]["(?:vision_model\\.)?head\\..*"] == 11


def test_parity_tiny_full_model_config_patch16(tmp_path):
    result = siglip_parity.parity(_args(_write(tmp_path / "config.json", TINY_FULL_P16), seed=1, batch=3))
    assert result["input_shape"] == [3, 3, 48, 48]
    assert result["max_rel_err"] <= FP32_TOLERANCE, result


def test_parity_from_a_saved_full_siglip_model(tmp_path):
    """A SiglipModel folder (text tower, logit scale/bias, `vision_model.`-prefixed names): transformers loads the
    vision tower with from_pretrained, we import the safetensors file; the text side is skipped and listed."""
    torch.manual_seed(0)
    config = transformers.SiglipConfig(text_config=TINY_TEXT, vision_config=json.loads(TINY.read_text()))
    model = transformers.SiglipModel(config)
    with torch.no_grad():
        for param in model.vision_model.parameters():  # non-default norms and biases, so a swap would show
            param.add_(0.05 * torch.randn_like(param))
    model.save_pretrained(tmp_path)
    result = siglip_parity.parity(_args(tmp_path / "config.json", checkpoint=tmp_path))
    assert result["max_rel_err"] <= FP32_TOLERANCE, result
    assert result["skipped"] == {"text_model\\..*": 22, "logit_(?:scale|bias)": 2, "(?:vision_model\\.)?head\\..*": 11}
    # The inference loader: geometry from the folder's full-model config.json, weights from its safetensors.
    tower, params = load_siglip(tmp_path, remat="full")
    assert tower.config == SiglipConfig.from_json(TINY) and tower.remat == "full"
    kernel = model.vision_model.encoder.layers[1].mlp.fc1.weight.detach().numpy()
    np.testing.assert_array_equal(params["encoder"]["fc1"]["kernel"][1], kernel.T)


def test_block_layout_params_are_stacked_and_annotated():
    model = SiglipVisionTower(SiglipConfig.from_json(TINY))
    boxed = param_shapes(model)
    leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, meta.AxisMetadata))
    for path, leaf in leaves:
        assert isinstance(leaf, meta.Partitioned), path
        assert len(leaf.names) == len(leaf.value.shape), path
        in_encoder = path[0].key == "encoder"
        assert (leaf.names[0] == axes.LAYERS) == in_encoder, (path, leaf.names)
        if in_encoder:
            assert leaf.value.shape[0] == 2
    attn = meta.unbox(boxed)["encoder"]["self_attn"]
    assert attn["q_proj"]["kernel"].shape == (2, 48, 48)


def test_remat_and_bf16_are_runtime_knobs_only():
    """Rematerialised blocks give the same output and gradients; bf16 compute stays close and returns bf16."""
    config = SiglipConfig.from_json(TINY)
    pixels = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, 56, 56, 3)), jnp.float32)
    params = meta.unbox(SiglipVisionTower(config).init(jax.random.PRNGKey(0), pixels)["params"])

    def loss_and_grads(model):
        loss = lambda p: jnp.sum(jnp.sin(model.apply({"params": p}, pixels)))
        return jax.jit(jax.value_and_grad(loss))(params)

    (base_loss, base_grads), (remat_loss, remat_grads) = (loss_and_grads(SiglipVisionTower(config, remat=r))
                                                          for r in ("none", "full"))
    np.testing.assert_allclose(remat_loss, base_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), remat_grads, base_grads)
    base = SiglipVisionTower(config).apply({"params": params}, pixels)
    half = SiglipVisionTower(config, dtype=jnp.bfloat16).apply({"params": params}, pixels)
    assert half.dtype == jnp.bfloat16 and base.shape == (1, 16, 48)
    assert float(jnp.max(jnp.abs(half.astype(jnp.float32) - base))) < 0.1 * float(jnp.max(jnp.abs(base)))


# --- the So400m geometry on shapes alone ----------------------------------------------------------------------------

def test_so400m_geometry_and_every_key_from_a_meta_model():
    config = SiglipConfig.from_json(SO400M)
    assert (config.num_patches, config.head_dim) == (729, 72)
    model = SiglipVisionTower(config)
    with torch.device("meta"):
        reference = transformers.SiglipVisionModel(_so400m_vision())
    shapes = {name: tuple(t.shape) for name, t in reference.state_dict().items()}
    checked = plan(shapes, model)  # raises on any missing / unexpected / mis-shaped name
    assert sum(int(np.prod(s)) for s in shapes.values()) == 428_225_600  # spec §4.1 (its count includes the head)
    stacked = [names for names, _, is_stacked in checked.sources.values() if is_stacked]
    assert len(checked.sources) == 21 and len(stacked) == 16 and all(len(names) == 27 for names in stacked)
    out = jax.eval_shape(model.apply, {"params": meta.unbox(param_shapes(model))},
                         jax.ShapeDtypeStruct((1, 384, 384, 3), jnp.float32))
    assert out.shape == (1, 729, 1152)


def test_so400m_full_siglip_model_skips_text_tower_and_head_by_name():
    full = transformers.SiglipConfig(vision_config=_so400m_vision().to_dict(),
                                     text_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                                      num_attention_heads=16))
    with torch.device("meta"):
        reference = transformers.SiglipModel(full)
    shapes = {name: tuple(t.shape) for name, t in reference.state_dict().items()}
    model = SiglipVisionTower(SiglipConfig.from_json(SO400M))
    skipped = set(plan(shapes, model).skipped)
    assert {"logit_scale", "logit_bias", "vision_model.head.probe"} <= skipped
    assert {n for n in shapes if n.startswith("text_model.")} <= skipped
    assert not any(n.startswith("vision_model.") and ".head." not in n and n in skipped for n in shapes)
    # Anything not on the skip list still fails loudly, by name.
    with pytest.raises(UserError, match="unexpected.*vision_model.embeddings.position_ids"):
        plan(shapes | {"vision_model.embeddings.position_ids": (1, 729)}, model)
    with pytest.raises(UserError, match="missing.*post_layernorm/bias"):
        plan({n: s for n, s in shapes.items() if n != "vision_model.post_layernorm.bias"}, model)


# --- preprocessing and the face crop --------------------------------------------------------------------------------

def test_preprocess_matches_the_checkpoints_image_processor(shared):
    """The slow (PIL) SiglipImageProcessor with the checkpoint's preprocessor_config: 384², bicubic, mean/std 0.5."""
    processor = transformers.SiglipImageProcessorPil(size={"height": 384, "width": 384}, resample=3,
                                                     rescale_factor=1 / 255, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    image = iio.imread(shared / "data" / "portraits" / "ref_2.png")[..., :3]
    for picture in (image, image[::3, 5::2]):  # a downscale and an odd-sized, non-square one
        expected = processor(images=np.ascontiguousarray(picture), return_tensors="np")["pixel_values"][0]
        ours = preprocess(np.ascontiguousarray(picture), 384)
        assert ours.shape == (384, 384, 3) and ours.dtype == np.float32
        # Same PIL resize; what is left is float32 rounding of the rescale/normalise arithmetic (1 ulp).
        assert np.max(np.abs(ours - expected.transpose(1, 2, 0))) <= 1e-6


def test_crop_aligns_every_portrait(shared, landmarker_path):
    template = face_align.template()
    eye_errors = {}
    for path in sorted((shared / "data" / "portraits").glob("*.png")):
        image = iio.imread(path)[..., :3]
        crop, matrix = face_align.align_face(image, path.name, landmarker_path)
        assert crop.shape == (512, 512, 3) and crop.dtype == np.uint8
        # A similarity: rotation and uniform scale, no shear.
        assert np.isclose(matrix[0, 0], matrix[1, 1]) and np.isclose(matrix[0, 1], -matrix[1, 0])
        face = detect_image(image, landmarker_path)
        np.testing.assert_array_equal(face_align.align_face(image, path.name, face=face)[0], crop)
        points = face_align.five_points(face)
        mapped = points @ matrix[:, :2].T + matrix[:, 2]
        # The crop really is that warp: landmarks found again in it sit where the matrix sends them.
        again = face_align.five_points(detect_image(crop, landmarker_path))
        assert np.median(np.linalg.norm(again - mapped, axis=1)) <= 3.0, path.name
        eye_errors[path.name] = np.linalg.norm(again[:2] - template[:2], axis=1)
    # Eyes on the template within 3 px where the face is frontal enough for a five-point similarity to fit it; on
    # turned or tilted heads the nose and mouth pull the fit and no similarity gets the eyes that close (BUILD_NOTES).
    assert min(e.max() for e in eye_errors.values()) <= 3.0, eye_errors


def test_crop_outside_the_image_is_facexlibs_grey_in_rgb(shared, landmarker_path):
    image = iio.imread(shared / "data" / "portraits" / "ref_1.png")[..., :3]
    face = detect_image(image, landmarker_path)
    (x0, y0), (x1, y1) = face.points[:, :2].min(0).astype(int), face.points[:, :2].max(0).astype(int)
    tight = np.ascontiguousarray(image[y0:y1, x0:x1])  # the face box only: the crop's corners fall outside it
    crop, _ = face_align.align_face(tight, "tight.png", face=face.offset(-x0, -y0))
    # facexlib warps a BGR image with border (135, 133, 132); in RGB that grey is (132, 133, 135).
    for corner in (crop[0, 0], crop[0, -1], crop[-1, 0], crop[-1, -1]):
        assert tuple(corner) == (132, 133, 135)


def test_no_face_is_a_user_error_naming_the_file(landmarker_path):
    blank = np.full((480, 720, 3), 128, np.uint8)
    with pytest.raises(UserError, match=r"^no face found in portrait_42\.png$"):
        face_align.align_face(blank, "portrait_42.png", landmarker_path)


# --- configs and the CLI --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("edit, words", [
    (dict(hidden_act="gelu"), "unsupported hidden_act 'gelu'"),
    (dict(image_size=10), "patch_size 14 is larger than image_size 10"),
    (dict(num_attention_heads=5), "hidden_size 48 must be divisible by num_attention_heads 5"),
    (dict(patch_size=0), "patch_size must be a positive integer"),
    (dict(model_type="clip_vision_model"), "expected a SigLIP"),
])
def test_bad_config_is_a_user_error(tmp_path, edit, words):
    path = _write(tmp_path / "config.json", json.loads(TINY.read_text()) | edit)
    with pytest.raises(UserError, match=words):
        SiglipConfig.from_json(path)


def test_cli_parity_end_to_end():
    proc = subprocess.run([sys.executable, "-m", "a1_jax", "parity", "siglip", "--config", str(TINY), "--seed", "2"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ok"] and result["component"] == "siglip" and result["max_rel_err"] <= FP32_TOLERANCE


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bench_times_both_sides_on_the_same_weights(dtype):
    result = siglip_parity.bench(_args(TINY, repeats=1, dtype=dtype))
    assert result["ok"] and result["dtype"] == dtype and result["input_shape"] == [1, 3, 56, 56]
    assert result["jax_s"] > 0 and result["torch_s"] > 0 and result["compile_s"] > 0
    assert result["speedup"] == pytest.approx(result["torch_s"] / result["jax_s"])
