"""Face tracks of a video at 12 fps and the pairing of generated frames with driving frames.

Both videos are sampled at 12 fps (`sampled_indices`) and run through MediaPipe in VIDEO mode, one streaming pass
each; a track keeps a few KB a frame.
Pairing `sequential` matches generated frame i with driving frame i (what `animate` writes: its output frames follow
the sampled driving frames f0, f1, ...), over the shorter video. Pairing `nearest` matches each generated frame with
the driving frame whose landmark motion is closest, the way the reference's evaluation scripts take the minimum
over all driving frames (spec §8.1). Frames without a face are counted and left out, never filled.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from a1_jax.evaluate import metrics
from a1_jax.io.video import TARGET_FPS, VideoInfo, probe_video, read_frames, resample_indices
from a1_jax.motion.landmarker import BLENDSHAPE_NAMES, FaceLandmarks, Landmarker
from a1_jax.motion.retarget import rotation_from_transform

ALIGNMENTS = ("sequential", "nearest")
_POINTS = 478


@dataclasses.dataclass(frozen=True)
class FaceTrack:
    """One video's first T faces at 12 fps. Rows of frames without a face (`found` False) are zeros, never read."""

    path: str
    sampled: int  # the video's number of 12-fps frames (T or more: a track may stop early)
    source_indices: np.ndarray  # [T] frame index in the file of each sampled frame
    found: np.ndarray  # [T] bool
    points: np.ndarray  # [T, 478, 3] pixels
    blendshapes: np.ndarray  # [T, 52]
    rotations: np.ndarray  # [T, 3, 3] head rotation, image axes

    def __len__(self) -> int:
        return len(self.found)


def sampled_indices(info: VideoInfo, generated: bool) -> np.ndarray:
    """Frame indices of a video at 12 fps. A driving video: the motion branch's indices, the very frames `animate`
    followed (the reference's float formula, which on a 12- or 24-fps file now and then repeats a frame and skips the
    next: 7/12·12 = 6.999… -> 6). A generated video already at 12 fps: every frame, as `animate` wrote them."""
    if generated and abs(info.fps - TARGET_FPS) < 1e-3:
        return np.arange(info.num_frames)
    return resample_indices(info.num_frames, info.fps)


def track_video(path: str, landmarker_model: str, *, generated: bool, limit: int | None = None,
                visit: Callable[[int, np.ndarray, FaceLandmarks], None] | None = None,
                progress: bool = False) -> FaceTrack:
    """Landmarks of the 12-fps sampled frames of `path` (the first `limit` of them if given); `visit(i, frame,
    face)` sees each frame with a face.

    UserError when the file cannot be decoded. A video without any face is a track with no face found (`found` all
    False): a measurement, not a mistake (the summary says `ok: false`).
    """
    info = probe_video(path)
    all_indices = sampled_indices(info, generated)
    indices = all_indices[:limit]
    count = len(indices)
    found = np.zeros(count, bool)
    points = np.zeros((count, _POINTS, 3), np.float32)
    blendshapes = np.zeros((count, len(BLENDSHAPE_NAMES)), np.float32)
    rotations = np.tile(np.eye(3), (count, 1, 1))
    frames = zip(range(count), read_frames(path, indices))
    if progress:
        from tqdm import tqdm

        frames = tqdm(frames, total=count, desc="generated" if generated else "driving", unit="frame", leave=False,
                      disable=None)
    decoded = 0
    with Landmarker(landmarker_model, video=True) as landmarker:
        for i, frame in frames:
            decoded = i + 1
            face = landmarker.detect(frame, int(round(indices[i] * 1000 / info.fps)))
            if face is None:
                continue
            found[i], points[i], blendshapes[i] = True, face.points, face.blendshapes
            rotations[i] = rotation_from_transform(face.transform)
            if visit is not None:
                visit(i, frame, face)
    if decoded < count:  # the container promised more frames than it holds: keep what was decoded
        indices, found, points, blendshapes, rotations = (a[:decoded] for a in
                                                          (indices, found, points, blendshapes, rotations))
    return FaceTrack(path, len(all_indices), indices, found, points, blendshapes, rotations)


@dataclasses.dataclass(frozen=True)
class Pairing:
    """Which generated frame is compared with which driving frame (sampled-frame indices), and the anchors."""

    align: str
    generated: np.ndarray  # [P]
    driving: np.ndarray  # [P]
    anchor: tuple[int, int]  # (generated, driving) frames that motion and head rotation are measured from
    frames_without_face: int  # candidate generated frames left out because a face was missing


def pair_frames(generated: FaceTrack, driving: FaceTrack, align: str = "sequential") -> Pairing:
    """Pair the two tracks. No pair with a face on both sides gives an empty pairing (anchor (-1, -1)): the summary
    then reports no metrics and `ok: false`."""
    if align not in ALIGNMENTS:
        raise ValueError(f"align must be one of {ALIGNMENTS}, got {align!r}")
    if align == "sequential":
        count = min(len(generated), len(driving))
        both = np.flatnonzero(generated.found[:count] & driving.found[:count])
        anchor = (int(both[0]), int(both[0])) if len(both) else (-1, -1)
        return Pairing(align, both, both.copy(), anchor, count - len(both))
    # Anchors: each video's first frame with a face; then the closest driving motion for every generated frame.
    generated_frames, driving_frames = np.flatnonzero(generated.found), np.flatnonzero(driving.found)
    if not len(generated_frames) or not len(driving_frames):
        empty = np.zeros(0, np.int64)
        return Pairing(align, empty, empty.copy(), (-1, -1), len(generated))
    anchor = int(generated_frames[0]), int(driving_frames[0])
    generated_motion = metrics.landmark_motion(generated.points[generated_frames], generated.points[anchor[0]])
    driving_motion = metrics.landmark_motion(driving.points[driving_frames], driving.points[anchor[1]])
    nearest = np.array([driving_frames[np.argmin(metrics.landmark_motion_error(driving_motion, motion[None]))]
                        for motion in generated_motion], np.int64)
    return Pairing(align, generated_frames, nearest, anchor, len(generated) - len(generated_frames))
