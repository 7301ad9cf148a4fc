"""The motion track: what every motion source produces, per 12-fps frame (speech, text, curve files, a video).

A frame holds MediaPipe's 51 ARKit-named blendshape scores in [0, 1], the head rotation (yaw, pitch, roll in
degrees, `R = R_y(yaw)·R_x(pitch)·R_z(roll)` in image axes as `a1-jax evaluate` reports them: positive yaw turns the
face towards the image's left, positive pitch lowers the chin, positive roll tilts it clockwise on screen) and,
optionally, the gaze: each pupil's offset from its eye's centre in units of the eye's width, x right and y
down in the head's frame (right eye first, as MediaPipe's landmarks 468 then 473).

Files:
* our JSON: `{"fps": 12, "frames": [{"blendshapes": {name: score}, "yaw": …, "pitch": …, "roll": …,
  "gaze": [[x, y], [x, y]]}, …]}` (missing blendshapes are 0, missing angles 0, gaze optional);
* CSV curves as Live Link Face and the audio-to-face tools that copy it export: a `Timecode` column
  (`HH:MM:SS:FF.fff`) or a `time` column (seconds), one column per ARKit blendshape (either capitalisation),
  optional `HeadYaw`, `HeadPitch`, `HeadRoll` (radians, as ARKit reports them). `TongueOut` and the eye-rotation
  columns are read and not used (MediaPipe has no tongue; the eyeLook blendshapes carry the gaze).

Any frame rate is resampled to 12 fps by linear interpolation of the curves.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re

import numpy as np

from a1_jax.errors import UserError
from a1_jax.io.video import TARGET_FPS, check_output
from a1_jax.motion.landmarker import BLENDSHAPE_NAMES

NAMES = BLENDSHAPE_NAMES[1:]  # MediaPipe's categories without `_neutral`: the 51 ARKit blendshapes it estimates
INDEX = {name: i for i, name in enumerate(NAMES)}
# ARKit names MediaPipe does not estimate, and curve-file columns that are not blendshapes: read, then dropped.
IGNORED_CSV_COLUMNS = frozenset(name.lower() for name in (
    "TongueOut", "BlendShapeCount", "LeftEyeYaw", "LeftEyePitch", "LeftEyeRoll", "RightEyeYaw", "RightEyePitch",
    "RightEyeRoll"))
_HEAD_COLUMNS = {"headyaw": 0, "headpitch": 1, "headroll": 2}
MAX_TRACK_SECONDS = 3600.0  # a curve file longer than an hour is almost surely a unit mistake


@dataclasses.dataclass(frozen=True)
class MotionTrack:
    """Per-frame motion at `fps`: blendshapes `[T, 51]` (order `NAMES`), rotation `[T, 3]` degrees (yaw, pitch,
    roll), gaze `[T, 2, 2]` or None."""

    blendshapes: np.ndarray
    rotation: np.ndarray
    gaze: np.ndarray | None = None
    fps: float = TARGET_FPS

    def __post_init__(self):
        frames = len(self.blendshapes)
        if self.blendshapes.shape != (frames, len(NAMES)) or self.rotation.shape != (frames, 3):
            raise ValueError(f"track arrays disagree: blendshapes {self.blendshapes.shape}, "
                             f"rotation {self.rotation.shape}")
        if self.gaze is not None and self.gaze.shape != (frames, 2, 2):
            raise ValueError(f"gaze must be [T, 2, 2], got {self.gaze.shape}")

    def __len__(self) -> int:
        return len(self.blendshapes)

    @property
    def duration(self) -> float:
        return len(self) / self.fps

    def first(self, count: int) -> "MotionTrack":
        """The first `count` frames."""
        return MotionTrack(self.blendshapes[:count], self.rotation[:count],
                           None if self.gaze is None else self.gaze[:count], self.fps)

    def curve(self, name: str) -> np.ndarray:
        return self.blendshapes[:, INDEX[name]]

    def resampled(self, fps: float = TARGET_FPS) -> "MotionTrack":
        """The track at `fps`: frame k at time k/fps, linearly interpolated (held at the ends)."""
        if fps == self.fps:
            return self
        count = max(1, int(round(self.duration * fps)))
        source = np.arange(len(self)) / self.fps
        target = np.arange(count) / fps

        def interpolate(values: np.ndarray) -> np.ndarray:
            flat = values.reshape(len(values), -1)
            columns = [np.interp(target, source, column) for column in flat.T]
            return np.stack(columns, axis=1).reshape((count,) + values.shape[1:]).astype(np.float32)

        return MotionTrack(interpolate(self.blendshapes), interpolate(self.rotation),
                           None if self.gaze is None else interpolate(self.gaze), fps)

    def to_json(self) -> dict:
        frames = []
        for i in range(len(self)):
            frame = {"blendshapes": {name: round(float(v), 5) for name, v in zip(NAMES, self.blendshapes[i])},
                     "yaw": round(float(self.rotation[i, 0]), 4), "pitch": round(float(self.rotation[i, 1]), 4),
                     "roll": round(float(self.rotation[i, 2]), 4)}
            if self.gaze is not None:
                frame["gaze"] = np.round(self.gaze[i], 5).tolist()
            frames.append(frame)
        return {"fps": self.fps, "frames": frames}


def still(frames: int, fps: float = TARGET_FPS) -> MotionTrack:
    """A neutral, motionless track of `frames` frames."""
    return MotionTrack(np.zeros((frames, len(NAMES)), np.float32), np.zeros((frames, 3), np.float32), None, fps)


def check_output_file(path: str, extension: str) -> None:
    """An output file we will write later (`io.video.check_output`: the extension, the folder, a file can be made)."""
    check_output(path, "output", (extension,))


def write_track(path: str, track: MotionTrack) -> None:
    """Our JSON track format (any fps is written as 12 fps), written whole or not at all."""
    check_output_file(path, ".json")
    partial = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.partial")
    with open(partial, "w") as f:
        json.dump(track.resampled(TARGET_FPS).to_json(), f)
    os.replace(partial, path)


def check_track_path(path: str) -> None:
    """A track file must exist and be .json or .csv: checked before any compute."""
    if not os.path.isfile(path):
        raise UserError(f"blendshape file not found: {path}")
    if os.path.splitext(path)[1].lower() not in (".json", ".csv"):
        raise UserError(f"blendshape file {path} must be a track .json or a curve .csv")


def read_track(path: str) -> MotionTrack:
    """A track JSON or curve CSV, resampled to 12 fps; UserError for anything malformed or an unknown name."""
    check_track_path(path)
    if os.path.getsize(path) == 0:
        raise UserError(f"blendshape file {path} is empty")
    reader = _read_json if path.lower().endswith(".json") else _read_csv
    track = reader(path)
    if len(track) == 0:
        raise UserError(f"blendshape file {path} has no frames")
    if track.duration > MAX_TRACK_SECONDS:
        raise UserError(f"blendshape file {path} lasts {track.duration:.0f} s; at most {MAX_TRACK_SECONDS:.0f} s")
    if not (np.isfinite(track.blendshapes).all() and np.isfinite(track.rotation).all()
            and (track.gaze is None or np.isfinite(track.gaze).all())):
        raise UserError(f"blendshape file {path} holds values that are not finite numbers")
    track = track.resampled(TARGET_FPS)
    return dataclasses.replace(track, blendshapes=np.clip(track.blendshapes, 0.0, 1.0))


def _number(value, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: {value!r} is not a number") from None
    return number


def _blendshape_index(name: str, where: str) -> int:
    """`name` in MediaPipe's camelCase or ARKit's PascalCase; UserError naming it if unknown."""
    key = name[:1].lower() + name[1:]
    if key not in INDEX:
        raise UserError(f"{where}: unknown blendshape {name!r} (known: MediaPipe's ARKit names, e.g. jawOpen)")
    return INDEX[key]


def _read_json(path: str) -> MotionTrack:
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read track {path}: not JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("frames"), list):
        raise UserError(f"track {path} must be an object with a list of \"frames\"")
    fps = _number(data.get("fps", TARGET_FPS), f"track {path}: fps")
    if not fps > 0:
        raise UserError(f"track {path}: fps must be positive, got {fps}")
    frames = data["frames"]
    blendshapes = np.zeros((len(frames), len(NAMES)), np.float32)
    rotation = np.zeros((len(frames), 3), np.float32)
    gaze = np.zeros((len(frames), 2, 2), np.float32) if frames and isinstance(frames[0], dict) \
        and "gaze" in frames[0] else None
    for i, frame in enumerate(frames):
        where = f"track {path}, frame {i}"
        if not isinstance(frame, dict):
            raise UserError(f"{where}: a frame must be an object")
        unknown = set(frame) - {"blendshapes", "yaw", "pitch", "roll", "gaze"}
        if unknown:
            raise UserError(f"{where}: unknown key(s) {sorted(unknown)}")
        scores = frame.get("blendshapes", {})
        if not isinstance(scores, dict):
            raise UserError(f"{where}: \"blendshapes\" must map names to scores")
        for name, score in scores.items():
            blendshapes[i, _blendshape_index(name, where)] = _number(score, f"{where}, {name}")
        for j, angle in enumerate(("yaw", "pitch", "roll")):
            rotation[i, j] = _number(frame.get(angle, 0.0), f"{where}, {angle}")
        if gaze is not None:
            value = np.asarray(frame.get("gaze"), dtype=object)
            if value.shape != (2, 2):
                raise UserError(f"{where}: \"gaze\" must be [[x, y], [x, y]] (right eye, left eye) in every frame")
            gaze[i] = [[_number(v, f"{where}, gaze") for v in eye] for eye in value]
    return MotionTrack(blendshapes, rotation, gaze, fps)


_TIMECODE = re.compile(r"^(\d+):(\d+):(\d+)[:;.](\d+(?:\.\d+)?)$")


def _timecode_seconds(values: list[str], path: str) -> np.ndarray:
    """Live Link Face's `HH:MM:SS:FF.fff` (FF a frame number at the timecode rate) -> seconds from the first row.
    The rate is not in the file: the smallest standard rate above every frame number seen (60 for the app)."""
    parts = []
    for row, value in enumerate(values):
        match = _TIMECODE.match(value.strip())
        if match is None:
            raise UserError(f"curve file {path}, row {row + 1}: timecode {value!r} is not HH:MM:SS:FF")
        parts.append([float(group) for group in match.groups()])
    parts = np.array(parts)
    highest = parts[:, 3].max()
    rate = next((r for r in (24, 25, 30, 50, 60, 120) if highest < r), math.floor(highest) + 1)
    seconds = parts[:, 0] * 3600 + parts[:, 1] * 60 + parts[:, 2] + parts[:, 3] / rate
    return seconds - seconds[0]


def _read_csv(path: str) -> MotionTrack:
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except UnicodeDecodeError:
        raise UserError(f"cannot read curve file {path}: not a text CSV") from None
    rows = [row for row in rows if any(cell.strip() for cell in row)]
    if len(rows) < 2:
        raise UserError(f"curve file {path} needs a header row and at least one frame")
    header = [name.strip() for name in rows[0]]
    lowered = [name.lower() for name in header]
    if "timecode" in lowered:
        times = _timecode_seconds([row[lowered.index("timecode")] for row in rows[1:]], path)
    elif "time" in lowered:
        times = np.array([_number(row[lowered.index("time")], f"curve file {path}, time") for row in rows[1:]])
    else:
        raise UserError(f"curve file {path} needs a Timecode (Live Link Face) or a time (seconds) column")
    if len(times) > 1 and not np.all(np.diff(times) > 0):
        raise UserError(f"curve file {path}: times must increase from row to row")
    columns = {}  # column -> ("blend", index) | ("head", index)
    for c, (name, low) in enumerate(zip(header, lowered)):
        if low in ("timecode", "time") or low in IGNORED_CSV_COLUMNS:
            continue
        columns[c] = ("head", _HEAD_COLUMNS[low]) if low in _HEAD_COLUMNS else \
            ("blend", _blendshape_index(name, f"curve file {path}, column {c + 1}"))
    blendshapes = np.zeros((len(times), len(NAMES)), np.float32)
    rotation = np.zeros((len(times), 3), np.float32)
    for r, row in enumerate(rows[1:]):
        if len(row) < len(header):
            raise UserError(f"curve file {path}, row {r + 2}: {len(row)} cells for {len(header)} columns")
        for c, (kind, index) in columns.items():
            value = _number(row[c], f"curve file {path}, row {r + 2}, {header[c]}")
            if kind == "blend":
                blendshapes[r, index] = value
            else:
                rotation[r, index] = math.degrees(value)
    # Uneven rows (a phone drops frames): put them on a regular grid at the file's median rate first.
    fps = 1.0 / float(np.median(np.diff(times))) if len(times) > 1 else TARGET_FPS
    grid = np.arange(max(1, int(round(times[-1] * fps)) + 1)) / fps
    regular = [np.stack([np.interp(grid, times, column) for column in values.T], axis=1).astype(np.float32)
               for values in (blendshapes, rotation)]
    return MotionTrack(regular[0], regular[1], None, fps)
