"""Video and image files: streaming decode with OpenCV, the reference's 12 fps resampling, mp4/PNG writing.

Frames are RGB uint8 `[H, W, 3]` everywhere. Decoding streams: a 10-minute video is never held in memory.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import warnings
from typing import Iterable, Iterator, Sequence

import numpy as np

from a1_jax.errors import UserError

TARGET_FPS = 12  # the rate the reference samples driving videos at and writes its outputs with
VIDEO_EXTENSIONS = (".mp4",)  # what `VideoWriter` writes: H.264 (yuv420p) in an MP4 container
IMAGE_EXTENSIONS = (".png",)  # what `write_png` writes


def _require_file(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise UserError(f"{what} not found: {path}")


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What the container says: frame rate, number of frames, frame size."""

    fps: float
    num_frames: int
    height: int
    width: int


def _open(path: str):
    import cv2

    _require_file(path, "video")
    capture = cv2.VideoCapture(path)
    if not capture.isOpened():
        raise UserError(f"cannot read video {path}: not a video OpenCV can decode")
    return capture


def probe_video(path: str) -> VideoInfo:
    """Frame rate and frame count of a video; UserError if it cannot be opened or decoded."""
    import cv2

    capture = _open(path)
    try:
        fps = capture.get(cv2.CAP_PROP_FPS)
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        ok, frame = capture.read()
        if not ok or frame is None:
            raise UserError(f"cannot read video {path}: no decodable frame")
        if count <= 0:  # some containers do not store it: count by decoding (grab skips the colour conversion)
            count = 1
            while capture.grab():
                count += 1
    finally:
        capture.release()
    if not fps or not np.isfinite(fps) or fps <= 0:
        raise UserError(f"cannot read video {path}: the container has no frame rate")
    return VideoInfo(fps=float(fps), num_frames=count, height=frame.shape[0], width=frame.shape[1])


def resample_indices(num_frames: int, fps: float, target_fps: float = TARGET_FPS) -> np.ndarray:
    """Source frame indices that resample a video to `target_fps`, exactly as the reference (spec §1.4).

    `(arange(0, n/fps, 1/target) * fps).astype(int32)`, kept where `< n`; indices repeat when fps < target.
    """
    times = np.arange(0, num_frames / fps, 1 / target_fps)
    indices = (times * fps).astype(np.int32)
    return indices[indices < num_frames]


def read_frames(path: str, indices: Sequence[int]) -> Iterator[np.ndarray]:
    """Stream the frames at non-decreasing source `indices` (repeats allowed) as RGB uint8 arrays.

    Frames in between are grabbed, not converted. Stops early if the file ends before the last index.
    """
    import cv2

    indices = np.asarray(indices)
    if np.any(np.diff(indices) < 0):
        raise ValueError("read_frames needs non-decreasing indices")
    capture = _open(path)
    try:
        position, frame = -1, None  # `frame` holds source frame `position`
        for index in indices:
            while position < index:
                if not capture.grab():
                    return
                position += 1
                frame = None
            if frame is None:
                ok, bgr = capture.retrieve()
                if not ok:
                    return
                frame = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            yield frame
    finally:
        capture.release()


def read_image(path: str) -> np.ndarray:
    """An image file as RGB uint8 `[H, W, 3]` (alpha dropped, grey expanded); UserError if it cannot be decoded."""
    import cv2

    _require_file(path, "image")
    bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    if bgr is None:
        raise UserError(f"cannot read image {path}: not an image OpenCV can decode")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def check_output(path: str, what: str, extensions: Sequence[str]) -> str:
    """UserError unless `path` can take a new file of one of `extensions` (lower case, with the dot): the extension
    picks the container, the folder exists, and a file can really be created there (a probe file, created and
    removed: permission bits say nothing for root or for /proc and read-only mounts). Call it for every output before
    any work; returns the path.

    `what` names the output in messages (`"--out"`, `"preview video"`)."""
    extension = os.path.splitext(path)[1].lower()
    if extension not in extensions:
        allowed = " or ".join(extensions)
        found = f"'{extension}'" if extension else "no extension"
        raise UserError(f"{what} {path}: the extension picks the format; use {allowed} (got {found})")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UserError(f"{what} {path}: the folder {directory} does not exist")
    if os.path.isdir(path):
        raise UserError(f"{what} {path} is a folder")
    if os.path.lexists(path) and not os.path.isfile(path):
        raise UserError(f"{what} {path} exists and is not a regular file")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise UserError(f"cannot write {what} {path}: permission denied")
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".a1_jax-probe-"):
            pass
    except OSError as e:
        raise UserError(f"cannot write {what} {path}: no new file can be created in {directory} "
                        f"({e.strerror or e})") from None
    return path


def write_png(path: str, frame: np.ndarray) -> None:
    """Lossless RGB frame (mp4 blurs the 1-px coloured lines of a control frame; PNG keeps them exact)."""
    import cv2

    if not cv2.imwrite(path, cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)):
        raise UserError(f"cannot write {path}")


class VideoWriter:
    """Streaming H.264 mp4 writer (libx264, yuv420p) through imageio-ffmpeg. Frame size must be even.

    Use as a context manager; `write(frame)` takes RGB uint8 `[H, W, 3]` frames of one fixed size. Frames go to a
    hidden sibling file that replaces `path` only when the block ends without an exception: a failed run leaves no
    half-written video behind, and never clobbers an existing one. A path that cannot be written fails here, before
    any work.
    """

    def __init__(self, path: str, fps: float = TARGET_FPS, quality: float = 8, *, what: str = "output video"):
        check_output(path, what, VIDEO_EXTENSIONS)
        directory, name = os.path.split(os.path.abspath(path))
        stem, extension = os.path.splitext(name)
        self.path, self.fps, self.quality = path, fps, quality
        self._partial = os.path.join(directory, f".{stem}.partial{extension}")  # same extension: same container
        self._writer = None
        self._size: tuple[int, int] | None = None

    def write(self, frame: np.ndarray) -> None:
        import imageio_ffmpeg

        height, width = frame.shape[:2]
        if self._writer is None:
            if height % 2 or width % 2:
                raise ValueError(f"yuv420p needs even frame sizes, got {width}x{height}")
            self._size = (height, width)
            self._writer = imageio_ffmpeg.write_frames(
                self._partial, (width, height), fps=self.fps, codec="libx264", pix_fmt_out="yuv420p",
                quality=self.quality, macro_block_size=1, ffmpeg_log_level="error",
                output_params=["-preset", "veryfast"])  # 2x faster than medium, same size on mostly-black frames
            with warnings.catch_warnings():
                # ffmpeg starts with subprocess, which forks and execs at once: JAX's threads are never touched in
                # the child, so JAX's fork warning is noise, for the CLI and every script that writes a video.
                warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
                self._writer.send(None)  # start the generator (and ffmpeg)
        elif (height, width) != self._size:
            raise ValueError(f"frame size changed from {self._size} to {(height, width)}")
        self._writer.send(np.ascontiguousarray(frame, dtype=np.uint8))

    def close(self) -> None:
        """Finishes the file and moves it to `path` (nothing is written if no frame was)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            os.replace(self._partial, self.path)

    def discard(self) -> None:
        """Stops writing and removes the partial file; `path` is left as it was."""
        if self._writer is not None:
            try:
                self._writer.close()
            finally:
                self._writer = None
                if os.path.exists(self._partial):
                    os.remove(self._partial)

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()


def write_video(path: str, frames: Iterable[np.ndarray], fps: float = TARGET_FPS) -> int:
    """Write RGB frames to an mp4; returns how many were written."""
    count = 0
    with VideoWriter(path, fps) as writer:
        for frame in frames:
            writer.write(frame)
            count += 1
    return count
