"""Motion branch on the real sample assets: faces found, the drawn control video follows the driver, the drawing
keeps the spec's style, frame order and padding, and every bad input is a one-line user error (exit 2)."""

import json
import os
import pathlib
import subprocess
import sys

import cv2
import numpy as np
import pytest

from a1_jax.cli import main
from a1_jax.errors import UserError
from a1_jax.io import probe_video, read_frames, read_image, resample_indices, write_video
from a1_jax.motion import draw, landmarker, retarget
from a1_jax.motion.landmarker import Landmarker
from a1_jax.motion.pipeline import clip_order, plan_motion, render_control
from a1_jax.motion.reference import crop_and_resize, face_box

DRIVERS = ("drive_1", "drive_4", "drive_7")
INNER_LIP = [78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308, 415, 310, 311, 312, 13, 82, 81, 80, 191]


# ---------------------------------------------------------------------------------------------------------- helpers
def _colour_mask(frames: np.ndarray, colours) -> np.ndarray:
    mask = np.zeros(frames.shape[:-1], bool)
    for colour in colours:
        mask |= (frames == np.array(colour, np.uint8)).all(-1)
    return mask


def _centroid(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    assert len(xs), "expected drawn pixels of this colour"
    return np.array([xs.mean(), ys.mean()])


def _drawn_mouth_area(frame: np.ndarray) -> int:
    """Black pixels the drawn lip lines enclose (4-connected fill cannot cross 8-connected 1-px lines)."""
    barrier = _colour_mask(frame, [colour for _, colour in draw.EDGE_GROUPS[4:]]).astype(np.uint8)
    mask = np.pad(barrier, 1)
    filled = barrier.copy()
    cv2.floodFill(filled, mask, (0, 0), 2)
    return int((filled == 0).sum())


def _drawn_yaw(frame: np.ndarray) -> float:
    """Nose square's horizontal offset from the eyes' midpoint, in eye distances (turning the head moves it)."""
    right = _centroid(_colour_mask(frame, [(10, 200, 180)]))
    left = _centroid(_colour_mask(frame, [(180, 200, 10)]))
    nose = _centroid(_colour_mask(frame, [draw.DRIVING_STYLE.nose_colour]))
    return (nose[0] - (right[0] + left[0]) / 2) / np.linalg.norm(right - left)


def _driver_measures(path: str, landmarker_path: str, order: np.ndarray) -> np.ndarray:
    """[frames, (inner-mouth area / eye distance², yaw as in `_drawn_yaw`)] from fresh still-image detections."""
    info = probe_video(path)
    sampled = resample_indices(info.num_frames, info.fps)
    rows = []
    with Landmarker(landmarker_path) as landmarker:
        for frame in read_frames(path, sampled[order]):
            points = landmarker.detect(frame).points[:, :2]
            right = points[retarget.RIGHT_EYE_CONTOUR].mean(0)
            left = points[retarget.LEFT_EYE_CONTOUR].mean(0)
            eye = np.linalg.norm(right - left)
            rows.append((cv2.contourArea(points[INNER_LIP].astype(np.float32)) / eye ** 2,
                         (points[4, 0] - (right[0] + left[0]) / 2) / eye))
    return np.array(rows)


# --------------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def reference_image(shared):
    return read_image(str(shared / "data" / "portraits" / "ref_1.png"))


@pytest.fixture(scope="module")
def driver_measures(shared, landmarker_path, clips):
    """{name: _driver_measures over the clip's driving frames}."""
    return {name: _driver_measures(str(shared / "data" / "driving" / f"{name}.mp4"), landmarker_path, plan.order)
            for name, (plan, _) in clips.items()}


@pytest.fixture(scope="module")
def clips(shared, reference_image, landmarker_path):
    """One 49-frame clip per sample driver: {name: (plan, frames [49, 480, 720, 3])}."""
    out = {}
    for name in DRIVERS:
        plan = plan_motion(reference_image, str(shared / "data" / "driving" / f"{name}.mp4"),
                           landmarker_path=landmarker_path, max_frames=49)
        out[name] = plan, np.stack(list(render_control(plan)))
    return out


# ------------------------------------------------------------------------------------------------ reference canvas
def test_canvas_crop_and_pad():
    wide = np.zeros((720, 1280, 3), np.uint8)
    wide[:, 640] = 255  # the centre column survives the centre crop at the centre
    canvas = crop_and_resize(wide)
    assert canvas.shape == (480, 720, 3)
    assert abs(int(np.argmax(canvas[240, :, 0])) - 360) <= 1
    tall = np.full((600, 300, 3), 255, np.uint8)
    canvas = crop_and_resize(tall)  # padded black left and right to 3:2, image kept whole and centred
    assert canvas.shape == (480, 720, 3)
    assert canvas[:, :200].max() == 0 and canvas[:, -200:].max() == 0 and canvas[:, 300:420].min() == 255


def test_face_box_is_square_twice_the_face_and_inside():
    box = face_box((300.0, 150.0, 400.0, 270.0), 480, 720)  # 100 wide, 120 tall face
    assert (box.width, box.x1, box.y1) == (200, 250, 110)
    assert abs(box.width - box.height) <= 1
    clipped = face_box((20.0, 10.0, 120.0, 130.0), 480, 720)  # near the top-left corner: clipped, then squared
    assert clipped.x1 >= 0 and clipped.y1 == 0 and abs(clipped.width - clipped.height) <= 1


# -------------------------------------------------------------------------------------------------------- retarget
def _rotated(points, transform, rotation):
    """The same face turned by `rotation` (image axes) about its rigid centre, with its matrix updated."""
    center = points[retarget.RIGID_LANDMARKS].mean(0)
    turned = transform.copy()
    flip = np.diag([1.0, -1.0, -1.0])
    turned[:3, :3] = flip @ rotation @ flip @ transform[:3, :3]
    return (points - center) @ rotation.T + center, turned


def test_retarget_composes_the_relative_smoothed_rotation(clips):
    plan, _ = clips["drive_7"]
    source = plan.reference.points
    driver, transform = plan.driving_points[0].astype(np.float64), plan.driving_transforms[0]
    turn = retarget.matrix_from_rotvec([0.0, 0.3, 0.0])
    turned, turned_transform = _rotated(driver, transform, turn)
    out = retarget.retarget(source, plan.reference.transform, np.stack([driver, turned]),
                            np.stack([transform, turned_transform]))
    np.testing.assert_allclose(out[0], source, atol=1e-6)  # driver's frame 0 = the reference itself
    # R_src · R(s_0)ᵀ · R(s_1) with the EMA s_0 = p_0, s_1 = 0.7 p_1 + 0.3 p_0 on axis-angle vectors.
    p0 = retarget.rotvec_from_matrix(retarget.rotation_from_transform(transform))
    p1 = retarget.rotvec_from_matrix(retarget.rotation_from_transform(turned_transform))
    expected = (retarget.rotation_from_transform(plan.reference.transform) @ retarget.matrix_from_rotvec(p0).T
                @ retarget.matrix_from_rotvec(0.7 * p1 + 0.3 * p0))
    reference_pose, reference_canonical = retarget.decompose(source, plan.reference.transform)
    np.testing.assert_allclose(retarget.compose(retarget.Pose(expected, reference_pose.center, reference_pose.scale),
                                                reference_canonical), out[1], atol=1e-6)


def test_retarget_absolute_takes_the_drivers_shape_and_scale_zero_freezes_it(clips):
    plan, _ = clips["drive_7"]
    source, transform = plan.reference.points, plan.reference.transform
    driving, driving_transforms = plan.driving_points[:40], plan.driving_transforms[:40]
    source_pose, _ = retarget.decompose(source, transform)
    absolute = retarget.retarget(source, transform, driving, driving_transforms, motion="absolute")
    pose, canonical = retarget.decompose(absolute[0], transform)  # frame 0: no relative rotation
    np.testing.assert_allclose(canonical, retarget.decompose(driving[0], driving_transforms[0])[1], atol=0.02)
    assert pose.scale == pytest.approx(source_pose.scale, rel=1e-6)  # the reference's size and place are kept
    np.testing.assert_allclose(pose.center, source_pose.center, atol=1e-6)

    def mouth_areas(points):
        return np.array([cv2.contourArea(p[INNER_LIP, :2].astype(np.float32)) for p in points])

    frozen = retarget.retarget(source, transform, driving, driving_transforms, expression_scale=0.0)
    moving = retarget.retarget(source, transform, driving, driving_transforms)
    assert mouth_areas(frozen).std() < 0.1 * mouth_areas(moving).std()


def test_smoothing_and_gap_filling():
    step = np.array([[0.0, 0, 0], [1, 0, 0], [1, 0, 0], [1, 0, 0]])
    np.testing.assert_allclose(retarget.smooth_rotvecs(step)[:, 0], [0, 0.7, 0.91, 0.973])
    values = np.array([[0.0], [0.0], [0.0], [3.0], [0.0]])
    found = np.array([False, True, False, True, False])
    values[1], values[3] = 1.0, 3.0
    np.testing.assert_allclose(retarget.fill_missing(values, found)[:, 0], [1, 1, 2, 3, 3])


# ---------------------------------------------------------------------------------------------- on the real assets
@pytest.mark.parametrize("name", DRIVERS)
def test_every_sampled_frame_has_a_face(shared, reference_image, landmarker_path, name):
    path = str(shared / "data" / "driving" / f"{name}.mp4")
    plan = plan_motion(reference_image, path, landmarker_path=landmarker_path)  # long mode: every sampled frame
    info = probe_video(path)
    assert plan.faces_found == len(resample_indices(info.num_frames, info.fps))
    assert plan.frames_filled == 0


@pytest.mark.parametrize("name", DRIVERS)
def test_mouth_opening_follows_the_driver(clips, driver_measures, name):
    _, frames = clips[name]
    drawn = np.array([_drawn_mouth_area(frame) for frame in frames[1:]])
    assert drawn.std() > 0
    assert np.corrcoef(drawn, driver_measures[name][:, 0])[0, 1] >= 0.9


@pytest.mark.parametrize("name", ["drive_1", "drive_4"])  # the drivers that turn their heads (drive_7 barely does)
def test_head_yaw_follows_the_driver(clips, driver_measures, name):
    _, frames = clips[name]
    drawn = np.array([_drawn_yaw(frame) for frame in frames[1:]])
    driver = driver_measures[name][:, 1]
    drawn_turn, driver_turn = drawn - drawn[0], driver - driver[0]
    clear = np.abs(driver_turn) > 0.1  # turns of more than ~5 degrees
    assert clear.sum() >= 5
    np.testing.assert_array_equal(np.sign(drawn_turn[clear]), np.sign(driver_turn[clear]))
    assert np.corrcoef(drawn_turn, driver_turn)[0, 1] >= 0.9


def test_frame0_is_the_references_own_landmarks(clips, reference_image, landmarker_path):
    plan, frames = clips["drive_7"]
    frame0 = frames[0]
    # Independent detection on the whole canvas: every drawn line pixel lies within 3 px of its own polyline.
    with Landmarker(landmarker_path) as landmarker:
        points = landmarker.detect(crop_and_resize(reference_image)).points[:, :2]
    for edges, colour in draw.EDGE_GROUPS:
        near = np.zeros(frame0.shape[:2], np.uint8)
        for a, b in edges:
            cv2.line(near, tuple(map(int, points[a])), tuple(map(int, points[b])), 1, 7)
        drawn = _colour_mask(frame0, [colour])
        assert drawn.sum() > 0 and near[drawn].all(), colour
    # Frame-0 style markers, and frame 1 (the driver's frame 0, relative motion) draws the same lines.
    assert _colour_mask(frame0, [draw.REFERENCE_STYLE.nose_colour]).sum() == 16
    assert _colour_mask(frame0, [draw.DRIVING_STYLE.nose_colour]).sum() == 0
    assert _colour_mask(frames[1], [draw.DRIVING_STYLE.nose_colour]).sum() == 25
    lines = [colour for _, colour in draw.EDGE_GROUPS]
    np.testing.assert_array_equal(_colour_mask(frame0, lines), _colour_mask(frames[1], lines))
    assert not np.array_equal(frame0, frames[1])


def test_only_the_spec_colours_are_drawn(clips):
    allowed = {(0, 0, 0)} | set(draw.SPEC_COLOURS)
    seen = set()
    for _, frames in clips.values():
        packed = np.unique(frames.reshape(-1, 3).astype(np.uint32) @ np.array([1 << 16, 1 << 8, 1], np.uint32))
        colours = {(int(c >> 16), int(c >> 8 & 255), int(c & 255)) for c in packed}
        assert colours <= allowed, colours - allowed
        seen |= colours
        for edges, colour in draw.EDGE_GROUPS[:4]:  # eyes and brows never hide behind another group
            assert _colour_mask(frames, [colour]).any(axis=(1, 2)).all()
    assert seen == allowed  # and every one of them is used


def test_clip_order_duplicates_first_and_pads_short_videos(clips):
    plan, frames = clips["drive_1"]  # 40 sampled frames: shorter than one clip
    num_sampled = len(plan.source_indices)
    assert frames.shape == (49, 480, 720, 3) and frames.dtype == np.uint8
    assert num_sampled < 48
    np.testing.assert_array_equal(frames[1], frames[2])  # [f0, f0, f1, ...]
    assert not np.array_equal(frames[2], frames[3])
    for padded in frames[num_sampled + 2:]:  # ... f_{n-1} repeated to the end
        np.testing.assert_array_equal(padded, frames[num_sampled + 1])
    np.testing.assert_array_equal(clip_order(100, 49), np.concatenate([[0], np.arange(47)]))
    np.testing.assert_array_equal(clip_order(30, None), np.arange(30))


def test_faceless_frames_are_filled(tmp_path, shared, reference_image, landmarker_path):
    frames = list(read_frames(str(shared / "data" / "driving" / "drive_7.mp4"), range(0, 48, 2)))
    for i in (5, 6, 7):
        frames[i] = np.zeros_like(frames[i])
    path = str(tmp_path / "gaps.mp4")
    write_video(path, frames, fps=12)
    plan = plan_motion(reference_image, path, landmarker_path=landmarker_path, missing_face="fill")
    assert (plan.faces_found, plan.frames_filled, plan.frames_without_face) == (21, 3, (5, 6, 7))
    # Filled frames sit between their neighbours.
    between = plan.driving_points[6] - (plan.driving_points[4] + plan.driving_points[8]) / 2
    assert np.abs(between).max() < 1e-3
    # The default, as the reference's long-video script: those frames are dropped, the others keep their landmarks.
    dropped = plan_motion(reference_image, path, landmarker_path=landmarker_path)
    assert dropped.missing_face == "drop" and dropped.frames_without_face == (5, 6, 7)
    assert len(dropped.order) == len(dropped.source_indices) == 21 and dropped.frames_filled == 0
    keep = [i for i in range(24) if i not in (5, 6, 7)]
    np.testing.assert_array_equal(dropped.driving_points, plan.driving_points[keep])
    np.testing.assert_array_equal(dropped.source_indices, plan.source_indices[keep])
    # A clip reads on past the faceless frames until it has its 47 driving frames' worth (here: all 21 there are).
    clip = plan_motion(reference_image, path, landmarker_path=landmarker_path, max_frames=12)
    assert clip.frames_without_face == (5, 6, 7) and len(clip.source_indices) == 10
    np.testing.assert_array_equal(clip.source_indices, plan.source_indices[keep[:10]])


# ---------------------------------------------------------------------------------------------------------- command
def _cli(args, shared, capsys):
    code = main(["landmarks", "--landmarker", str(shared / "models" / "face_landmarker.task"), *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_command_long_mode_and_one_clip(tmp_path, shared, capsys, clips):
    import json

    driving = str(shared / "data" / "driving" / "drive_1.mp4")
    ref = str(shared / "data" / "portraits" / "ref_1.png")
    code, out, _ = _cli(["--ref", ref, "--driving", driving, "--out", str(tmp_path / "long.mp4")], shared, capsys)
    info = probe_video(driving)
    result = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and result["ok"] and result["fps"] == 12
    assert result["frames"] == 1 + len(resample_indices(info.num_frames, info.fps))  # no duplication in long mode
    assert probe_video(str(tmp_path / "long.mp4")).num_frames == result["frames"]

    code, out, _ = _cli(["--ref", ref, "--driving", driving, "--out", str(tmp_path / "clip.mp4"), "--max-frames", "49",
                         "--frames-dir", str(tmp_path / "png"), "--preview", str(tmp_path / "preview.mp4")],
                        shared, capsys)
    result = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and result["frames"] == 49 and result["faces_found"] == 40
    assert result["driving_frames"] == 48 and result["missing_face"] == "drop" and result["frames_without_face"] == []
    written = probe_video(str(tmp_path / "clip.mp4"))
    assert (written.num_frames, written.height, written.width) == (49, 480, 720)
    preview = probe_video(str(tmp_path / "preview.mp4"))
    assert (preview.num_frames, preview.height, preview.width) == (49, 480, 720 + 480 + 720)
    pngs = sorted(os.listdir(tmp_path / "png"))
    assert len(pngs) == 49
    _, frames = clips["drive_1"]
    for i in (0, 1, 30):  # lossless PNG = the library's control frames
        np.testing.assert_array_equal(read_image(str(tmp_path / "png" / pngs[i])), frames[i])


def _blank_video(path, count=24):
    write_video(str(path), [np.full((240, 320, 3), 128, np.uint8)] * count, fps=12)


@pytest.mark.parametrize("case, message", [
    ("missing_ref", "image not found"),
    ("missing_driving", "video not found"),
    ("corrupt_video", "cannot read video"),
    ("bad_image", "cannot read image"),
    ("no_face_portrait", "no face found"),
    ("faceless_driving", "no face in 24 of 24"),
    ("bad_max_frames", "--max-frames"),
    ("bad_output_folder", "does not exist"),
])
def test_bad_inputs_are_one_line_user_errors(tmp_path, shared, capsys, case, message):
    ref = str(shared / "data" / "portraits" / "ref_1.png")
    driving = str(shared / "data" / "driving" / "drive_7.mp4")
    extra = []
    if case == "missing_ref":
        ref = str(tmp_path / "nope.png")
    elif case == "missing_driving":
        driving = str(tmp_path / "nope.mp4")
    elif case == "corrupt_video":
        driving = str(tmp_path / "garbage.mp4")
        (tmp_path / "garbage.mp4").write_bytes(os.urandom(20000))
    elif case == "bad_image":
        ref = str(tmp_path / "garbage.png")
        (tmp_path / "garbage.png").write_bytes(os.urandom(2000))
    elif case == "no_face_portrait":
        ref = str(tmp_path / "blank.png")
        cv2.imwrite(ref, np.full((600, 800, 3), 90, np.uint8))
    elif case == "faceless_driving":
        driving = str(tmp_path / "blank.mp4")
        _blank_video(driving)
    elif case == "bad_max_frames":
        extra = ["--max-frames", "1"]
    out_path = str(tmp_path / ("missing_dir/o.mp4" if case == "bad_output_folder" else "o.mp4"))
    code, out, err = _cli(["--ref", ref, "--driving", driving, "--out", out_path, *extra], shared, capsys)
    assert code == 2 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_packaged_landmarker_is_the_default_and_checked(tmp_path, monkeypatch, shared):
    monkeypatch.delenv(landmarker.ENV_VAR, raising=False)
    packaged = landmarker.find_landmarker_model()
    assert packaged == landmarker.PACKAGED_MODEL
    assert (pathlib.Path(packaged).read_bytes() == (shared / "models" / "face_landmarker.task").read_bytes())
    damaged = tmp_path / "face_landmarker.task"
    data = bytearray(pathlib.Path(packaged).read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    monkeypatch.setattr(landmarker, "PACKAGED_MODEL", str(damaged))
    with pytest.raises(UserError, match="damaged"):
        landmarker.find_landmarker_model()
    monkeypatch.setenv(landmarker.ENV_VAR, str(tmp_path / "absent.task"))
    with pytest.raises(UserError, match="landmarker model not found"):
        landmarker.find_landmarker_model()


def test_landmarks_runs_without_landmarker_argument_in_a_fresh_environment(tmp_path, shared):
    env = {k: v for k, v in os.environ.items() if k != "A1_JAX_LANDMARKER"}
    env["HOME"] = str(tmp_path)
    process = subprocess.run(
        [sys.executable, "-m", "a1_jax", "landmarks", "--ref", str(shared / "data" / "portraits" / "ref_1.png"),
         "--driving", str(shared / "data" / "driving" / "drive_7.mp4"), "--out", str(tmp_path / "o.mp4"),
         "--max-frames", "5"], env=env, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr
    assert json.loads(process.stdout.strip().splitlines()[-1])["frames"] == 5


def test_library_rejects_a_faceless_driver_before_drawing(tmp_path, reference_image, landmarker_path):
    mostly_blank = str(tmp_path / "mostly_blank.mp4")
    _blank_video(mostly_blank, count=12)
    with pytest.raises(UserError, match="at least half"):
        plan_motion(reference_image, mostly_blank, landmarker_path=landmarker_path)
