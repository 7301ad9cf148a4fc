"""MediaPipe FaceLandmarker (Tasks API): where its model file is, and one call per image or video frame.

mediapipe 1.2 has only the Tasks API. Each detection returns the 478 landmarks (468 mesh + 10 iris) in pixels, the
52 blendshape scores and the 4×4 facial transformation matrix (canonical face model -> camera space).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import os
import sys

import numpy as np

from a1_jax.errors import UserError

ENV_VAR = "A1_JAX_LANDMARKER"
# The model ships with the package (MediaPipe FaceLandmarker v2 with blendshapes, Apache-2.0), checked on first use.
PACKAGED_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                              "face_landmarker.task")
PACKAGED_SHA256 = "64184e229b263107bc2b804c6625db1341ff2bb731874b0bcc2fe6544e0bc9ff"

# The 52 blendshape categories in the order `FaceLandmarks.blendshapes` holds them (the model's own order).
BLENDSHAPE_NAMES = (
    "_neutral", "browDownLeft", "browDownRight", "browInnerUp", "browOuterUpLeft", "browOuterUpRight", "cheekPuff",
    "cheekSquintLeft", "cheekSquintRight", "eyeBlinkLeft", "eyeBlinkRight", "eyeLookDownLeft", "eyeLookDownRight",
    "eyeLookInLeft", "eyeLookInRight", "eyeLookOutLeft", "eyeLookOutRight", "eyeLookUpLeft", "eyeLookUpRight",
    "eyeSquintLeft", "eyeSquintRight", "eyeWideLeft", "eyeWideRight", "jawForward", "jawLeft", "jawOpen", "jawRight",
    "mouthClose", "mouthDimpleLeft", "mouthDimpleRight", "mouthFrownLeft", "mouthFrownRight", "mouthFunnel",
    "mouthLeft", "mouthLowerDownLeft", "mouthLowerDownRight", "mouthPressLeft", "mouthPressRight", "mouthPucker",
    "mouthRight", "mouthRollLower", "mouthRollUpper", "mouthShrugLower", "mouthShrugUpper", "mouthSmileLeft",
    "mouthSmileRight", "mouthStretchLeft", "mouthStretchRight", "mouthUpperUpLeft", "mouthUpperUpRight",
    "noseSneerLeft", "noseSneerRight")


@functools.lru_cache(maxsize=None)
def _verified(path: str, sha256: str) -> str:
    """`path` if its bytes hash to `sha256`; a damaged or replaced file is a UserError naming both hashes."""
    with open(path, "rb") as f:
        actual = hashlib.sha256(f.read()).hexdigest()
    if actual != sha256:
        raise UserError(f"the packaged landmarker model {path} is damaged (sha256 {actual}, expected {sha256}): "
                        f"reinstall a1_jax, or pass --landmarker PATH / set ${ENV_VAR}")
    return path


def find_landmarker_model(path: str | None = None) -> str:
    """`path` if given, else `$A1_JAX_LANDMARKER`, else the model shipped with the package (sha256-checked)."""
    path = path or os.environ.get(ENV_VAR, "")
    if path:
        if not os.path.isfile(path):
            raise UserError(f"landmarker model not found: {path} (from --landmarker or ${ENV_VAR})")
        return path
    if not os.path.isfile(PACKAGED_MODEL):
        raise UserError(f"the packaged landmarker model is missing ({PACKAGED_MODEL}): reinstall a1_jax, or pass "
                        f"--landmarker PATH / set ${ENV_VAR} to MediaPipe's face_landmarker.task")
    return _verified(PACKAGED_MODEL, PACKAGED_SHA256)


@contextlib.contextmanager
def _quiet_native_stderr():
    """Silence file descriptor 2 while MediaPipe builds its graph: its C++ side logs a dozen warnings there that
    GLOG_minloglevel does not reach (absl logging). Python-level errors still surface as exceptions."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@dataclasses.dataclass(frozen=True)
class FaceLandmarks:
    """One face in one image. `points[:, :2]` are pixels (x right, y down); `points[:, 2]` is depth on the x scale."""

    points: np.ndarray  # [478, 3] float32
    blendshapes: np.ndarray  # [52] float32, MediaPipe's category order
    transform: np.ndarray  # [4, 4] float32, canonical face model -> camera
    image_size: tuple[int, int]  # (height, width)

    def offset(self, dx: float, dy: float) -> "FaceLandmarks":
        """The same face with pixel coordinates shifted (e.g. from a crop back to the full image)."""
        points = self.points.copy()
        points[:, 0] += dx
        points[:, 1] += dy
        return dataclasses.replace(self, points=points)


class Landmarker:
    """A FaceLandmarker for still images (`video=False`) or one video's frames in order (`video=True`).

    Use as a context manager; `detect` returns None where no face is found.
    """

    def __init__(self, model_path: str | None = None, *, video: bool = False, min_confidence: float = 0.5):
        os.environ.setdefault("GLOG_minloglevel", "2")  # MediaPipe's C++ logs flood stderr otherwise
        from mediapipe.tasks.python import vision
        from mediapipe.tasks.python.core.base_options import BaseOptions

        mode = vision.RunningMode.VIDEO if video else vision.RunningMode.IMAGE
        options = vision.FaceLandmarkerOptions(
            base_options=BaseOptions(model_asset_path=find_landmarker_model(model_path)),
            running_mode=mode, num_faces=1, output_face_blendshapes=True,
            output_facial_transformation_matrixes=True, min_face_detection_confidence=min_confidence,
            min_face_presence_confidence=min_confidence, min_tracking_confidence=min_confidence)
        try:
            with _quiet_native_stderr():
                self._task = vision.FaceLandmarker.create_from_options(options)
        except (RuntimeError, ValueError) as e:
            raise UserError(f"cannot load the face landmarker model ({e})") from None
        self._video = video
        self._last_ms = -1

    def detect(self, image: np.ndarray, timestamp_ms: int | None = None) -> FaceLandmarks | None:
        """Landmarks of the most prominent face in an RGB uint8 `[H, W, 3]` image, or None."""
        import mediapipe as mp

        height, width = image.shape[:2]
        frame = mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(image, dtype=np.uint8))
        if self._video:
            # VIDEO mode needs strictly increasing timestamps; callers may pass their own.
            timestamp_ms = self._last_ms + 1 if timestamp_ms is None else max(timestamp_ms, self._last_ms + 1)
            self._last_ms = timestamp_ms
            result = self._task.detect_for_video(frame, timestamp_ms)
        else:
            result = self._task.detect(frame)
        if not result.face_landmarks:
            return None
        points = np.array([(p.x * width, p.y * height, p.z * width) for p in result.face_landmarks[0]], np.float32)
        scores = np.array([c.score for c in result.face_blendshapes[0]], np.float32)
        transform = np.asarray(result.facial_transformation_matrixes[0], np.float32).reshape(4, 4)
        return FaceLandmarks(points=points, blendshapes=scores, transform=transform, image_size=(height, width))

    def close(self) -> None:
        self._task.close()

    def __enter__(self) -> "Landmarker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def detect_image(image: np.ndarray, model_path: str | None = None,
                 min_confidence: float = 0.5) -> FaceLandmarks | None:
    """One-shot detection on a still RGB image."""
    with Landmarker(model_path, video=False, min_confidence=min_confidence) as landmarker:
        return landmarker.detect(image)

