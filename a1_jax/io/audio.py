"""Audio files through ffmpeg (the binary imageio-ffmpeg ships): read any audio ffmpeg decodes, mux it into an mp4.

`read_audio` decodes wav, mp3, m4a, flac, ... or the audio track of a video, at any rate, mono or stereo, into
float32 samples. `mux_audio` adds AAC audio to a finished mp4: the audio is given as segments `(start, duration)` in
seconds of the source, played one after another, so a video that skipped or repeated parts of its driving video keeps
its sound under the frames it actually shows (`frame_segments` builds them from 12-fps frame numbers).

```python
from a1_jax.io.audio import frame_segments, mux_audio, read_audio

audio = read_audio("driving.mp4", rate=48000)           # None where the file has no audio track
mux_audio("out.mp4", audio, frame_segments([0, 1, 2, 5, 6]))   # frames 3 and 4 were dropped
```
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
from typing import Sequence

import numpy as np

from a1_jax.errors import UserError

SPEECH_RATE = 16000  # what speech recognition reads
MUX_RATE = 48000  # AAC in the output mp4
_JOIN_FADE_SECONDS = 0.005  # a cut between segments fades out and in this fast: no click, no audible gap


@dataclasses.dataclass(frozen=True)
class Audio:
    """Decoded audio: `samples` float32 `[N, channels]` in [-1, 1] at `rate` Hz."""

    samples: np.ndarray
    rate: int

    @property
    def duration(self) -> float:
        return len(self.samples) / self.rate

    @property
    def mono(self) -> np.ndarray:
        """`[N]` float32, the channels averaged."""
        return self.samples.mean(axis=1).astype(np.float32)


def _ffmpeg() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def _probe(path: str) -> str:
    """ffmpeg's description of the input (its stderr when given no output)."""
    result = subprocess.run([_ffmpeg(), "-hide_banner", "-nostdin", "-i", path], capture_output=True, text=True,
                            errors="replace")
    return result.stderr


def audio_channels(path: str) -> int:
    """Channels of the first audio stream of `path` (1 or 2; more are mixed down to 2); 0 if it has no audio track.

    UserError if the file is missing, empty or not a media file ffmpeg can open."""
    if not os.path.isfile(path):
        raise UserError(f"audio file not found: {path}")
    if os.path.getsize(path) == 0:
        raise UserError(f"cannot read audio {path}: the file is empty")
    info = _probe(path)
    if not re.search(r"^\s*Stream #", info, re.MULTILINE):
        reason = info.strip().splitlines()[-1] if info.strip() else "no streams"
        raise UserError(f"cannot read audio {path}: not a media file ffmpeg can decode ({reason.split(': ')[-1]})")
    match = re.search(r"Stream #[^\n]*Audio: [^\n]*", info)
    if match is None:
        return 0
    layout = match.group(0)
    return 1 if re.search(r"\bmono\b|\b1 channels\b", layout) else 2


def read_audio(path: str, *, rate: int = SPEECH_RATE, mono: bool = True, required: bool = True) -> Audio | None:
    """The first audio track of `path` resampled to `rate` Hz, mono (channels averaged) or as stored (≤ 2 channels).

    A file without an audio track is a UserError when `required` (`--audio`), else None (a silent driving video)."""
    channels = audio_channels(path)
    if channels == 0:
        if required:
            raise UserError(f"{path} has no audio track")
        return None
    channels = 1 if mono else channels
    command = [_ffmpeg(), "-nostdin", "-v", "error", "-i", path, "-map", "0:a:0", "-vn", "-ac", str(channels),
               "-ar", str(rate), "-f", "f32le", "-"]
    result = subprocess.run(command, capture_output=True)
    if result.returncode != 0:
        message = result.stderr.decode(errors="replace").strip().splitlines()
        raise UserError(f"cannot decode the audio of {path}: {message[-1] if message else 'ffmpeg failed'}")
    samples = np.frombuffer(result.stdout, np.float32).reshape(-1, channels)
    return Audio(samples=np.clip(samples, -1.0, 1.0), rate=rate)


def frame_segments(frames: Sequence[int], fps: float = 12.0) -> list[tuple[float, float]]:
    """Source segments `(start, duration)` in seconds under video frames that show source frames `frames` (frame k
    of the source lasting `[k/fps, (k+1)/fps)`): runs of consecutive frames become one segment."""
    segments: list[tuple[float, float]] = []
    run_start = previous = None
    for frame in list(frames) + [None]:
        if frame is not None and previous is not None and frame == previous + 1:
            previous = frame
            continue
        if run_start is not None:
            segments.append((run_start / fps, (previous - run_start + 1) / fps))
        run_start = previous = frame
    return segments


def cut(audio: Audio, segments: Sequence[tuple[float, float]]) -> np.ndarray:
    """The samples of `segments` one after another, `[N, channels]`; beyond the source's end: silence. Each cut
    fades in and out over a few milliseconds, so a jump in the source does not click."""
    fade = max(1, int(_JOIN_FADE_SECONDS * audio.rate))
    parts = []
    for index, (start, duration) in enumerate(segments):
        if duration < 0:
            raise ValueError(f"segment {index} has a negative duration {duration}")
        first = int(round(start * audio.rate))
        length = int(round(duration * audio.rate))
        part = np.zeros((length, audio.samples.shape[1]), np.float32)
        source = audio.samples[max(first, 0):max(first + length, 0)]
        offset = max(-first, 0)
        part[offset:offset + len(source)] = source[:length - offset]
        if len(segments) > 1 and length > 2 * fade:
            ramp = np.linspace(0.0, 1.0, fade, dtype=np.float32)[:, None]
            if index > 0:
                part[:fade] *= ramp
            if index < len(segments) - 1:
                part[-fade:] *= ramp[::-1]
        parts.append(part)
    if not parts:
        return np.zeros((0, audio.samples.shape[1]), np.float32)
    return np.concatenate(parts)


def mux_audio(video_path: str, audio: Audio, segments: Sequence[tuple[float, float]] | None = None, *,
              out_path: str | None = None, bitrate: str = "128k") -> float:
    """Add `audio` (cut to `segments` of it, default: all of it) as an AAC track to the mp4 `video_path`; the video
    stream is copied. Writes `out_path` (default: replaces `video_path`) through a hidden sibling file, so a failure
    leaves the old file as it was. Returns the duration of the audio written, in seconds."""
    out_path = out_path or video_path
    pcm = cut(audio, segments if segments is not None else [(0.0, audio.duration)])
    directory, name = os.path.split(os.path.abspath(out_path))
    stem, extension = os.path.splitext(name)
    partial = os.path.join(directory, f".{stem}.audio{extension}")
    command = [_ffmpeg(), "-nostdin", "-y", "-v", "error", "-i", video_path, "-f", "f32le", "-ar", str(audio.rate),
               "-ac", str(pcm.shape[1]), "-i", "pipe:0", "-map", "0:v:0", "-map", "1:a:0", "-c:v", "copy",
               "-c:a", "aac", "-b:a", bitrate, "-ar", str(MUX_RATE), "-movflags", "+faststart", partial]
    try:
        result = subprocess.run(command, input=np.ascontiguousarray(pcm, np.float32).tobytes(), capture_output=True)
        if result.returncode != 0:
            raise RuntimeError(f"ffmpeg could not mux audio into {video_path}: "
                               f"{result.stderr.decode(errors='replace').strip()}")
        os.replace(partial, out_path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return len(pcm) / audio.rate


def stream_durations(path: str) -> dict[str, float]:
    """Duration in seconds of the first video and first audio stream of a file (keys present only where the stream
    exists), measured by decoding: what a player plays, not what the container header claims."""
    durations = {}
    for kind, selector in (("video", "0:v:0"), ("audio", "0:a:0")):
        result = subprocess.run([_ffmpeg(), "-nostdin", "-v", "error", "-i", path, "-map", selector, "-f", "null",
                                 "-stats_period", "100", "-progress", "pipe:1", "-"], capture_output=True, text=True)
        times = re.findall(r"out_time_us=(\d+)", result.stdout)
        if result.returncode == 0 and times:
            durations[kind] = int(times[-1]) / 1e6
    return durations
