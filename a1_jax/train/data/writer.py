"""`a1-jax make-dataset`: a folder of videos -> training clips in ArrayRecord shards with a JSON index.

Cutting. Each video is resampled to 12 fps (`io.resample_indices`, as inference samples a driving video) and cut
into non-overlapping windows of 49 sampled frames from its first frame; a tail shorter than 49 frames is kept as a
shorter clip when it has at least 13 frames (the reference and one second of motion) and dropped otherwise, so a
video of S sampled frames gives `S // 49 + (S % 49 >= 13)` clips (`clip_ranges`). The training pipeline picks its
window inside a clip and skips clips shorter than its window.

Each clip (`make_clip`): its frames on the 480×720 canvas (`motion.reference.crop_and_resize`); its first frame is
the reference, whose own 2-D landmarks are control frame 0 and whose aligned 512×512 face crop
(`motion.face_align.align_face`) is stored beside it; control frame t ≥ 1 is frame t's face retargeted onto the
reference by the motion branch (`motion.pipeline.plan_motion_frames` + `render_control`, relative motion, exactly
what `a1-jax landmarks` draws). Landmarks are detected on the canvas frames, the images the model learns from.

A video that cannot be decoded, is too short, or has no usable face is skipped and reported (`skipped`: one
`{file, reason}` per skipped video; a video that gives some clips lists each failed clip as `{file, clip, reason}`).
Videos run in parallel worker processes (`workers`); results are written in sorted file order, so the folder's bytes
do not depend on the number of workers.

Interrupted runs. Shards are written into `<shard folder>.partial`, renamed to the shard folder when complete, and
`index.json` comes last: a folder without an index is unfinished, and the same command again clears what a killed
run left and starts over. The same command on a finished folder (same video names and sizes, same shard size)
reports the dataset it holds; other videos into a finished folder are a `UserError`.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import os
import shutil
import time
from typing import Iterator

import numpy as np

from a1_jax.errors import UserError
from a1_jax.io.video import TARGET_FPS, probe_video, read_frames, resample_indices
from a1_jax.motion.draw import CANVAS_HEIGHT, CANVAS_WIDTH
from a1_jax.motion.face_align import FACE_SIZE
from a1_jax.train.data import records

CLIP_FRAMES = 49  # the reference's clip length at 12 fps
MIN_CLIP_FRAMES = 13  # a tail clip needs the reference and one second of motion
CLIPS_PER_SHARD = 256  # ~0.5 GB shards at ~2 MB a 49-frame clip
VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v")


def clip_ranges(num_sampled: int) -> list[tuple[int, int]]:
    """`[start, stop)` of each clip in a video's 12-fps frames (the cutting rule of the module docstring)."""
    windows = [(start, min(start + CLIP_FRAMES, num_sampled)) for start in range(0, num_sampled, CLIP_FRAMES)]
    return [(start, stop) for start, stop in windows if stop - start >= MIN_CLIP_FRAMES]


def find_videos(videos_dir: str) -> list[str]:
    """Paths of the video files under `videos_dir` (recursive), relative to it, sorted."""
    if not os.path.isdir(videos_dir):
        raise UserError(f"videos folder not found: {videos_dir}")
    found = []
    for root, folders, files in os.walk(videos_dir):
        folders.sort()
        found += [os.path.relpath(os.path.join(root, name), videos_dir) for name in files
                  if name.lower().endswith(VIDEO_EXTENSIONS)]
    if not found:
        raise UserError(f"no video files ({', '.join(VIDEO_EXTENSIONS)}) in {videos_dir}")
    return sorted(found)


def make_clip(canvases: list[np.ndarray], source_indices: np.ndarray, fps: float, *, source: str, clip_index: int,
              landmarker_path: str, image_landmarker) -> records.ClipRecord:
    """One clip's record from its canvas frames (frame 0 = the reference); UserError if it has no usable face."""
    from a1_jax.motion.face_align import align_face
    from a1_jax.motion.pipeline import plan_motion_frames, render_control

    reference_name = f"{source} frame {int(source_indices[0])} (clip {clip_index}'s reference)"
    timestamps = [int(round(index * 1000 / fps)) for index in source_indices]
    plan = plan_motion_frames(canvases[0], canvases, timestamps, np.arange(1, len(canvases)),
                              landmarker_path=landmarker_path, driving_name=f"{source} clip {clip_index}",
                              source_indices=source_indices, reference_name=reference_name)
    control = list(render_control(plan))
    # The canvas detection prepare_reference made is not kept; IMAGE mode is stateless, so this one is the same.
    face, _ = align_face(canvases[0], reference_name, face=image_landmarker.detect(canvases[0]))
    return records.ClipRecord(video=[records.encode_jpeg(frame) for frame in canvases],
                              control=[records.encode_png(frame) for frame in control], face=records.encode_jpeg(face),
                              source=source, clip_index=clip_index, frame_indices=np.asarray(source_indices, np.int64))


@dataclasses.dataclass(frozen=True)
class VideoResult:
    """What one video gave: serialized clips with their index entries, and what was skipped."""

    clips: list[tuple[dict, bytes]]
    skipped: list[dict]


def process_video(videos_dir: str, source: str, landmarker_path: str) -> VideoResult:
    """All clips of one video, read in one streaming pass; user-level failures are reported, never raised."""
    from a1_jax.motion.landmarker import Landmarker
    from a1_jax.motion.reference import crop_and_resize

    path = os.path.join(videos_dir, source)
    try:
        info = probe_video(path)
    except UserError as e:
        return VideoResult([], [{"file": source, "reason": str(e)}])
    sampled = resample_indices(info.num_frames, info.fps)
    ranges = clip_ranges(len(sampled))
    if not ranges:
        return VideoResult([], [{"file": source, "reason": f"too short: {len(sampled)} frames at {TARGET_FPS} fps, "
                                                           f"a clip needs at least {MIN_CLIP_FRAMES}"}])
    clips, failures = [], []
    frames = read_frames(path, sampled[:ranges[-1][1]])
    with Landmarker(landmarker_path, video=False) as image_landmarker:
        for clip_index, (start, stop) in enumerate(ranges):
            canvases = [crop_and_resize(frame) for frame in itertools.islice(frames, stop - start)]
            if len(canvases) < stop - start:  # the container holds fewer frames than it claims
                failures.append({"file": source, "clip": clip_index,
                                 "reason": f"the video ends after {start + len(canvases)} of its {len(sampled)} "
                                           f"frames at {TARGET_FPS} fps"})
                break
            try:
                clip = make_clip(canvases, sampled[start:stop], info.fps, source=source, clip_index=clip_index,
                                 landmarker_path=landmarker_path, image_landmarker=image_landmarker)
            except UserError as e:
                failures.append({"file": source, "clip": clip_index, "reason": str(e)})
                continue
            data = records.serialize_clip(clip)
            entry = {"source": source, "clip": clip_index, "frames": clip.num_frames,
                     "source_frames": clip.frame_indices.tolist(), "source_fps": info.fps, "bytes": len(data)}
            clips.append((entry, data))
    if not clips:  # nothing usable: one line for the video, with the first clip's reason
        failures = [{"file": source, "reason": failures[0]["reason"]}]
    return VideoResult(clips, failures)


def _results(videos_dir: str, sources: list[str], landmarker_path: str, workers: int) -> Iterator[VideoResult]:
    """`process_video` of each source, in order; with workers, at most 2 per worker in flight (bounded memory)."""
    if workers == 1:
        for source in sources:
            yield process_video(videos_dir, source, landmarker_path)
        return
    import multiprocessing

    # spawn: a fresh interpreter per worker; forking a process that may hold MediaPipe or XLA threads is unsafe.
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pending: collections.deque = collections.deque()
        for source in sources:
            pending.append(pool.apply_async(process_video, (videos_dir, source, landmarker_path)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class ShardWriter:
    """Records in order into shards of `clips_per_shard` records, in `<directory>.partial`; `close` gives them their
    TFDS names (which need the count) and renames the folder to `directory`. Whatever an interrupted run left in
    either folder is removed first: the caller has checked that no index lists it."""

    def __init__(self, directory: str, clips_per_shard: int):
        self.final, self.directory, self.clips_per_shard = directory, directory + ".partial", clips_per_shard
        for leftover in (self.directory, self.final):
            shutil.rmtree(leftover, ignore_errors=True)
        os.makedirs(self.directory)
        self.parts: list[dict] = []  # {"path": temporary path, "clips": n, "bytes": b}
        self._writer = None

    def write(self, data: bytes) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        if self._writer is None or self.parts[-1]["clips"] == self.clips_per_shard:
            self._close_part()
            self.parts.append({"path": os.path.join(self.directory, f"part-{len(self.parts):05d}.tmp"),
                               "clips": 0, "bytes": 0})
            # One record per chunk: random access reads one clip. Frames are JPEG/PNG already: no compression.
            self._writer = ArrayRecordWriter(self.parts[-1]["path"], "group_size:1,uncompressed")
        self._writer.write(data)
        self.parts[-1]["clips"] += 1
        self.parts[-1]["bytes"] += len(data)

    def _close_part(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self, data_dir: str) -> list[dict]:
        """Names the shards, moves the folder into place; the index entries, paths relative to `data_dir`."""
        self._close_part()
        shards = []
        for number, part in enumerate(self.parts):
            name = records.shard_name(number, len(self.parts))
            os.replace(part["path"], os.path.join(self.directory, name))
            shards.append({"path": os.path.relpath(os.path.join(self.final, name), data_dir), "clips": part["clips"],
                           "bytes": os.path.getsize(os.path.join(self.directory, name))})
        os.rename(self.directory, self.final)
        return shards


def _check_output(out_dir: str) -> None:
    """UserError before any work if `out_dir` cannot be written."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, ".write-test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write the dataset to {out_dir}: {e.strerror or e}") from None


def _summary(index: dict, out_dir: str, seconds: float) -> dict:
    clips = index["clips"]
    return {"videos": index["videos"], "clips": len(clips), "skipped": index["skipped"], "shards": len(index["shards"]),
            "bytes": sum(shard["bytes"] for shard in index["shards"]),
            "bytes_per_clip": round(np.mean([clip["bytes"] for clip in clips])) if clips else 0,
            "seconds": round(seconds, 3), "out": out_dir, "ok": bool(clips)}


def make_dataset(videos_dir: str, out_dir: str, *, landmarker_path: str | None = None, workers: int = 1,
                 clips_per_shard: int = CLIPS_PER_SHARD, progress: bool = False) -> dict:
    """Write the dataset folder (layout in `records`); returns the summary `a1-jax make-dataset` prints."""
    from a1_jax.motion.landmarker import find_landmarker_model

    start_time = time.perf_counter()
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    if clips_per_shard < 1:
        raise UserError(f"--clips-per-shard must be at least 1, got {clips_per_shard}")
    sources = find_videos(videos_dir)
    model = find_landmarker_model(landmarker_path)
    request = {"sources": [{"file": source, "bytes": os.path.getsize(os.path.join(videos_dir, source))}
                           for source in sources], "clips_per_shard": clips_per_shard}
    if os.path.exists(os.path.join(out_dir, records.INDEX_FILE)):
        index = records.read_index(out_dir)
        if {key: index.get(key) for key in request} != request:
            raise UserError(f"{out_dir} already holds a dataset of other videos (or another --clips-per-shard): "
                            "remove it or choose another --out")
        return {**_summary(index, out_dir, time.perf_counter() - start_time), "existing": True}
    _check_output(out_dir)  # last check: a failed run before it leaves no folder behind

    writer = ShardWriter(records.dataset_dir(out_dir), clips_per_shard)
    clips, skipped = [], []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(sources), desc="videos", unit="video", disable=None)  # a bar on a terminal only
    for result in _results(videos_dir, sources, model, workers):
        for entry, data in result.clips:
            writer.write(data)
            clips.append(entry)
        skipped += result.skipped
        if bar is not None:
            bar.update(1)
            bar.set_postfix(clips=len(clips), skipped=len(skipped))
    if bar is not None:
        bar.close()
    index = {
        "format": records.INDEX_FORMAT, "version": records.VERSION, "fields": list(records.FIELDS),
        "fps": TARGET_FPS, "height": CANVAS_HEIGHT, "width": CANVAS_WIDTH, "face_size": FACE_SIZE,
        "clip_frames": CLIP_FRAMES, "min_clip_frames": MIN_CLIP_FRAMES, "video_encoding": "jpeg",
        "jpeg_quality": records.JPEG_QUALITY, "control_encoding": "png", "num_clips": len(clips),
        "videos": len(sources), "shards": writer.close(out_dir), "clips": clips, "skipped": skipped, **request}
    records.write_index(out_dir, index)
    return _summary(index, out_dir, time.perf_counter() - start_time)


def run_make_dataset(args) -> dict:
    """`a1-jax make-dataset`."""
    per_shard = CLIPS_PER_SHARD if args.clips_per_shard is None else args.clips_per_shard
    return make_dataset(args.videos, args.out, landmarker_path=args.landmarker, workers=args.workers,
                        clips_per_shard=per_shard, progress=True)
