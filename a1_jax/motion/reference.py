"""The reference portrait: the 480×720 canvas, the face-crop box and the face's own landmarks (spec §1.3).

The reference finds the face box with insightface's SCRFD detector; we use the bounding box of MediaPipe's 2-D
landmarks (same detector family as the rest of the motion branch, no extra weights) and keep the reference's
box-expansion arithmetic unchanged.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
from PIL import Image

from a1_jax.errors import UserError
from a1_jax.motion.draw import CANVAS_HEIGHT, CANVAS_WIDTH, Box
from a1_jax.motion.landmarker import FaceLandmarks, Landmarker

LANDMARK_CROP_SIZE = 512  # the reference runs its frame-0 landmarker on the face crop resized to 512×512


def crop_and_resize(image: np.ndarray, height: int = CANVAS_HEIGHT, width: int = CANVAS_WIDTH) -> np.ndarray:
    """Centre-crop the width (too wide) or pad black left and right (too tall) to `width/height`, then Pillow's
    default resize, as the reference's `crop_and_resize`."""
    image_height, image_width = image.shape[:2]
    if image_height / image_width < height / width:
        cropped_width = int(image_height / height * width)
        left = (image_width - cropped_width) // 2
        image = image[:, left:left + cropped_width]
    else:
        pad = int(((width / height) * image_height - image_width) / 2.0)
        padded = np.zeros((image_height, image_width + 2 * pad, 3), np.uint8)
        padded[:, pad:pad + image_width] = image
        image = padded
    return np.asarray(Image.fromarray(image).resize((width, height)))


def face_box(face_box_xyxy: tuple[float, float, float, float], height: int, width: int) -> Box:
    """The reference's `face_crop` box from a face box: twice the face width, about square, inside the image."""
    bx1, by1, bx2, by2 = face_box_xyxy
    w, h = bx2 - bx1, by2 - by1
    x1 = max(0, int(bx1 - w / 2))
    x2 = min(width - 1, int(bx2 + w / 2))
    y_offset = ((x2 - x1) - h) / 2.0
    y1 = max(0, int(by1 - y_offset))
    y2 = min(height, int(by2 + y_offset))
    x_comp = int(((x2 - x1) - (y2 - y1)) / 2) if (x2 - x1) > (y2 - y1) else 0
    return Box(x1 + x_comp, y1, x2 - x_comp, y2)


def landmark_box(face: FaceLandmarks) -> tuple[float, float, float, float]:
    """Bounding box of the 2-D landmarks: our stand-in for insightface's SCRFD face box."""
    xy = face.points[:, :2]
    return float(xy[:, 0].min()), float(xy[:, 1].min()), float(xy[:, 0].max()), float(xy[:, 1].max())


@dataclasses.dataclass(frozen=True)
class ReferenceFace:
    """The portrait on its 480×720 canvas, its face-crop box and its landmarks."""

    canvas: np.ndarray  # [480, 720, 3] uint8
    box: Box
    normalised: np.ndarray  # [478, 3] landmarks in crop coordinates: x, y in [0, 1], z on the x scale
    transform: np.ndarray  # [4, 4] facial transformation matrix of the crop detection
    blendshapes: np.ndarray  # [52] MediaPipe's scores of the same detection (the face rig's anchor)

    @property
    def points(self) -> np.ndarray:
        """`[478, 3]` landmarks in canvas pixels (z in pixels on the x scale)."""
        scale = np.array([self.box.width, self.box.height, self.box.width], np.float64)
        return self.normalised * scale + (self.box.x1, self.box.y1, 0.0)


def prepare_reference(image: np.ndarray, landmarker: Landmarker, name: str = "the reference image") -> ReferenceFace:
    """Canvas, face box and landmarks of a portrait (`landmarker` in IMAGE mode); UserError if it has no face."""
    canvas = crop_and_resize(image)
    face = landmarker.detect(canvas)
    if face is None:
        raise UserError(f"no face found in {name}: use a portrait with one clearly visible face")
    box = face_box(landmark_box(face), CANVAS_HEIGHT, CANVAS_WIDTH)
    crop = canvas[box.y1:box.y2, box.x1:box.x2]
    # Frame 0 of the control video is the landmarker's view of the crop at 512×512, as the reference draws it.
    resized = cv2.resize(crop, (LANDMARK_CROP_SIZE, LANDMARK_CROP_SIZE), interpolation=cv2.INTER_LINEAR)
    crop_face = landmarker.detect(resized)
    if crop_face is not None:
        normalised = crop_face.points / LANDMARK_CROP_SIZE
    else:  # the crop lost the face (rare: tight borders); the canvas detection is as good a source
        normalised = (face.points - (box.x1, box.y1, 0.0)) / (box.width, box.height, box.width)
    source = crop_face if crop_face is not None else face
    return ReferenceFace(canvas=canvas, box=box, normalised=normalised.astype(np.float64), transform=source.transform,
                         blendshapes=source.blendshapes)
