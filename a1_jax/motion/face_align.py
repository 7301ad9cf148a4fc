"""The aligned 512×512 face crop that feeds SigLIP (spec §1.3 item 3).

The reference detects five points with facexlib's RetinaFace (eye centres, nose tip, mouth corners), fits a
similarity transform onto the FFHQ five-point template with `cv2.estimateAffinePartial2D(..., LMEDS)` and warps
with a constant grey border. We take the same five points from MediaPipe's face mesh (the landmarker the motion
branch already runs), then use the same template, fit and warp:

- eye centres: the iris centres 468 / 473. RetinaFace is trained on pupil-centre labels, and MediaPipe's iris
  landmark is its pupil estimate; the mean of the eyelid contour ring sits 3-5 px (on a 720×1280 portrait) off the
  pupil, following the lid shape rather than the eye's centre.
- nose tip: 1 (pronasale). On the frontal sample portraits it lands within ~3 px of the template's nose once eyes and
  mouth are fitted; landmark 4 sits ~10 px higher, on the nasal bridge side of the tip.
- mouth corners: 61 / 291, the outer lip corners.

Points are in RetinaFace's order: image-left eye, image-right eye, nose, image-left mouth corner, image-right one.
"""

from __future__ import annotations

import os

import cv2
import numpy as np

from a1_jax.errors import UserError
from a1_jax.motion.landmarker import FaceLandmarks, detect_image

FACE_SIZE = 512
# facexlib's FFHQ five-point template for a 512×512 face, (x, y) pixels, RetinaFace order.
FFHQ_TEMPLATE_512 = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                              [201.26117, 371.41043], [313.08905, 371.15118]], np.float64)
# facexlib passes (135, 133, 132) to warpAffine on a BGR image; the same grey in RGB.
BORDER_RGB = (132, 133, 135)
# MediaPipe face-mesh indices, RetinaFace order (the subject's right eye is on the image's left).
FIVE_POINT_LANDMARKS = (468, 473, 1, 61, 291)


def five_points(face: FaceLandmarks) -> np.ndarray:
    """RetinaFace-style five points `[5, 2]` (x, y pixels) from MediaPipe landmarks."""
    return face.points[list(FIVE_POINT_LANDMARKS), :2].astype(np.float64)


def template(face_size: int = FACE_SIZE) -> np.ndarray:
    """The FFHQ five-point template scaled to a `face_size` square crop."""
    return FFHQ_TEMPLATE_512 * (face_size / 512.0)


def alignment_matrix(points: np.ndarray, face_size: int = FACE_SIZE) -> np.ndarray:
    """The 2×3 similarity (rotation, uniform scale, shift) taking `points` onto the template, LMEDS-fitted."""
    matrix, _ = cv2.estimateAffinePartial2D(np.asarray(points, np.float32), template(face_size).astype(np.float32),
                                            method=cv2.LMEDS)
    if matrix is None:  # degenerate points (e.g. all equal): no similarity exists
        raise ValueError(f"cannot fit a similarity to the five points {np.asarray(points).tolist()}")
    return matrix


def warp_face(image: np.ndarray, matrix: np.ndarray, face_size: int = FACE_SIZE) -> np.ndarray:
    """Warps RGB `image` by `matrix` into a `face_size` square, bilinear, constant grey border."""
    return cv2.warpAffine(image, matrix, (face_size, face_size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=BORDER_RGB)


def align_face(image: np.ndarray, name: str, landmarker_path: str | None = None, *,
               face: FaceLandmarks | None = None, face_size: int = FACE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """The aligned face crop of RGB uint8 `image` `[H, W, 3]` and the 2×3 matrix that made it.

    `name` names the image in the error raised when no face is found; `landmarker_path` is the MediaPipe model
    (default: `find_landmarker_model`'s lookup). `face`: landmarks already found on this very image (the motion
    branch detects the reference once), which skips detection.
    """
    image = np.ascontiguousarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an RGB uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
    if face is None:
        face = detect_image(image, landmarker_path)
    if face is None:
        raise UserError(f"no face found in {os.fspath(name)}")
    matrix = alignment_matrix(five_points(face), face_size)
    return warp_face(image, matrix, face_size), matrix
