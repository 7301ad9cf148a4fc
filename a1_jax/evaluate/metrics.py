"""Fidelity metrics on paired face tracks: pure NumPy, one function per quantity, no I/O.

Inputs are per-frame arrays of the frames that are compared (frames without a face are already left out):
landmark pixels `[T, 478, 3]`, blendshape scores `[T, 52]`, head rotations `[T, 3, 3]` in image axes (x right,
y down, z into the scene; `a1_jax.motion.retarget.rotation_from_transform`).
"""

from __future__ import annotations

import numpy as np

from a1_jax.motion.retarget import LEFT_EYE_CONTOUR, RIGHT_EYE_CONTOUR, RIGID_LANDMARKS
# The angle conventions live with the other rotation helpers (motion tracks use them too); metrics keeps its names.
from a1_jax.motion.retarget import rotation_from_yaw_pitch_roll_deg, yaw_pitch_roll_deg  # noqa: F401


def pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson correlation of two series; None where it is undefined (fewer than 3 values, or a constant series)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 3:
        return None
    a, b = a - a.mean(), b - b.mean()
    norm = np.sqrt((a * a).sum() * (b * b).sum())
    if norm <= 1e-12 * len(a):  # a series that never moves has no correlation with anything
        return None
    return float(np.clip((a * b).sum() / norm, -1.0, 1.0))


def expression_l1(generated: np.ndarray, driving: np.ndarray) -> np.ndarray:
    """Per frame: mean absolute difference of the 52 blendshape scores `[T, 52]` -> `[T]`, in [0, 1]."""
    return np.abs(np.asarray(generated, np.float64) - np.asarray(driving, np.float64)).mean(axis=-1)


def relative_rotations(rotations: np.ndarray, anchor: np.ndarray) -> np.ndarray:
    """`anchorᵀ · R_i`: each head rotation relative to the anchor frame's, in the head's own axes.

    The animator composes `R_ref · R_drv0ᵀ · R_drv_i` (spec §1.5), so a generated head that follows its driver has
    the same relative rotation as the driver whatever their first poses.
    """
    return np.einsum("ji,tjk->tik", np.asarray(anchor, np.float64), np.asarray(rotations, np.float64))


def rotation_angle_deg(rotations: np.ndarray) -> np.ndarray:
    """The angle of each rotation `[..., 3, 3]` in degrees, in [0, 180].

    `2·asin(‖R − I‖_F / (2√2))`: equal to `acos((tr R − 1)/2)` but exact near 0, where acos loses half the digits.
    """
    rotations = np.asarray(rotations, np.float64)
    distance = np.linalg.norm(rotations - np.eye(3), axis=(-2, -1))
    return np.degrees(2 * np.arcsin(np.clip(distance / (2 * np.sqrt(2)), 0.0, 1.0)))


def pose_error_deg(generated: np.ndarray, driving: np.ndarray) -> np.ndarray:
    """Per frame: the angle in degrees between two relative head rotations `[T, 3, 3]`, in [0, 180]."""
    difference = np.einsum("tji,tjk->tik", np.asarray(generated, np.float64), np.asarray(driving, np.float64))
    return rotation_angle_deg(difference)


def inter_ocular_distance(points: np.ndarray) -> float:
    """Pixel distance between the centres of the two eye contours of one face `[478, ≥2]`."""
    points = np.asarray(points, np.float64)
    return float(np.linalg.norm(points[RIGHT_EYE_CONTOUR, :2].mean(0) - points[LEFT_EYE_CONTOUR, :2].mean(0)))


def landmark_motion(points: np.ndarray, anchor: np.ndarray) -> np.ndarray:
    """Each frame's landmark displacement from the anchor frame `[T, 478, 2]`, in inter-ocular distances.

    Positions are taken about the rigid landmarks' centroid of their own frame: the animator keeps the reference's
    head position (spec §1.5: the source's camera), so the driver's translation is not motion it should reproduce.
    The unit is the anchor frame's inter-ocular distance, so a bigger or differently framed face scores the same.
    """
    points = np.asarray(points, np.float64)[..., :2]
    anchor = np.asarray(anchor, np.float64)[..., :2]
    centred = points - points[:, RIGID_LANDMARKS].mean(axis=1, keepdims=True)
    anchor_centred = anchor - anchor[RIGID_LANDMARKS].mean(axis=0)
    return (centred - anchor_centred) / inter_ocular_distance(anchor)


def landmark_motion_error(generated: np.ndarray, driving: np.ndarray) -> np.ndarray:
    """Per frame: mean over the 478 landmarks of the distance between two displacement fields `[T, 478, 2]`."""
    return np.linalg.norm(np.asarray(generated) - np.asarray(driving), axis=-1).mean(axis=-1)
