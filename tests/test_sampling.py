"""Sampling end to end: pipeline parity against a PyTorch loop on a random release folder (one clip, and two
long-video windows with latent blending), checkpoints (convert, sharded restore, what a bad folder says), the
window plan and stitching, and `a1-jax animate` on the tiny configuration with the real sample assets."""

import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys

import cv2
import jax
import numpy as np
import pytest

from a1_jax.cli import main
from a1_jax.errors import UserError
from a1_jax.interpolate import BlendInterpolator
from a1_jax.io.audio import mux_audio, read_audio, stream_durations
from a1_jax.io.video import probe_video, read_frames, read_image, resample_indices, write_video
from a1_jax.motion.reference import crop_and_resize
from a1_jax.parity import errors
from a1_jax.parity import pipeline as reference
from a1_jax.sampling import Animator
from a1_jax.sampling.animator import wants_offload
from a1_jax.sampling.denoise import Overlap
from a1_jax.sampling.windows import WindowPlan, stitch
from a1_jax.weights import checkpoint

PARITY_TOLERANCE = reference.PIPELINE_TOLERANCE  # max|ours - reference| / max|reference|, final latents, fp32
REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 10  # steps 4-7 blend, so parity needs the release's step count


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A small random SkyReels-A1 in the release layout; its transformer config claims 226 face tokens."""
    folder = tmp_path_factory.mktemp("release")
    pipe = reference.write_release(folder)
    return folder, pipe


@pytest.fixture(scope="module")
def inputs(examples):
    """A real portrait on the small canvas, its aligned face crop, and two windows of control frames."""
    height, width = reference.SMALL_VAE.sample_height, reference.SMALL_VAE.sample_width
    portrait = read_image(examples["portrait"])
    canvas = crop_and_resize(portrait, height, width)
    face = crop_and_resize(portrait, 512, 512)
    rng = np.random.default_rng(0)
    # Sparse coloured strokes on black, like control frames, different in each window.
    controls = [np.where(rng.random((49, height, width, 1)) < 0.05,
                         rng.integers(0, 256, (49, height, width, 3)), 0).astype(np.uint8) for _ in range(2)]
    return canvas, face, controls


@pytest.fixture(scope="module")
def animator(release):
    return Animator.from_pretrained(release[0], dtype="float32")


def _ours(animator, canvas, face, control, image_noise, noise, overlap=None):
    encoded = animator.encode_reference(canvas, face)
    conditions = animator.conditions(encoded, control, image_noise=image_noise)
    return animator.denoise(conditions, steps=STEPS, guidance=3.0, noise=noise, overlap=overlap)


def _noises(animator, seed):
    return reference.window_noises(animator.configs, np.random.default_rng(seed))


# ------------------------------------------------------------------------------------------------------- parity
def test_pipeline_parity_ddim_dpm_bf16_and_the_written_frames(release, inputs, animator):
    """Against the release pipeline, on a real portrait: fp32 DDIM over the first window (= the single clip) and the
    next one, blended, and the first 15 of the 47 frames the single-clip script writes (the decoder's first chunk and
    a steady one with its conv cache, tiled; `a1-jax parity pipeline` compares all 47); fp32 DPM; bf16 DDIM, latents
    and frames (on the tiny geometry). Tolerances and their reasons: `a1_jax.parity.pipeline`."""
    folder, pipe = release
    canvas, face, controls = inputs
    rows = {**reference.fp32_rows(pipe, animator, canvas, face, controls, seed=1, frame_latents=5),
            **reference.bf16_rows(seed=1)}
    assert all(row["ok"] for row in rows.values()), rows
    assert rows["ddim fp32 window 0"]["tol"] == PARITY_TOLERANCE == 2e-5
    assert rows["ddim fp32 window 0 frames"]["frames"] == 15 and rows["ddim bf16 window 0 frames"]["frames"] == 7
    assert rows["ddim bf16 window 0"]["max_rel_err"] > 100 * PARITY_TOLERANCE  # bf16 really ran
    # Every window of one geometry runs the same executable (two windows, DDIM).
    assert animator.traces == 1
    # The blending is real: the second window without it is far from the blended one.
    image_noise, noise = _noises(animator, 1)
    encoded = animator.encode_reference(canvas, face, tiling=True)  # the programs the rows above compiled
    first, second = (animator.conditions(encoded, control, image_noise=image_noise) for control in controls)
    _, tails = animator.denoise(first, steps=STEPS, guidance=3.0, noise=noise)
    blended, _ = animator.denoise(second, steps=STEPS, guidance=3.0, noise=noise, overlap=Overlap.after(tails))
    unblended, _ = animator.denoise(second, steps=STEPS, guidance=3.0, noise=noise)
    assert errors({"x": (unblended, blended)})["x"]["max_rel_err"] > 100 * PARITY_TOLERANCE


def test_rope_base_grid_follows_the_config_and_the_release_pipelines_fixed_canvas_only_at_its_size():
    """The SkyReels-A1 pipelines place the RoPE grid in a hard-coded 480x720 canvas, diffusers' (and ours) in the
    config's sample size: the same tables at the release geometry, different ones at the small parity geometry,
    where ours follow the config (BUILD_NOTES: RoPE base grid)."""
    from a1_jax.config import DiTConfig
    from a1_jax.models import dit
    from a1_jax.parity.dit import reference_rope, skyreels_rope

    def ours(config, frames, height, width):
        p = config.patch_size
        return np.concatenate(dit.rope_tables(config, frames, height // p, width // p))

    def theirs(tables):
        return np.concatenate([t.numpy() for t in tables])

    release_config = DiTConfig.from_json(str(REPO / "configs" / "dit_5b.json"))
    at_release = ours(release_config, 13, 60, 90)
    np.testing.assert_allclose(at_release, theirs(reference_rope(release_config, 13, 60, 90)), atol=1e-6)
    np.testing.assert_allclose(at_release, theirs(skyreels_rope(release_config, 13, 60, 90, 8)), atol=1e-6)

    small = reference.SMALL_DIT
    at_small = ours(small, 13, 12, 10)
    np.testing.assert_allclose(at_small, theirs(reference_rope(small, 13, 12, 10)), atol=1e-6)
    assert np.max(np.abs(at_small - theirs(skyreels_rope(small, 13, 12, 10, 8)))) > 0.1


# A Python that cannot import what a bare accelerator image lacks (the bench must run there).
BLOCKED_IMPORTS = """
import importlib.abc, importlib.machinery, sys

class Blocked(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("mediapipe", "grain", "cv2"):
            return importlib.machinery.ModuleSpec(name, self)

    def create_module(self, spec):
        raise ImportError(f"{spec.name} is blocked")

    def exec_module(self, module):
        pass

sys.meta_path.insert(0, Blocked())
from a1_jax.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_bench_pipeline_tiny_gives_the_whole_table_without_mediapipe_grain_or_opencv(tmp_path):
    """The accelerator benchmark's code on CPU (fp32, tiny geometry: 9-frame windows): the clip (ours twice, the
    torch loop once), the DiT forward against diffusers, a train step; mediapipe, grain and OpenCV unimportable."""
    from a1_jax.models import dit

    script = tmp_path / "blocked.py"
    script.write_text(BLOCKED_IMPORTS)
    run = subprocess.run([sys.executable, str(script), "bench", "pipeline", "--geometry", "tiny", "--dtype",
                          "float32", "--against", "diffusers", "--repeats", "1", "--blocks", "1"],
                         env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["ok"] and result["geometry"] == "tiny" and result["frames"] == 9
    clip = result["clip"]
    for side in ("ours_first_call", "ours", "reference"):
        assert all(clip[side][f"{stage}_s"] > 0 for stage in ("conditions", "denoise", "decode")), clip
    # The bench's two clips are the parity computation: in fp32 they agree as the parity test holds them.
    assert clip["latents_max_rel_err"] <= PARITY_TOLERANCE and reference.frames_ok(clip["frames"])
    forward = result["dit_forward"]
    assert forward["jax_s"] > 0 and forward["torch_s"] > 0 and forward["max_rel_err"] <= 1e-5
    tiny = dataclasses.replace(reference.SMALL_DIT, sample_frames=9)  # 3 latent frames of 12x10
    assert forward["flops"] == dit.forward_flops(tiny, 2, 3, 12, 10, 16)
    train = result["train_step"]
    assert train["blocks"] == 1 and train["step_s"] > 0 and np.isfinite(train["loss"])
    assert train["flops"] == 3 * dit.forward_flops(dataclasses.replace(tiny, num_layers=1), 2, 3, 12, 10, 16)


def test_inference_memory_plans_each_stage_with_the_conv_cache_and_what_stays_resident():
    """tools/inference_memory.py on the small release geometry: the steady-state chunks take the previous chunk's
    conv cache (donated: written in place), and every stage adds what the pipeline holds to the parameters resident:
    all of them, or with offload only the stage's own network's."""
    import jax

    sys.path.insert(0, str(REPO / "tools"))
    import inference_memory
    from a1_jax.models import vae
    from a1_jax.parity.bench_pipeline import bench_configs

    configs = bench_configs("tiny")
    summary = inference_memory.plan_stages(configs, "float32", 1, jax.devices()[0])
    stages = summary["stages"]
    assert len(stages) == 7 and summary["all_params_bytes"] == sum(summary["params_bytes"].values())
    steady = [row for name, row in stages.items() if "steady chunk" in name]
    first = [row for name, row in stages.items() if "first chunk" in name]
    assert len(steady) == len(first) == 2
    for row in steady:
        assert row["alias_bytes"] > 0 and row["other_argument_bytes"] > row["alias_bytes"]  # the cache, donated
    height, width = configs.canvas
    control = configs.clip_frames * height * width * 3 * 4  # the window's control frames in float32
    guider = [row for name, row in stages.items() if name.startswith("pose guider")]
    assert all(row["held_bytes"] >= control for row in guider)
    networks = summary["params_bytes"]
    assert [row["network"] for row in stages.values()] == [
        "siglip", "vae", "pose_guider", "pose_guider", "transformer", "vae", "vae"]
    assert summary["compiler_options"] == inference_memory.CPU_COMPILER_OPTIONS  # XLA:CPU: no hoisted f32 weights
    assert vae.conv_as_2d()  # planned with the accelerators' 3-D conv; the CPU's own form is back for the rest
    for row in stages.values():
        assert row["resident_bytes"] == {"off": summary["all_params_bytes"], "on": networks[row["network"]]}
        for mode, peak in row["stage_peak_bytes"].items():
            assert peak >= row["resident_bytes"][mode] + row["held_bytes"] + row["temp_bytes"]
        # offload frees exactly the other networks' parameters, nothing else changes
        assert (row["stage_peak_bytes"]["off"] - row["stage_peak_bytes"]["on"]
                == summary["all_params_bytes"] - networks[row["network"]])
    for mode in ("off", "on"):
        assert summary["pipeline_peak_bytes"][mode] == max(row["stage_peak_bytes"][mode] for row in stages.values())


def test_release_config_saying_226_face_tokens_loads(release):
    folder, _ = release
    claimed = json.loads((folder / "transformer" / "config.json").read_text())["max_text_seq_length"]
    configs = checkpoint.ModelConfigs.from_folder(folder)
    assert claimed == 226 and configs.transformer.max_text_seq_length == configs.siglip.num_patches == 16


# -------------------------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def converted(release, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "a1"
    code = main(["convert", "--from", str(release[0]), "--to", str(out)])
    assert code == 0
    return out


def test_convert_then_load_gives_the_same_latents_and_offloaded_the_same_frames(release, inputs, animator,
                                                                                converted):
    canvas, face, controls = inputs
    noises = _noises(animator, 3)
    expected, _ = _ours(animator, canvas, face, controls[0], *noises)
    # Restored with offload: every network in pinned host memory, placed on the device for its stage only.
    restored = Animator.from_pretrained(converted, dtype="float32", offload=True)
    assert checkpoint.is_converted(converted) and not list(converted.rglob("*.safetensors"))
    card = type("Card", (), {"platform": "gpu", "memory_stats": lambda self: {"bytes_limit": 24 * 10**9}})()
    assert wants_offload("auto", {card: 13 * 10**9}) and not wants_offload("auto", {card: 11 * 10**9})
    assert not wants_offload("auto", {jax.devices()[0]: 10**15})  # the CPU backend has no device limit: off
    assert wants_offload("on", {}) and not wants_offload("off", {})  # `--offload`'s words, as the CLI passes them
    with pytest.raises(UserError, match="--offload must be on, off or auto"):
        wants_offload("yes", {})
    assert {leaf.sharding.memory_kind for leaf in jax.tree_util.tree_leaves(restored.params)} == {"pinned_host"}
    on_device = lambda: {id(x): x.nbytes for x in jax.live_arrays() if x.sharding.memory_kind == "device"}
    before = on_device()
    got, _ = _ours(restored, canvas, face, controls[0], *noises)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    np.testing.assert_array_equal(restored.decode(got), animator.decode(expected))  # the frames, bit for bit
    # Each stage's placed copy was freed when it ended: what is new on the device is far less than any network.
    new = sum(n for i, n in on_device().items() if i not in before)
    smallest = min(sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(tree)) for tree in restored.params.values())
    assert new < smallest, (new, smallest)


def test_sharded_restore_gives_the_single_device_latents(inputs, animator, converted):
    canvas, face, controls = inputs
    noises = _noises(animator, 4)
    single, _ = _ours(animator, canvas, face, controls[0], *noises)
    sharded_animator = Animator.from_pretrained(converted, dtype="float32", mesh="fsdp_tensor")
    kernel = sharded_animator.params["transformer"]["blocks"]["attn"]["to_q"]["kernel"]
    assert len(kernel.sharding.device_set) == 8 and kernel.addressable_shards[0].data.size < kernel.size
    sharded, _ = _ours(sharded_animator, canvas, face, controls[0], *noises)
    assert errors({"x": (sharded, single)})["x"]["max_rel_err"] <= 1e-5


def _damaged(release, tmp_path, how):
    folder = tmp_path / "broken"
    shutil.copytree(release[0], folder)
    if how == "missing part":
        shutil.rmtree(folder / "pose_guider")
    elif how == "missing weights":
        (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    elif how == "wrong config":
        config = json.loads((folder / "vae" / "config.json").read_text())
        config["block_out_channels"] = [16, 16, 16, 16]
        (folder / "vae" / "config.json").write_text(json.dumps(config))
    elif how == "parts that do not fit":
        config = json.loads((folder / "transformer" / "config.json").read_text())
        config["in_channels"] = 9
        (folder / "transformer" / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("how, words", [
    ("missing part", "missing pose_guider/config.json"),
    ("missing weights", "expected one .safetensors"),
    ("wrong config", "mis-shaped"),
    ("parts that do not fit", "in_channels 9 must be 3 x the VAE's latent_channels 4"),
])
def test_bad_checkpoint_folders_are_explained(release, tmp_path, how, words):
    folder = _damaged(release, tmp_path, how)
    with pytest.raises(UserError, match=words):
        Animator.from_pretrained(folder, dtype="float32")


def test_convert_refuses_an_existing_output_before_any_work(release, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "something").write_text("x")
    assert main(["convert", "--from", str(release[0]), "--to", str(taken)]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and len(err.strip().splitlines()) == 1
    assert main(["convert", "--from", str(tmp_path / "absent"), "--to", str(tmp_path / "new")]) == 2
    assert not (tmp_path / "new").exists()


# -------------------------------------------------------------------------------------------------- windows
@pytest.mark.parametrize("num_driving, starts", [(1, [0]), (48, [0]), (49, [0, 40]), (88, [0, 40]),
                                                  (89, [0, 40, 80]), (176, [0, 40, 80, 120, 160])])
def test_window_starts_follow_the_reference_loop(num_driving, starts):
    assert WindowPlan(num_driving, window=48, overlap=8).starts == starts


def test_stitch_emits_each_driving_frame_once_with_a_cross_fade_at_each_seam():
    plan = WindowPlan(num_driving=100, window=48, overlap=8)  # 3 windows, the last one padded by 28 frames
    windows = []
    for k, start in enumerate(plan.starts):
        # Frame 1 + m of window k shows driving frame start + m; its value encodes both (k, driving frame).
        decoded = np.zeros((49, 2, 2, 3), np.uint8)
        control = np.zeros((49, 2, 2, 3), np.uint8)
        for m, d in enumerate(plan.indices(start)):
            decoded[1 + m], control[1 + m] = 100 * k, d
        windows.append((decoded, control))
    pairs = list(stitch(plan, windows, seam=BlendInterpolator()))
    assert [int(c[0, 0, 0]) for _, c in pairs] == list(range(100))
    window_of = [int(f[0, 0, 0]) for f, _ in pairs]
    assert window_of[:40] == [0] * 40 and window_of[48:80] == [100] * 32 and window_of[88:] == [200] * 12
    # The 8 overlapping frames go 1/9 … 8/9 of the way from one window to the next.
    assert window_of[40:48] == [11, 22, 33, 44, 56, 67, 78, 89]
    assert window_of[80:88] == [111, 122, 133, 144, 156, 167, 178, 189]
    shorter = [int(f[0, 0, 0]) for f, _ in stitch(plan, windows, seam=BlendInterpolator(), seam_frames=4)]
    assert shorter[40:48] == [0, 0, 0, 0, 20, 40, 60, 80]  # the last 4 only: 1/5 … 4/5


# -------------------------------------------------------------------------------------------------- the command
def _animate(tmp_path, examples, *extra, capsys=None):
    args = ["animate", "--ref", examples["portrait"], "--out", str(tmp_path / "out.mp4"), "--steps", "2", *extra]
    if "--driving" not in extra:
        args += ["--driving", examples["driving"]]
    code = main(args)
    captured = capsys.readouterr() if capsys is not None else None
    return code, captured


def test_animate_single_clip_on_the_tiny_configuration(tmp_path, examples, capsys):
    code, captured = _animate(tmp_path, examples, "--single-clip", "--preview", str(tmp_path / "preview.mp4"),
                              "--fps", "30", capsys=capsys)
    assert code == 0, captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert "random weights (every network): the output shows the pipeline, not a likeness" in captured.err
    # 47 model frames at 12 fps (3.92 s) -> 118 frames at 30 fps, the in-betweens interpolated (flow).
    assert summary["frames_12fps"] == 47 and summary["frames"] == 118 and summary["fps"] == 30
    assert summary["windows"] == 1 and summary["interpolator"] == "flow" and summary["ok"]
    assert summary["random_weights"] and set(summary["weights"]) == set(checkpoint.NETWORKS)
    assert all(source == "random (seed 0)" for source in summary["weights"].values())
    stages = summary["stage_seconds"]
    assert set(stages) == {"startup", "checks", "landmarks", "model", "conditions", "denoise", "decode", "write"}
    # Exclusive stage clocks: together they are the run, less what ran before the first stage (parsing arguments).
    assert 0 <= summary["seconds"] - sum(stages.values()) < 1.0, (summary["seconds"], stages)
    info = probe_video(str(tmp_path / "out.mp4"))
    assert (info.num_frames, info.height, info.width, info.fps) == (118, 480, 720, 30)
    preview = probe_video(str(tmp_path / "preview.mp4"))  # the preview stays at the model's 12 fps
    assert preview.num_frames == 47 and preview.fps == 12 and preview.height == 480 and preview.width == 720 * 3 + 480
    frames = np.stack(list(read_frames(str(tmp_path / "out.mp4"), range(118))))
    assert frames.std() > 5  # a real, varied picture, not a constant frame
    # the driving video's own sound under the frames shown: f0 … f46 of the example clip's 48
    durations = stream_durations(str(tmp_path / "out.mp4"))
    assert durations["audio"] == pytest.approx(47 / 12, abs=0.03)
    assert durations["video"] == pytest.approx(47 / 12, abs=1 / 30 + 0.01)  # re-timed: the same duration, in sync
    assert summary["audio_seconds"] == pytest.approx(47 / 12, abs=1e-3)


def test_animate_long_video_in_two_windows_capped_by_max_frames(tmp_path, examples, capsys):
    # The example clip forwards, then backwards: 192 frames at 24 fps -> 96 12-fps frames.
    source = examples["driving"]
    info = probe_video(source)
    frames = list(read_frames(source, range(info.num_frames)))
    looped = str(tmp_path / "looped.mp4")
    write_video(looped, frames + frames[::-1], fps=info.fps)
    mux_audio(looped, read_audio(source, rate=48000, mono=False), [(0.0, 2 * info.num_frames / info.fps)])
    available = len(resample_indices(probe_video(looped).num_frames, probe_video(looped).fps))
    expected = 60  # --max-frames caps the 96 driving frames; windows at 0 and 40 (the last padded by 28)
    code, captured = _animate(tmp_path, examples, "--driving", looped, "--max-frames", str(expected), "--no-audio",
                              capsys=capsys)
    assert code == 0, captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert available > expected and summary["windows"] == 2 and summary["frames"] == expected and summary["ok"]
    assert summary["fps"] == 12 and summary["seam"] == "interpolate"  # the default: 12 fps, seams interpolated
    assert summary["driving_frames"] == expected and summary["frames_without_face"] == []
    out = probe_video(str(tmp_path / "out.mp4"))
    assert (out.num_frames, out.height, out.width, out.fps) == (expected, 480, 720, 12)
    assert summary["audio_seconds"] is None and "audio" not in stream_durations(str(tmp_path / "out.mp4"))


def test_faceless_driving_frames_are_dropped_by_default_and_filled_on_request(tmp_path, examples, capsys):
    """As the reference's long-video script (np.delete): frames without a face are left out and named; --missing-face
    fill keeps one output frame per driving frame. Checked up to the plan (the networks add nothing here)."""
    from a1_jax.sampling.animator import plan_video

    frames = list(read_frames(examples["driving"], range(0, 96, 2)))  # 48 frames at 12 fps
    for i in (10, 11, 30):
        frames[i] = np.zeros_like(frames[i])
    gappy = str(tmp_path / "gappy.mp4")
    write_video(gappy, frames, fps=12)
    configs = checkpoint.ModelConfigs.from_folder(checkpoint.model_config_folder("tiny"))
    dropped = plan_video(configs, examples["portrait"], gappy)
    filled = plan_video(configs, examples["portrait"], gappy, missing_face="fill")
    without = dropped.motion.frames_without_face
    # The blanked frames (MediaPipe's tracker may also need the frame after a blank one to find the face again).
    assert {10, 11, 30} <= set(without) and len(without) <= 6 and filled.motion.frames_without_face == without
    assert len(dropped.motion.order) == 48 - len(without) and len(filled.motion.order) == 48
    kept = [i for i in range(48) if i not in without]
    np.testing.assert_array_equal(dropped.motion.source_indices, filled.motion.source_indices[kept])


@pytest.mark.parametrize("case, words", [
    ("steps 0", "--steps: must be at least 1"),
    ("fps below 12", "--fps must be between 12"),
    ("guidance -5", "--guidance: must be at least 1"),
    ("missing portrait", "image not found"),
    ("portrait without a face", "no face"),
    ("no face in the driving video", "no face"),
    ("out x.txt", "use .mp4 (got '.txt')"),
    ("out x.gif", "use .mp4 (got '.gif')"),
    ("preview p.png", "--preview"),
    ("out in /proc", "no new file can be created in /proc"),
    ("out is the driving video", "is one of the inputs"),
    ("unwritable output", "does not exist"),
    ("missing checkpoint", "checkpoint folder not found"),
    ("partial checkpoint", "missing pose_guider/config.json"),
    ("wrong config", "unknown model config"),
])
def test_animate_bad_inputs_are_one_line_exit_2(tmp_path, examples, capsys, release, case, words):
    out = str(tmp_path / "out.mp4")
    extra = []
    ref, driving = examples["portrait"], examples["driving"]
    if case == "steps 0":
        extra = ["--steps", "0"]
    elif case == "fps below 12":
        extra = ["--fps", "8"]
    elif case == "guidance -5":
        extra = ["--guidance", "-5"]
    elif case == "missing portrait":
        ref = str(tmp_path / "absent.png")
    elif case == "portrait without a face":
        ref = str(tmp_path / "grey.png")
        cv2.imwrite(ref, np.full((480, 720, 3), 128, np.uint8))
    elif case == "no face in the driving video":
        driving = str(tmp_path / "blank.mp4")
        write_video(driving, [np.zeros((64, 64, 3), np.uint8)] * 24, fps=12)
    elif case == "out x.txt":
        out = str(tmp_path / "x.txt")
    elif case == "out x.gif":
        out = str(tmp_path / "x.gif")
    elif case == "preview p.png":
        extra = ["--preview", str(tmp_path / "p.png")]
    elif case == "out in /proc":
        out = "/proc/x.mp4"
    elif case == "out is the driving video":
        driving = str(tmp_path / "driving.mp4")
        shutil.copy(examples["driving"], driving)
        out = driving
    elif case == "unwritable output":
        out = str(tmp_path / "no" / "such" / "folder" / "out.mp4")
    elif case == "missing checkpoint":
        extra = ["--checkpoint", str(tmp_path / "absent")]
    elif case == "partial checkpoint":
        extra = ["--checkpoint", str(_damaged(release, tmp_path, "missing part"))]
    elif case == "wrong config":
        extra = ["--config", "no-such-config"]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code = main(["animate", "--ref", ref, "--driving", driving, "--out", out, *extra])
    err = capsys.readouterr().err
    assert code == 2 and words in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written, nothing half-written left behind


def test_nan_latents_stop_the_run_before_decoding(tmp_path, examples, capsys, monkeypatch):
    """Broken weights (NaN) in the DiT: a clear message, ok false, exit 1, no mp4."""
    from a1_jax.sampling import animator as animator_module

    build = animator_module.Animator.from_config

    def broken(*args, **kwargs):
        built = build(*args, **kwargs)
        built.params["transformer"] = jax.tree_util.tree_map(lambda x: x * np.nan, built.params["transformer"])
        return built

    monkeypatch.setattr(animator_module.Animator, "from_config", broken)
    code, captured = _animate(tmp_path, examples, "--single-clip", "--steps", "1", capsys=capsys)
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert code == 1 and not summary["ok"] and "NaN or Inf" in summary["error"] and "NaN or Inf" in captured.err
    assert summary["out"] is None and "decode" not in summary["stage_seconds"]
    assert not list(tmp_path.rglob("*.mp4"))


def test_the_python_api_example_runs(tmp_path, examples):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tools"))
    try:
        import animate_example
    finally:
        sys.path.pop(0)
    summary = animate_example.main(["--out", str(tmp_path / "example.mp4"), "--steps", "1"])  # the shipped examples
    assert summary["frames"] == 47 and summary["shape"] == [47, 480, 720, 3]
    assert probe_video(str(tmp_path / "example.mp4")).num_frames == 47


def test_weight_sources_say_what_a_trained_workdir_trained(tmp_path, monkeypatch):
    """A training run's base model records its random networks; the workdir's DiT is the trained one."""
    workdir = tmp_path / "run"
    params = {name: {"w": np.zeros(2, np.float32)} for name in checkpoint.NETWORKS}
    sources = {name: checkpoint.random_source(3) for name in checkpoint.NETWORKS}
    checkpoint.save_checkpoint(workdir / checkpoint.WORKDIR_MODEL, checkpoint.model_config_folder("tiny"), params,
                               sources=sources)
    assert checkpoint.weight_sources(workdir) == sources  # no step saved yet: the base model
    monkeypatch.setattr(checkpoint, "trained_step", lambda folder: (200, "ema"))
    found = checkpoint.weight_sources(workdir)
    assert found["transformer"].startswith("trained (step 200, ema)")
    assert all(checkpoint.is_random(found[name]) for name in ("vae", "pose_guider", "siglip"))
    assert not checkpoint.is_random(found["transformer"])
