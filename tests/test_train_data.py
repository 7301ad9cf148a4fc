"""Training data: `a1-jax make-dataset` on the sample drivers (plus a corrupt and a face-less video), the records it
writes, the TFDS builder over the same files, and the Grain pipeline (determinism, resume, host sharding, dropout,
windows and resizing). The dataset is made once per session."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest

from a1_jax.cli import main
from a1_jax.io import probe_video, read_frames, resample_indices, write_video
from a1_jax.motion import draw
from a1_jax.motion.pipeline import control_video, plan_motion_frames, render_control
from a1_jax.motion.reference import crop_and_resize
from a1_jax.train.data import records
from a1_jax.train.data.pipeline import training_dataset
from a1_jax.train.data.writer import clip_ranges, make_dataset, process_video

DRIVERS = ("drive_1", "drive_4", "drive_7")


# ---------------------------------------------------------------------------------------------------------- helpers
def _read_records(folder) -> list[records.ClipRecord]:
    from array_record.python.array_record_data_source import ArrayRecordDataSource

    paths = records.shard_paths(str(folder), records.read_index(str(folder)))
    source = ArrayRecordDataSource(paths)
    return [records.parse_clip(source[i]) for i in range(len(source))]


def _batches(folder, count: int, **options) -> list[dict]:
    settings = dict(batch_size=2, frames=5, height=32, width=48, seed=0, shard_index=0, shard_count=1)
    settings.update(options)
    iterator = iter(training_dataset(str(folder), **settings))
    return [next(iterator) for _ in range(count)]


def _equal(first: list[dict], second: list[dict]) -> bool:
    return len(first) == len(second) and all(
        a.keys() == b.keys() and all(np.array_equal(a[key], b[key]) for key in a) for a, b in zip(first, second))


def _canvases(path: str, indices) -> list[np.ndarray]:
    return [crop_and_resize(frame) for frame in read_frames(path, indices)]


def _to_uint8(frames: np.ndarray) -> np.ndarray:
    return np.rint((frames + 1.0) / 2.0 * 255.0).astype(np.uint8)


def _tiny_dataset(folder: pathlib.Path, num_clips: int, frames: int) -> None:
    """A folder of synthetic 8×12 clips in the writer's format (fast to decode: for statistics over many draws)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    shard = pathlib.Path(records.dataset_dir(str(folder))) / records.shard_name(0, 1)
    shard.parent.mkdir(parents=True)
    writer = ArrayRecordWriter(str(shard), "group_size:1")
    image = np.full((8, 12, 3), 128, np.uint8)
    for clip in range(num_clips):
        writer.write(records.serialize_clip(records.ClipRecord(
            video=[records.encode_jpeg(image)] * frames, control=[records.encode_png(image)] * frames,
            face=records.encode_jpeg(image), source=f"v{clip}.mp4", clip_index=0, frame_indices=np.arange(frames))))
    writer.close()
    records.write_index(str(folder), {
        "format": records.INDEX_FORMAT, "version": records.VERSION, "clip_frames": 49,
        "shards": [{"path": str(shard.relative_to(folder)), "clips": num_clips}],
        "clips": [{"source": f"v{clip}.mp4", "clip": 0, "frames": frames} for clip in range(num_clips)]})


# --------------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def videos(shared, tmp_path_factory) -> pathlib.Path:
    folder = tmp_path_factory.mktemp("videos")
    for name in DRIVERS:
        (folder / f"{name}.mp4").symlink_to(shared / "data" / "driving" / f"{name}.mp4")
    (folder / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    write_video(str(folder / "black.mp4"), [np.zeros((64, 96, 3), np.uint8)] * 24, fps=12)  # 24 frames: one clip
    return folder


@pytest.fixture(scope="session")
def dataset(videos, landmarker_path, tmp_path_factory) -> tuple[pathlib.Path, dict]:
    out = tmp_path_factory.mktemp("dataset") / "clips"
    summary = make_dataset(str(videos), str(out), landmarker_path=landmarker_path, clips_per_shard=3)
    return out, summary


@pytest.fixture(scope="session")
def clips(dataset) -> list[records.ClipRecord]:
    return _read_records(dataset[0])


# ------------------------------------------------------------------------------------------------------------ writer
def test_data_clip_ranges_rule():
    assert clip_ranges(12) == []
    assert clip_ranges(13) == [(0, 13)]
    assert clip_ranges(49) == [(0, 49)]
    assert clip_ranges(61) == [(0, 49)]  # a 12-frame tail is dropped
    assert clip_ranges(62) == [(0, 49), (49, 62)]
    assert clip_ranges(147) == [(0, 49), (49, 98), (98, 147)]


def test_data_writer_counts_clips_and_reports_skipped(dataset, videos):
    out, summary = dataset
    index = records.read_index(str(out))
    expected = []  # (source, clip, source frames) from each video's 12-fps frames and the documented rule
    for name in DRIVERS:
        info = probe_video(str(videos / f"{name}.mp4"))
        sampled = resample_indices(info.num_frames, info.fps)
        full, tail = divmod(len(sampled), 49)
        for clip in range(full + (tail >= 13)):
            expected.append((f"{name}.mp4", clip, sampled[49 * clip:49 * (clip + 1)].tolist()))
    assert [(c["source"], c["clip"], c["source_frames"]) for c in index["clips"]] == expected
    assert summary["videos"] == 5 and summary["clips"] == len(expected) == index["num_clips"] == 4
    assert [c["frames"] for c in index["clips"]] == [len(frames) for _, _, frames in expected]
    reasons = {entry["file"]: entry["reason"] for entry in summary["skipped"]}
    assert set(reasons) == {"corrupt.mp4", "black.mp4"} and len(summary["skipped"]) == 2
    assert "cannot read video" in reasons["corrupt.mp4"] and "no face" in reasons["black.mp4"]
    assert index["skipped"] == summary["skipped"]
    assert [s["clips"] for s in index["shards"]] == [3, 1]  # clips_per_shard=3
    assert summary["bytes"] == sum((out / s["path"]).stat().st_size for s in index["shards"])
    # compact: JPEG canvas + PNG control frames, well under 3 MB for 49 frames (raw: 2 × 49 × 1 MB)
    assert 0 < summary["bytes_per_clip"] < 3_000_000


def test_data_writer_skips_a_faceless_clip_and_keeps_the_rest(shared, landmarker_path, tmp_path):
    driver = str(shared / "data" / "driving" / "drive_4.mp4")
    faces = list(read_frames(driver, range(20)))
    frames = [np.zeros_like(faces[0])] * 49 + faces  # at 12 fps: clip 0 is black, clip 1 (20 frames) has a face
    write_video(str(tmp_path / "half.mp4"), frames, fps=12)
    result = process_video(str(tmp_path), "half.mp4", landmarker_path)
    assert [entry["clip"] for entry, _ in result.clips] == [1]
    info = probe_video(str(tmp_path / "half.mp4"))
    assert result.clips[0][0]["source_frames"] == resample_indices(info.num_frames, info.fps)[49:69].tolist()
    assert len(result.skipped) == 1 and result.skipped[0]["clip"] == 0 and "no face" in result.skipped[0]["reason"]


def test_data_records_decode_to_shapes(dataset, clips):
    index = records.read_index(str(dataset[0]))
    assert len(clips) == len(index["clips"])
    for clip, entry in zip(clips, index["clips"]):
        assert (clip.source, clip.clip_index, clip.frame_indices.tolist()) == (
            entry["source"], entry["clip"], entry["source_frames"])
        assert len(clip.video) == len(clip.control) == entry["frames"]
        for frame in (clip.video[0], clip.video[-1], clip.control[0], clip.control[-1]):
            assert records.decode_image(frame).shape == (480, 720, 3)
        assert records.decode_image(clip.face).shape == (512, 512, 3)


def test_data_records_match_the_motion_branch(clips, videos, landmarker_path):
    """Control frame 0 is what `control_video` draws for the reference frame; the clip's other control frames and
    its canvas frames are the motion branch's on the same frames (PNG exact, JPEG close)."""
    for clip in clips:
        path = str(videos / clip.source)
        reference = _canvases(path, clip.frame_indices[:1])[0]
        expected = control_video(reference, path, landmarker_path=landmarker_path, max_frames=2)[0]
        np.testing.assert_array_equal(records.decode_image(clip.control[0]), expected)

    clip = next(c for c in clips if c.source == "drive_7.mp4" and c.clip_index == 1)  # a clip not at the start
    path = str(videos / clip.source)
    canvases = _canvases(path, clip.frame_indices)
    fps = probe_video(path).fps
    plan = plan_motion_frames(canvases[0], canvases, [int(round(i * 1000 / fps)) for i in clip.frame_indices],
                              np.arange(1, len(canvases)), landmarker_path=landmarker_path)
    for stored, drawn in zip(clip.control, render_control(plan), strict=True):
        np.testing.assert_array_equal(records.decode_image(stored), drawn)
    decoded = np.stack([records.decode_image(frame) for frame in clip.video]).astype(np.float64)
    assert np.abs(decoded - np.stack(canvases)).mean() < 2.0  # JPEG quality 95


def test_data_tfds_builder_reads_the_writer_output(dataset, clips):
    import tensorflow_datasets as tfds

    import a1_jax.train.data.tfds_builder  # noqa: F401  registers "a1_clips"

    source = tfds.data_source("a1_clips", data_dir=str(dataset[0]), split="train")
    assert len(source) == len(clips)
    for position in (0, len(clips) - 1):
        example, clip = source[position], clips[position]
        assert example["source"].decode() == clip.source and example["clip_index"] == clip.clip_index
        np.testing.assert_array_equal(example["frame_indices"], clip.frame_indices)
        np.testing.assert_array_equal(example["face"], records.decode_image(clip.face))
        for key in ("video", "control"):
            assert len(example[key]) == len(getattr(clip, key))
            for i in (0, len(example[key]) // 2, len(example[key]) - 1):
                np.testing.assert_array_equal(example[key][i], records.decode_image(getattr(clip, key)[i]))
    again = tfds.data_source("a1_clips", data_dir=str(dataset[0]), split="train", download=False)  # metadata kept
    assert again[1]["source"] == source[1]["source"]


# ------------------------------------------------------------------------------------------------------------- grain
def test_data_pipeline_is_deterministic_from_the_seed(dataset):
    first = _batches(dataset[0], 3, seed=7)
    assert _equal(first, _batches(dataset[0], 3, seed=7))
    assert not _equal(first, _batches(dataset[0], 3, seed=8))
    batch = first[0]
    assert batch["video"].shape == batch["control"].shape == (2, 5, 32, 48, 3)
    assert batch["video"].dtype == batch["control"].dtype == np.float32
    assert batch["face"].shape == (2, 512, 512, 3) and batch["face"].dtype == np.uint8
    assert batch["drop_face"].shape == (2,) and batch["drop_face"].dtype == bool
    assert -1.0 <= batch["video"].min() and batch["video"].max() <= 1.0


def test_data_pipeline_state_restores_the_exact_batches(dataset):
    settings = dict(batch_size=2, frames=5, height=32, width=48, seed=3, shard_index=0, shard_count=1)
    uninterrupted = _batches(dataset[0], 6, **settings)  # 4 clips, batch 2: crosses two epoch boundaries
    iterator = iter(training_dataset(str(dataset[0]), **settings))
    for _ in range(3):
        next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))  # as a checkpoint stores it
    resumed = iter(training_dataset(str(dataset[0]), **settings))
    resumed.set_state(state)
    assert _equal([next(resumed) for _ in range(3)], uninterrupted[3:])


def test_data_pipeline_host_shards_are_disjoint_and_cover(dataset):
    settings = dict(batch_size=1, frames=5, height=16, width=24, seed=5, num_epochs=1)
    whole = _batches(dataset[0], 4, shard_index=0, shard_count=1, **settings)
    hosts = [list(training_dataset(str(dataset[0]), shard_index=h, shard_count=2, **settings)) for h in (0, 1)]
    clip_ids = [[int(b["clip"][0]) for b in host] for host in hosts]
    assert not set(clip_ids[0]) & set(clip_ids[1])
    assert sorted(clip_ids[0] + clip_ids[1]) == list(range(4))
    for h in (0, 1):  # one global stream: host h holds its positions h, h+2, … exactly as a single host sees them
        assert _equal(hosts[h], whole[h::2])


def test_data_pipeline_window_and_resizing(dataset, clips):
    batches = _batches(dataset[0], 2, batch_size=2, frames=9, height=64, width=96, seed=11)
    lengths = [len(clip.video) for clip in clips]
    colours = {tuple(c) for c in draw.SPEC_COLOURS} | {(0, 0, 0)}
    for batch in batches:
        for b in range(2):
            picks, clip = batch["frames"][b], clips[int(batch["clip"][b])]
            assert picks[0] == 0 and np.array_equal(picks[1:], picks[1] + np.arange(8))
            assert 1 <= picks[1] and picks[-1] < lengths[int(batch["clip"][b])]
            for t in (0, 8):  # the same frame, resized as documented: area for RGB, nearest for control
                rgb = cv2.resize(records.decode_image(clip.video[picks[t]]), (96, 64), interpolation=cv2.INTER_AREA)
                np.testing.assert_array_equal(_to_uint8(batch["video"][b, t]), rgb)
                control = cv2.resize(records.decode_image(clip.control[picks[t]]), (96, 64),
                                     interpolation=cv2.INTER_NEAREST)
                np.testing.assert_array_equal(_to_uint8(batch["control"][b, t]), control)
        control = _to_uint8(batch["control"]).reshape(-1, 3)
        assert {tuple(c) for c in np.unique(control, axis=0)} <= colours  # nearest keeps only the spec's colours
        assert (control != 0).any()
    long_only = _batches(dataset[0], 2, batch_size=1, frames=45, height=16, width=24, seed=0)
    assert {int(b["clip"][0]) for b in long_only} == {i for i, n in enumerate(lengths) if n >= 45}


def test_data_face_dropout_rate_is_the_configured_probability(tmp_path):
    _tiny_dataset(tmp_path, num_clips=1000, frames=3)  # grain's index shuffle is slow (~3 ms) on tiny datasets
    n, p = 2000, 0.1
    settings = dict(batch_size=100, frames=2, height=8, width=12, seed=1)
    flags = np.concatenate([b["drop_face"] for b in _batches(tmp_path, n // 100, face_dropout=p, **settings)])
    assert abs(flags.sum() - n * p) <= 4 * np.sqrt(n * p * (1 - p))  # a 4-sigma binomial bound
    assert not _batches(tmp_path, 2, face_dropout=0.0, **settings)[1]["drop_face"].any()
    assert _batches(tmp_path, 2, face_dropout=1.0, **settings)[1]["drop_face"].all()


# --------------------------------------------------------------------------------------------------------------- CLI
def test_data_cli_end_to_end_with_workers(dataset, clips, shared, landmarker_path, tmp_path, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "drive_4.mp4").symlink_to(shared / "data" / "driving" / "drive_4.mp4")
    (videos / "corrupt.mp4").write_bytes(b"not a video" * 100)
    out = tmp_path / "data"
    argv = ["make-dataset", "--videos", str(videos), "--out", str(out), "--landmarker", landmarker_path]
    assert main(argv + ["--workers", "2"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["videos"], summary["clips"]) == (2, 1)
    assert [entry["file"] for entry in summary["skipped"]] == ["corrupt.mp4"]
    # worker processes write the same bytes as the in-process session dataset
    (made,) = _read_records(out)
    assert records.serialize_clip(made) == records.serialize_clip(next(c for c in clips if c.source == "drive_4.mp4"))

    assert main(argv) == 0  # the same command on the finished folder reports it
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again.pop("existing") and {k: v for k, v in again.items() if k != "seconds"} == {
        k: v for k, v in summary.items() if k != "seconds"}
    (videos / "corrupt.mp4").unlink()
    assert main(argv) == 2  # other videos into a finished folder
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a dataset of other videos" in err[0]

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["make-dataset", "--videos", str(videos), "--out", str(blocker / "data")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert "cannot write the dataset" in captured.err


def test_data_make_dataset_killed_early_then_rerun_completes(dataset, clips, shared, landmarker_path, tmp_path):
    """`make-dataset` SIGKILLed while its first shard is being written (the second video not yet done): the same
    command again clears what it left and completes; the records equal an uninterrupted run's, nothing partial is
    left."""
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("drive_1", "drive_4"):
        (videos / f"{name}.mp4").symlink_to(shared / "data" / "driving" / f"{name}.mp4")
    out = tmp_path / "data"
    command = [sys.executable, "-m", "a1_jax", "make-dataset", "--videos", str(videos), "--out", str(out),
               "--landmarker", landmarker_path, "--clips-per-shard", "1"]
    partial = pathlib.Path(records.dataset_dir(str(out)) + ".partial")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None and not (partial.is_dir() and os.listdir(partial)):
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL, "make-dataset finished before it could be killed"
    assert os.listdir(partial) and not (out / records.INDEX_FILE).exists()

    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert (summary["videos"], summary["clips"], summary["shards"]) == (2, 2, 2) and "existing" not in summary
    assert not partial.exists()
    made = {clip.source: records.serialize_clip(clip) for clip in _read_records(out)}
    assert made == {c.source: records.serialize_clip(c) for c in clips if c.source in made} and len(made) == 2
