"""The face rig: blendshape scores -> landmark offsets in the canonical face frame, fitted to MediaPipe's own pairs.

`retarget.decompose` takes a face's pose out of its 478 landmarks, leaving the canonical landmarks `Q` (head-aligned,
centred on the skull-fixed landmarks, unit RMS radius). Within one person, `Q` moves with the expression, and
MediaPipe's blendshape scores `b` describe the same expression, so the rig is linear:

    Q(b) = Q(b₀) + B · (b − b₀),   B: [51, 478, 3]

A reference portrait's own landmarks and scores (`Q_ref`, `b_ref`) anchor it: a track's frame becomes
`Q_ref + B · (b − b_ref)`, so a track at the portrait's own expression draws the portrait's own lines, and a closed
mouth in the track closes an open-mouthed portrait. `tools/fit_face_rig.py` fits `B` by ridge regression on
within-video differences (each video's mean removed, so identity never enters), and writes it as package data.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import numpy as np

from a1_jax.motion import draw, retarget
from a1_jax.motion.track import NAMES

PACKAGED_RIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "face_rig.npz")
POINTS = 478
# The landmarks a control frame draws: eye, brow and lip lines, pupils, nose tip (what the rig has to get right).
DRAWN = np.array(sorted({i for edges, _ in draw.EDGE_GROUPS for edge in edges for i in edge}
                        | {retarget.RIGHT_PUPIL, retarget.LEFT_PUPIL, draw.NOSE_TIP}))


@dataclasses.dataclass(frozen=True)
class FaceRig:
    """`basis` `[51, 478, 3]` float32: the canonical offset of each blendshape at score 1 (order `track.NAMES`)."""

    basis: np.ndarray

    def offsets(self, blendshapes: np.ndarray) -> np.ndarray:
        """`[..., 51]` score changes -> `[..., 478, 3]` canonical landmark offsets."""
        return np.tensordot(np.asarray(blendshapes, np.float64), self.basis.astype(np.float64), axes=(-1, 0))


def fit(canonical: np.ndarray, blendshapes: np.ndarray, groups: np.ndarray, ridge: float) -> FaceRig:
    """Least squares `B` with an L2 penalty `ridge`, on `canonical` `[N, 478, 3]` and `blendshapes` `[N, 51]`,
    each centred on its group's mean (a group = one video of one person)."""
    x, y = _centred(blendshapes, groups), _centred(canonical.reshape(len(canonical), -1), groups)
    gram = x.T @ x + ridge * len(x) * np.eye(x.shape[1])
    basis = np.linalg.solve(gram, x.T @ y)
    return FaceRig(basis.reshape(len(NAMES), POINTS, 3).astype(np.float32))


def _centred(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    values = np.asarray(values, np.float64).copy()
    for group in np.unique(groups):
        values[groups == group] -= values[groups == group].mean(axis=0)
    return values


def residual(rig: FaceRig, canonical: np.ndarray, blendshapes: np.ndarray, groups: np.ndarray,
             anchors: dict | None = None, points: np.ndarray | None = None) -> dict[str, float]:
    """How well the rig predicts each frame's landmarks from its scores, relative to its group's anchor (the group
    mean by default, or `anchors[group] = (canonical [478, 3], blendshapes [51])`).

    Errors are mean landmark distances in units of the inter-ocular distance (x, y: what the control frame draws):
    `rig` the rig's, `still` that of predicting no motion (the anchor itself) — what the rig has to beat; over the
    landmarks a control frame draws (`DRAWN`) unless `points` says which."""
    points = DRAWN if points is None else points

    errors, stills = [], []
    for group in np.unique(groups):
        rows = groups == group
        q, b = np.asarray(canonical[rows], np.float64), np.asarray(blendshapes[rows], np.float64)
        q0, b0 = anchors[group] if anchors else (q.mean(axis=0), b.mean(axis=0))
        predicted = q0 + rig.offsets(b - b0)
        eyes = np.linalg.norm(q[:, retarget.RIGHT_EYE_CONTOUR, :2].mean(1)
                              - q[:, retarget.LEFT_EYE_CONTOUR, :2].mean(1), axis=-1)
        errors.append(np.linalg.norm((predicted - q)[:, points, :2], axis=-1).mean(-1) / eyes)
        stills.append(np.linalg.norm((q0 - q)[:, points, :2], axis=-1).mean(-1) / eyes)
    errors, stills = np.concatenate(errors), np.concatenate(stills)
    return {"rig": float(errors.mean()), "still": float(stills.mean()), "rig_p95": float(np.percentile(errors, 95)),
            "frames": int(len(errors))}


def save(rig: FaceRig, path: str, **metadata) -> None:
    np.savez_compressed(path, basis=rig.basis.astype(np.float32), names=np.array(NAMES),
                        **{k: np.asarray(v) for k, v in metadata.items()})


@functools.lru_cache(maxsize=None)
def load(path: str = PACKAGED_RIG) -> FaceRig:
    """The rig shipped with the package (or another `fit_face_rig.py` output)."""
    with np.load(path) as data:
        if tuple(data["names"]) != NAMES:
            raise ValueError(f"{path} was fitted for other blendshape names")
        return FaceRig(data["basis"].astype(np.float32))


def measure(video: str, *, mirror: bool = False, landmarker_path: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """MediaPipe's own pairs on every frame of `video` (mirrored left-right if asked) that has a face:
    canonical landmarks `[N, 478, 3]` and blendshape scores `[N, 51]`, in frame order."""
    from a1_jax.io.video import probe_video, read_frames
    from a1_jax.motion.landmarker import Landmarker

    info = probe_video(video)
    canonical, scores = [], []
    with Landmarker(landmarker_path, video=True) as landmarker:
        for index, frame in enumerate(read_frames(video, range(info.num_frames))):
            face = landmarker.detect(np.ascontiguousarray(frame[:, ::-1]) if mirror else frame,
                                     int(round(index * 1000 / info.fps)))
            if face is not None:
                canonical.append(retarget.decompose(face.points, face.transform)[1])
                scores.append(face.blendshapes[1:])
    return np.array(canonical, np.float32).reshape(-1, POINTS, 3), np.array(scores, np.float32).reshape(-1, len(NAMES))


_EYES = ((retarget.RIGHT_EYE_CONTOUR, retarget.RIGHT_PUPIL, (33, 133)),
         (retarget.LEFT_EYE_CONTOUR, retarget.LEFT_PUPIL, (362, 263)))  # contour, pupil, corners


def gaze_of(canonical: np.ndarray) -> np.ndarray:
    """`[..., 478, 3]` canonical landmarks -> `[..., 2, 2]` gaze: each pupil's offset from its eye contour's centre
    in units of the eye's width (corner to corner), x right and y down in the head's frame."""
    out = []
    for contour, pupil, (a, b) in _EYES:
        width = np.linalg.norm(canonical[..., a, :2] - canonical[..., b, :2], axis=-1)[..., None]
        out.append((canonical[..., pupil, :2] - canonical[..., contour, :2].mean(axis=-2)) / width)
    return np.stack(out, axis=-2)


def place_gaze(canonical: np.ndarray, gaze: np.ndarray) -> np.ndarray:
    """Inverse of `gaze_of`: canonical landmarks with each pupil (and its iris ring) moved to `gaze` `[..., 2, 2]`."""
    canonical = np.array(canonical, np.float64)
    for eye, ((contour, pupil, (a, b)), iris) in enumerate(zip(_EYES, (np.arange(468, 473), np.arange(473, 478)))):
        width = np.linalg.norm(canonical[..., a, :2] - canonical[..., b, :2], axis=-1)[..., None]
        target = canonical[..., contour, :2].mean(axis=-2) + gaze[..., eye, :] * width
        canonical[..., iris, :2] += (target - canonical[..., pupil, :2])[..., None, :]
    return canonical


def track_landmarks(track, reference_points: np.ndarray, reference_transform: np.ndarray,
                    reference_blendshapes: np.ndarray,
                    face_rig: FaceRig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A driver built by the rig on the reference's own face: per track frame, pixel landmarks `[T, 478, 3]` and the
    facial transformation matrix `[T, 4, 4]` of the track's head rotation, as a driving video would give them.

    Expression: `Q_ref + B · (b − b_ref)` (`reference_blendshapes`: the portrait's own 51 scores); pose: the
    reference's centre and scale with the track's rotation (the retargeting takes it relative to frame 0)."""
    face_rig = face_rig or load()
    pose, canonical = retarget.decompose(reference_points, reference_transform)
    expression = canonical + face_rig.offsets(track.blendshapes - np.asarray(reference_blendshapes)[None])
    if track.gaze is not None:
        expression = place_gaze(expression, track.gaze)
    rotations = retarget.rotation_from_yaw_pitch_roll_deg(track.rotation)
    points = np.stack([retarget.compose(dataclasses.replace(pose, rotation=rotation), frame)
                       for rotation, frame in zip(rotations, expression)])
    transforms = np.tile(np.eye(4), (len(track), 1, 1))
    transforms[:, :3, :3] = retarget.CAMERA_TO_IMAGE @ rotations @ retarget.CAMERA_TO_IMAGE
    return points.astype(np.float32), transforms.astype(np.float32)
