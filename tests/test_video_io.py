"""Video/image IO: the reference's 12 fps resampling, streaming decode, mp4 round trip, unreadable files."""

import inspect

import numpy as np
import pytest

from a1_jax.errors import UserError
from a1_jax.io import probe_video, read_frames, read_image, resample_indices, write_png, write_video


@pytest.mark.parametrize("num_frames, fps", [(120, 24.0), (120, 12.0), (300, 29.97), (10, 6.0)])
def test_resampling_picks_the_frame_showing_at_each_twelfth_of_a_second(num_frames, fps):
    indices = resample_indices(num_frames, fps)
    assert len(indices) == int(np.ceil(num_frames / fps * 12))  # one frame every 1/12 s over the whole duration
    assert np.all(np.diff(indices) >= 0) and 0 <= indices.min() and indices.max() < num_frames
    # Truncating arange(0, n/fps, 1/12)·fps, as the reference: the frame at t, or (float round-off) one before.
    exact = np.arange(len(indices)) * fps / 12
    assert np.all((indices <= np.floor(exact + 1e-9)) & (indices >= np.floor(exact + 1e-9) - 1))


def test_resampling_a_slow_video_repeats_frames():
    indices = resample_indices(10, 6.0)  # 6 fps -> 12 fps: every frame shown for 1/6 s
    assert set(indices.tolist()) == set(range(10))
    assert np.bincount(indices).sum() == 20 and np.bincount(indices).max() <= 3


def _synthetic_video(path, count=20, size=(48, 64), fps=24.0):
    """Frames whose index is written in their brightness, robust to lossy coding."""
    frames = [np.full((*size, 3), 10 * i, np.uint8) for i in range(count)]
    write_video(str(path), frames, fps=fps)
    return frames


def test_write_then_read_round_trip(tmp_path):
    path = tmp_path / "v.mp4"
    _synthetic_video(path)
    info = probe_video(str(path))
    assert (info.num_frames, info.height, info.width) == (20, 48, 64)
    assert info.fps == pytest.approx(24.0)
    indices = resample_indices(info.num_frames, info.fps)
    brightness = [frame.mean() / 10 for frame in read_frames(str(path), indices)]
    np.testing.assert_allclose(brightness, indices, atol=0.5)


def test_read_frames_streams_and_repeats(tmp_path):
    path = tmp_path / "v.mp4"
    _synthetic_video(path)
    stream = read_frames(str(path), [0, 0, 3, 3, 3, 19])
    assert inspect.isgenerator(stream)  # lazily decoded: nothing is held beyond the current frame
    frames = list(stream)
    assert [round(f.mean() / 10) for f in frames] == [0, 0, 3, 3, 3, 19]
    assert frames[0].dtype == np.uint8 and frames[0].shape == (48, 64, 3)
    assert len(list(read_frames(str(path), [5, 25]))) == 1  # past the end: stops instead of failing


def test_image_round_trip_is_lossless_rgb(tmp_path):
    image = np.zeros((8, 6, 3), np.uint8)
    image[..., 0] = 250  # red must stay in channel 0
    image[2, 3] = (10, 200, 180)
    write_png(str(tmp_path / "a.png"), image)
    np.testing.assert_array_equal(read_image(str(tmp_path / "a.png")), image)


def test_unreadable_files_are_user_errors(tmp_path):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(UserError, match="cannot read video"):
        probe_video(str(garbage))
    with pytest.raises(UserError, match="not found"):
        probe_video(str(tmp_path / "missing.mp4"))
    bad_image = tmp_path / "bad.png"
    bad_image.write_bytes(b"not a png at all")
    with pytest.raises(UserError, match="cannot read image"):
        read_image(str(bad_image))
    with pytest.raises(UserError, match="not found"):
        read_image(str(tmp_path / "missing.png"))
    with pytest.raises(UserError, match="folder .* does not exist"):
        write_video(str(tmp_path / "no" / "such" / "dir.mp4"), [np.zeros((8, 8, 3), np.uint8)])


def test_a_failed_write_leaves_nothing_behind_and_keeps_an_existing_video(tmp_path):
    from a1_jax.io.video import VideoWriter

    path = tmp_path / "out.mp4"
    write_video(str(path), [np.full((32, 48, 3), 200, np.uint8)] * 4, fps=12)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="mid-run"):
        with VideoWriter(str(path), 12) as writer:
            for _ in range(3):
                writer.write(np.zeros((32, 48, 3), np.uint8))
            raise RuntimeError("mid-run failure")
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]
    with VideoWriter(str(path), 12) as writer:  # a clean run replaces it
        for _ in range(5):
            writer.write(np.zeros((32, 48, 3), np.uint8))
    assert probe_video(str(path)).num_frames == 5 and sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]
