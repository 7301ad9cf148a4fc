"""Control frames in the reference's landmark style (spec §1.6): coloured 1-px face-mesh lines on black.

Colours are written straight into the RGB channels as the spec's table lists them. Lines follow MediaPipe's drawer:
a normalised point becomes pixel `min(floor(x·W), W-1)`, and an edge with an end outside [0, 1] is skipped. Frames
are drawn at the reference's face-crop size and pasted at the crop box into a black 480×720 canvas.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from a1_jax.motion.retarget import LEFT_EYE_CONTOUR, RIGHT_EYE_CONTOUR

CANVAS_HEIGHT, CANVAS_WIDTH = 480, 720
NOSE_TIP = 4  # MediaPipe index; list index 57 of the reference's 105 embedded points


def _loop(indices) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in zip(indices, np.roll(indices, -1))]


def _path(*indices: int) -> list[tuple[int, int]]:
    return list(zip(indices[:-1], indices[1:]))


# (edges, colour), in drawing order: later groups win at shared end points.
EDGE_GROUPS: tuple[tuple[list[tuple[int, int]], tuple[int, int, int]], ...] = (
    (_loop(RIGHT_EYE_CONTOUR), (10, 200, 180)),
    (_loop(LEFT_EYE_CONTOUR), (180, 200, 10)),
    (_path(46, 53, 52, 65, 55) + _path(70, 63, 105, 66, 107), (10, 220, 180)),
    (_path(285, 295, 282, 283, 276) + _path(336, 296, 334, 293, 300), (180, 220, 10)),
    (_path(61, 146, 91, 181, 84, 17), (10, 180, 20)),  # outer bottom, left half
    (_path(17, 314, 405, 321, 375, 291), (20, 10, 180)),  # outer bottom, right half
    (_path(78, 95, 88, 178, 87, 14), (100, 100, 30)),  # inner bottom, left
    (_path(14, 317, 402, 318, 324, 308), (100, 150, 50)),  # inner bottom, right
    (_path(61, 185, 40, 39, 37, 0), (20, 80, 100)),  # outer top, left
    (_path(0, 267, 269, 270, 409, 291), (80, 100, 20)),  # outer top, right
    (_path(78, 191, 80, 81, 82, 13), (120, 100, 200)),  # inner top, left
    (_path(13, 312, 311, 310, 415, 308), (150, 120, 100)),  # inner top, right
)
INNER_LIP_TOP_COLOURS = ((120, 100, 200), (150, 120, 100))
INNER_LIP_BOTTOM_COLOURS = ((100, 100, 30), (100, 150, 50))
RIGHT_PUPIL_COLOUR, LEFT_PUPIL_COLOUR = (10, 200, 250), (250, 200, 10)


@dataclasses.dataclass(frozen=True)
class MarkerStyle:
    """Pupil and nose-tip squares: the reference draws its first frame (2-D MediaPipe) and the rendered driving
    frames with different marker sizes and nose colour."""

    pupil_size: int
    nose_size: int
    nose_colour: tuple[int, int, int]


REFERENCE_STYLE = MarkerStyle(pupil_size=2, nose_size=4, nose_colour=(200, 200, 200))  # frame 0
DRIVING_STYLE = MarkerStyle(pupil_size=3, nose_size=5, nose_colour=(255, 255, 255))  # frames 1..

SPEC_COLOURS = frozenset([colour for _, colour in EDGE_GROUPS] + [RIGHT_PUPIL_COLOUR, LEFT_PUPIL_COLOUR]
                         + [REFERENCE_STYLE.nose_colour, DRIVING_STYLE.nose_colour])


@dataclasses.dataclass(frozen=True)
class Box:
    """A face-crop box in canvas pixels: columns `[x1, x2)`, rows `[y1, y2)`."""

    x1: int
    y1: int
    x2: int
    y2: int

    @property
    def width(self) -> int:
        return self.x2 - self.x1

    @property
    def height(self) -> int:
        return self.y2 - self.y1


def to_pixels(normalised: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """MediaPipe's drawer conversion: pixels `min(floor(u·W), W-1)` and whether the point is inside [0, 1]²."""
    u, v = normalised[..., 0], normalised[..., 1]
    inside = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    pixels = np.stack([np.minimum(np.floor(u * width), width - 1),
                       np.minimum(np.floor(v * height), height - 1)], axis=-1)
    return np.where(inside[..., None], pixels, 0).astype(np.int32), inside


def _square(image: np.ndarray, x: int, y: int, size: int, colour) -> None:
    """The reference's `image[y-r:y-r+size, x-r:x-r+size] = colour` with r = size // 2 (2×2: from (x-1, y-1)),
    clipped at the image border instead of numpy's wrap-around on negative starts."""
    start_x, start_y = x - size // 2, y - size // 2
    image[max(start_y, 0):max(start_y + size, 0), max(start_x, 0):max(start_x + size, 0)] = colour


def draw_face(normalised: np.ndarray, pupils: np.ndarray, width: int, height: int,
              style: MarkerStyle) -> np.ndarray:
    """One landmark image `[height, width, 3]`: `normalised` `[478, 2]` landmarks in [0, 1] crop coordinates,
    `pupils` `[2, 2]` (right 468, left 473) in crop pixels."""
    image = np.zeros((height, width, 3), np.uint8)
    pixels, inside = to_pixels(normalised, width, height)
    for edges, colour in EDGE_GROUPS:
        for a, b in edges:
            if inside[a] and inside[b]:
                cv2.line(image, tuple(map(int, pixels[a])), tuple(map(int, pixels[b])), colour, 1, cv2.LINE_8)
    for (x, y), colour in zip(pupils, (RIGHT_PUPIL_COLOUR, LEFT_PUPIL_COLOUR)):
        _square(image, int(x), int(y), style.pupil_size, colour)
    nose_x, nose_y = (normalised[NOSE_TIP] * (width, height)).astype(np.int32)  # int(), as the reference
    _square(image, int(nose_x), int(nose_y), style.nose_size, style.nose_colour)
    return image


def paste(face_image: np.ndarray, box: Box) -> np.ndarray:
    """A black 480×720 canvas with the landmark image at the crop box (the reference's `rescale_motions`)."""
    canvas = np.zeros((CANVAS_HEIGHT, CANVAS_WIDTH, 3), np.uint8)
    canvas[box.y1:box.y2, box.x1:box.x2] = face_image
    return canvas


def control_frame(points: np.ndarray, pupils: np.ndarray, box: Box, style: MarkerStyle) -> np.ndarray:
    """A 480×720 control frame from landmarks `[478, ≥2]` and pupils `[2, 2]` in canvas pixels."""
    offset = np.array([box.x1, box.y1], np.float64)
    normalised = (points[:, :2] - offset) / (box.width, box.height)
    return paste(draw_face(normalised, pupils - offset, box.width, box.height, style), box)
