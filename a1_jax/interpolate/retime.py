"""Re-timing a video to any frame rate N ≥ 12 with exact timestamps, and `a1-jax interpolate`.

Output frame k shows time k / N. Source frame i is shown from i / fps to (i + 1) / fps, so output frame k is
made from source frames i = ⌊k·fps/N⌋ and i + 1 at t = k·fps/N − i: the source frame itself where t = 0, an
in-between otherwise, the last source frame held through its own duration. The output lasts as long as the input
(to within one output frame), so audio on the same timeline stays in sync at every rate. Unlike the reference, which
makes `ceil(N/12) − 1` in-betweens per pair and then drops frames to reach a rate that is not a multiple of 12, every
frame here sits at its own time: no judder at 25, 30 or 50 fps.
"""

from __future__ import annotations

import collections
import concurrent.futures
import math
import os
import time
from typing import Iterable, Iterator

import numpy as np

from a1_jax.errors import UserError
from a1_jax.interpolate.base import Interpolator

MIN_FPS = 12  # the model's rate: re-timing is for smoother output, not for dropping frames below it
MAX_FPS = 240
_EPS = 1e-6  # in source frames: a time this close to a source frame is that frame


def parse_fps(text: str | float) -> float:
    """`--fps` as a number in [MIN_FPS, MAX_FPS]; UserError otherwise."""
    try:
        fps = float(text)
    except (TypeError, ValueError):
        raise UserError(f"--fps must be a number, got {text!r}") from None
    if not math.isfinite(fps) or fps < MIN_FPS or fps > MAX_FPS:
        raise UserError(f"--fps must be between {MIN_FPS} and {MAX_FPS} frames per second, got {text}")
    return fps


def retimed_length(num_frames: int, fps_in: float, fps_out: float) -> int:
    """How many frames `retime` makes of `num_frames` at `fps_in`: those whose time k / fps_out is in the input."""
    return max(0, math.ceil((num_frames - _EPS) * fps_out / fps_in))


def _pairs(frames: Iterable[np.ndarray], step: float) -> Iterator[tuple[np.ndarray, np.ndarray | None, list[float]]]:
    """`(frame i, frame i + 1, times)` for every source pair, `times` those of the output frames between them
    (`step` source frames apart); `(last frame, None, times)` for the output frames in the last frame's duration."""
    k, previous, index = 0, None, -1
    for index, frame in enumerate(frames):
        if previous is not None:
            times = []
            while k * step < index - _EPS:
                t = k * step - (index - 1)
                times.append(0.0 if t < _EPS else t)
                k += 1
            yield previous, frame, times
        previous = frame
    if previous is not None:
        times = [0.0] * (retimed_length(index + 1, 1.0, 1.0 / step) - k)
        yield previous, None, times


def retime(frames: Iterable[np.ndarray], fps_in: float, fps_out: float, interpolator: Interpolator,
           workers: int | None = None) -> Iterator[np.ndarray]:
    """`frames` at `fps_in` re-timed to `fps_out` (see the module docstring), streamed.

    `workers` > 1 interpolates that many source pairs at once in threads (OpenCV and NumPy release the GIL), keeping
    at most twice that many pairs in memory; the output order is the input's. Default: one per core this process
    may use (at most 4) if the interpolator allows it, else 1.
    """
    step = fps_in / fps_out
    if workers is None:
        workers = default_workers() if interpolator.parallel else 1

    def frames_of(a: np.ndarray, b: np.ndarray | None, times: list[float]) -> np.ndarray | list[np.ndarray]:
        if b is None or all(t == 0 for t in times):
            return [a] * len(times)
        return interpolator(a, b, times)

    if workers <= 1:
        for pair in _pairs(frames, step):
            yield from frames_of(*pair)
        return
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        pending: collections.deque = collections.deque()
        for pair in _pairs(frames, step):
            pending.append(pool.submit(frames_of, *pair))
            while len(pending) >= 2 * workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


def default_workers() -> int:
    """Threads for interpolation: the cores this process may use, at most 4 (a pair's work is only a few ms)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


def run_interpolate(args) -> dict:
    """`a1-jax interpolate`: `args.input` re-timed to `args.fps` into `args.out`, the input's audio kept."""
    from tqdm import tqdm

    from a1_jax.interpolate import make_interpolator
    from a1_jax.io.audio import MUX_RATE, mux_audio, read_audio
    from a1_jax.io.video import VideoWriter, probe_video, read_frames

    start = time.perf_counter()
    fps = parse_fps(args.fps)
    info = probe_video(args.input)
    interpolator = make_interpolator(args.interpolator, args.interpolator_weights)
    if os.path.abspath(args.input) == os.path.abspath(args.out):
        raise UserError(f"--out must differ from --in ({args.out}): the input is read while the output is written")
    writer = VideoWriter(args.out, fps, what="--out")  # an output that cannot be written fails here, before any work
    # The sound, decoded before any work (a broken track fails here too); muxed under the re-timed frames, whose
    # timeline is the input's.
    audio = read_audio(args.input, rate=MUX_RATE, mono=False, required=False)
    total = retimed_length(info.num_frames, info.fps, fps)
    # yuv420p needs even sides: an odd row or column at the edge is dropped.
    height, width = info.height // 2 * 2, info.width // 2 * 2
    if height == 0 or width == 0:
        raise UserError(f"cannot re-time {args.input}: frames of {info.width}x{info.height} are too small")
    written, read = 0, 0

    def source() -> Iterator[np.ndarray]:
        nonlocal read
        for frame in read_frames(args.input, range(info.num_frames)):
            read += 1
            yield frame[:height, :width]

    with writer:
        with tqdm(total=total, desc="interpolate", unit="frame", disable=None, leave=False) as bar:
            for frame in retime(source(), info.fps, fps, interpolator):
                writer.write(frame)
                written += 1
                bar.update()
        if read == 0:
            raise UserError(f"cannot read video {args.input}: no decodable frame")
    if audio is not None:
        mux_audio(args.out, audio)
    expected = retimed_length(read, info.fps, fps)
    return {"in": args.input, "out": args.out, "fps_in": round(info.fps, 6), "fps": fps, "frames_in": read,
            "frames": written, "interpolator": interpolator.name,
            "audio_seconds": None if audio is None else round(audio.duration, 3),
            "seconds": round(time.perf_counter() - start, 3), "ok": written == expected and written > 0}
