"""Retargeting: the driver's head rotation and expression carried onto the reference face, landmarks only.

The reference fits FLAME with SMIRK (weights we cannot ship) and re-poses the *source* mesh with the driver's
expression and relative head rotation. We do the same on MediaPipe's 478 landmarks:

* a face = rigid pose (rotation `R`, centre `c`, scale `s`) + canonical landmarks `Q` (the face with the pose taken
  out): `points = s · Q Rᵀ + c`. `R` comes from MediaPipe's facial transformation matrix, expressed in image axes
  (x right, y down, z away from the camera); `c` and `s` are the centroid and RMS radius of a rigid landmark subset,
  so an opening jaw does not shrink the face;
* expression = the canonical landmarks; relative motion adds the driver's change since its first frame to the
  reference's canonical landmarks (absolute moves the reference's canonical landmarks onto the driver's);
* rotation `R_src · R_drv0ᵀ · R_drv_i` on EMA-smoothed driver rotations; centre and scale stay the reference's
  (the reference keeps the source's SMIRK camera), orthographic projection back to the reference's pixels.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

# Camera space of the transformation matrix is y up, z towards the viewer; landmark pixels are y down, z away.
CAMERA_TO_IMAGE = np.diag([1.0, -1.0, -1.0])

# Landmarks that move with the skull, not with the expression: forehead, nose bridge and tip, eye corners, temples.
RIGID_LANDMARKS = np.array([10, 151, 9, 8, 168, 6, 197, 195, 5, 4, 1, 33, 133, 362, 263, 127, 356, 234, 454])

RIGHT_EYE_CONTOUR = np.array([33, 7, 163, 144, 145, 153, 154, 155, 133, 173, 157, 158, 159, 160, 161, 246])
LEFT_EYE_CONTOUR = np.array([362, 382, 381, 380, 374, 373, 390, 249, 263, 466, 388, 387, 386, 385, 384, 398])
RIGHT_PUPIL, LEFT_PUPIL = 468, 473

# Upper/lower pairs that must not cross: the inner lips and both eyelids (column j of one faces column j of the other).
_UPPER = np.array([191, 80, 81, 82, 13, 312, 311, 310, 415, 246, 161, 160, 159, 158, 157, 173,
                   398, 384, 385, 386, 387, 388, 466])
_LOWER = np.array([95, 88, 178, 87, 14, 317, 402, 318, 324, 7, 163, 144, 145, 153, 154, 155,
                   382, 381, 380, 374, 373, 390, 249])

SMOOTHING = 0.7  # s_i = 0.7·p_i + 0.3·s_{i-1}, the reference's EMA on the driver's axis-angle head pose


def rotation_from_transform(transform: np.ndarray) -> np.ndarray:
    """The head rotation of a MediaPipe facial transformation matrix, in image axes (nearest proper rotation)."""
    u, _, vt = np.linalg.svd(np.asarray(transform, np.float64)[:3, :3])
    rotation = u @ vt
    if np.linalg.det(rotation) < 0:
        rotation = u @ np.diag([1.0, 1.0, -1.0]) @ vt
    return CAMERA_TO_IMAGE @ rotation @ CAMERA_TO_IMAGE


def rotvec_from_matrix(rotation: np.ndarray) -> np.ndarray:
    return cv2.Rodrigues(np.asarray(rotation, np.float64))[0].reshape(3)


def matrix_from_rotvec(rotvec: np.ndarray) -> np.ndarray:
    return cv2.Rodrigues(np.asarray(rotvec, np.float64).reshape(3, 1))[0]


def yaw_pitch_roll_deg(rotations: np.ndarray) -> np.ndarray:
    """`[T, 3, 3]` -> `[T, 3]` (yaw, pitch, roll) in degrees, for `R = R_y(yaw) · R_x(pitch) · R_z(roll)`.

    Image axes: yaw turns about the vertical axis, pitch about the horizontal one (nodding), roll about the line of
    sight. Pitch lies in [-90, 90], yaw and roll in (-180, 180].
    """
    r = np.asarray(rotations, np.float64)
    yaw = np.arctan2(r[:, 0, 2], r[:, 2, 2])
    pitch = np.arcsin(np.clip(-r[:, 1, 2], -1.0, 1.0))
    roll = np.arctan2(r[:, 1, 0], r[:, 1, 1])
    return np.degrees(np.stack([yaw, pitch, roll], axis=1))


def rotation_from_yaw_pitch_roll_deg(angles: np.ndarray) -> np.ndarray:
    """Inverse of `yaw_pitch_roll_deg`: `[T, 3]` degrees -> `[T, 3, 3]`."""
    yaw, pitch, roll = np.radians(np.asarray(angles, np.float64)).T
    zero, one = np.zeros_like(yaw), np.ones_like(yaw)

    def matrix(rows):
        return np.stack([np.stack(row, axis=-1) for row in rows], axis=-2)

    r_y = matrix([[np.cos(yaw), zero, np.sin(yaw)], [zero, one, zero], [-np.sin(yaw), zero, np.cos(yaw)]])
    r_x = matrix([[one, zero, zero], [zero, np.cos(pitch), -np.sin(pitch)], [zero, np.sin(pitch), np.cos(pitch)]])
    r_z = matrix([[np.cos(roll), -np.sin(roll), zero], [np.sin(roll), np.cos(roll), zero], [zero, zero, one]])
    return r_y @ r_x @ r_z


def smooth_rotvecs(rotvecs: np.ndarray, alpha: float = SMOOTHING) -> np.ndarray:
    """The reference's EMA over frames: `s_0 = p_0`, `s_i = alpha·p_i + (1-alpha)·s_{i-1}`."""
    smoothed = np.array(rotvecs, np.float64)
    for i in range(1, len(smoothed)):
        smoothed[i] = alpha * smoothed[i] + (1 - alpha) * smoothed[i - 1]
    return smoothed


@dataclasses.dataclass(frozen=True)
class Pose:
    """Rigid pose of a face in pixels: `points = scale · canonical @ rotation.T + center`."""

    rotation: np.ndarray  # [3, 3], image axes
    center: np.ndarray  # [3]
    scale: float


def decompose(points: np.ndarray, transform: np.ndarray) -> tuple[Pose, np.ndarray]:
    """Split one face's pixel landmarks `[478, 3]` into its pose and its canonical (pose-free) landmarks."""
    points = np.asarray(points, np.float64)
    rotation = rotation_from_transform(transform)
    rigid = points[RIGID_LANDMARKS]
    center = rigid.mean(axis=0)
    scale = float(np.sqrt(((rigid - center) ** 2).sum(axis=1).mean()))
    canonical = (points - center) @ rotation / scale
    return Pose(rotation, center, scale), canonical


def uncross(canonical: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Close, rather than invert, lips and eyelids that a relative expression pushed past each other.

    A driver that starts with an open mouth and then closes it gives a negative opening on a reference whose mouth
    is closed; FLAME cannot do that either (SMIRK's jaw opening is clamped at zero). A gap (canonical y points down)
    may not fall below zero, or below the `reference` face's own gap where MediaPipe already has it slightly negative.
    """
    canonical = canonical.copy()
    upper, lower = canonical[..., _UPPER, 1], canonical[..., _LOWER, 1]
    floor = np.minimum(reference[_LOWER, 1] - reference[_UPPER, 1], 0.0)
    crossed = lower - upper < floor
    middle = (upper + lower) / 2
    canonical[..., _UPPER, 1] = np.where(crossed, middle - floor / 2, upper)
    canonical[..., _LOWER, 1] = np.where(crossed, middle + floor / 2, lower)
    return canonical


def compose(pose: Pose, canonical: np.ndarray) -> np.ndarray:
    """Inverse of `decompose`: canonical landmarks `[..., 478, 3]` placed with `pose` into pixels."""
    return pose.scale * canonical @ pose.rotation.T + pose.center


def retarget(source_points: np.ndarray, source_transform: np.ndarray, driving_points: np.ndarray,
             driving_transforms: np.ndarray, *, motion: str = "relative",
             expression_scale: float = 1.0) -> np.ndarray:
    """Driver motion on the reference face: `[T, 478, 3]` pixel landmarks in the reference image's coordinates.

    `source_points` [478, 3] and `source_transform` [4, 4] describe the reference face; `driving_points` [T, 478, 3]
    and `driving_transforms` [T, 4, 4] the driving frames (any image size: only their rotation and their canonical
    shape are used). `motion='relative'` adds the driver's expression change since its frame 0 to the reference's
    own; `'absolute'` blends the reference's canonical shape towards the driver's, by `expression_scale` in both.
    """
    if motion not in ("relative", "absolute"):
        raise ValueError(f"motion must be 'relative' or 'absolute', got {motion!r}")
    source_pose, source_canonical = decompose(source_points, source_transform)
    driving = [decompose(p, t) for p, t in zip(driving_points, driving_transforms)]
    driving_canonical = np.stack([canonical for _, canonical in driving])
    anchor = driving_canonical[0] if motion == "relative" else source_canonical
    canonical = uncross(source_canonical + expression_scale * (driving_canonical - anchor), source_canonical)

    rotvecs = smooth_rotvecs(np.stack([rotvec_from_matrix(pose.rotation) for pose, _ in driving]))
    first_inverse = matrix_from_rotvec(rotvecs[0]).T
    out = np.empty_like(canonical)
    for i, rotvec in enumerate(rotvecs):
        rotation = source_pose.rotation @ first_inverse @ matrix_from_rotvec(rotvec)
        out[i] = compose(dataclasses.replace(source_pose, rotation=rotation), canonical[i])
    return out


def transfer_pupils(driving_points: np.ndarray, target_points: np.ndarray) -> np.ndarray:
    """Pupils (MediaPipe 468, 473) for each target face `[T, 2, 2]`: the driver's pupil carried by the affine map
    from its eye contour to the target's eye contour (cv2.estimateAffine2D, as the reference's renderer)."""
    pupils = np.empty((len(target_points), 2, 2), np.float64)
    for i, (driving, target) in enumerate(zip(driving_points, target_points)):
        for j, (contour, pupil) in enumerate(((RIGHT_EYE_CONTOUR, RIGHT_PUPIL), (LEFT_EYE_CONTOUR, LEFT_PUPIL))):
            source = driving[contour, :2].astype(np.float32)
            destination = target[contour, :2].astype(np.float32)
            affine, _ = cv2.estimateAffine2D(source, destination)
            if affine is None:  # RANSAC found no consensus (degenerate contour): plain least squares
                affine, _ = cv2.estimateAffine2D(source, destination, method=cv2.LMEDS)
            if affine is None:
                pupils[i, j] = target[pupil, :2]
            else:
                pupils[i, j] = affine @ np.append(driving[pupil, :2], 1.0)
    return pupils


def fill_missing(values: np.ndarray, found: np.ndarray) -> np.ndarray:
    """Frames without a face (`found` False) get values linearly interpolated between the nearest frames with one
    (held constant before the first and after the last). `values` is `[T, ...]`; needs at least one found frame."""
    found = np.asarray(found, bool)
    if found.all():
        return values
    frames = np.arange(len(values))
    flat = values.reshape(len(values), -1)
    filled = np.stack([np.interp(frames, frames[found], column[found]) for column in flat.T], axis=1)
    return filled.reshape(values.shape).astype(values.dtype)
