"""Identity: dlib's face-recognition ResNet descriptor (128-d), distance between the reference and generated faces.

The model comes from pip with its weights: `dlib-bin` (a prebuilt dlib) and `face-recognition-models` (dlib's
public-domain `dlib_face_recognition_resnet_model_v1.dat` and `shape_predictor_5_face_landmarks.dat`), the `eval`
extra. dlib documents 0.6 as its same-person threshold on the Euclidean distance (99.38% on LFW).

Face rectangle: the square around MediaPipe's landmarks (already found on every frame), not a second detector. dlib's
HOG detector costs more than the landmarker, misses turned heads, and on the sample portraits and driving frames the
descriptor from our rectangle lies 0.045 (mean of 21 faces) from the one on HOG's own box, 13x below the threshold.
The 5-point shape predictor then places the eye corners and nose the descriptor's alignment was trained with.

Speed: the ResNet takes ~80 ms a face on this project's 2-core CPU sandbox (dlib-bin has no BLAS and holds the GIL),
8x the landmarker. So it runs in one worker process, fed 150×150 aligned chips while the main process runs the
landmark passes, on a uniform subset of frames (`DEFAULT_FRAMES`, as the reference's `arc_score.py`). The worker is
spawned (MediaPipe's threads make fork unsafe), so a script that evaluates needs the usual
`if __name__ == "__main__":` guard; `a1-jax`, `python -m a1_jax` and pytest have it.

`face_recognition_models` is located, never imported: its `__init__` needs `pkg_resources`, which setuptools ≥ 81 no
longer ships.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import dataclasses
import functools
import importlib.util
import multiprocessing
import os

import numpy as np

THRESHOLD = 0.6  # dlib: "if the distance is below 0.6 the two faces are of the same person"
MODEL_NAME = "dlib_face_recognition_resnet_model_v1"
INSTALL_HINT = ("identity needs the eval extra (dlib-bin, face-recognition-models): pip install 'a1_jax[eval]', "
                "or pip install -e '.[eval]' in a checkout")
DEFAULT_FRAMES = 16  # the reference's arc_score.py: 16 frames uniformly sampled per video (spec §8.1)
CHIP_SIZE, CHIP_PADDING = 150, 0.25  # the aligned crop dlib's ResNet reads (compute_face_descriptor's own defaults)


def uniform_frames(num_frames: int, count: int) -> np.ndarray:
    """`count` frame indices spread evenly over `[0, num_frames)`, first and last included; all when count is 0."""
    if count <= 0 or count >= num_frames:
        return np.arange(num_frames)
    return np.unique(np.round(np.linspace(0, num_frames - 1, count)).astype(int))


def face_rectangle(points: np.ndarray) -> tuple[int, int, int, int]:
    """(left, top, right, bottom): the square, centred on the landmarks' box, whose side is its mean side."""
    xy = np.asarray(points, np.float64)[:, :2]
    (x0, y0), (x1, y1) = xy.min(0), xy.max(0)
    cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, ((x1 - x0) + (y1 - y0)) / 4
    return tuple(int(round(v)) for v in (cx - half, cy - half, cx + half, cy + half))


_worker_recognizer = None  # the ResNet, inside the worker process only


def _load_worker(recognizer_path: str) -> None:
    global _worker_recognizer
    import dlib

    _worker_recognizer = dlib.face_recognition_model_v1(recognizer_path)


def _describe_chip(chip: np.ndarray) -> np.ndarray:
    return np.asarray(_worker_recognizer.compute_face_descriptor(chip), np.float64)


@functools.lru_cache(maxsize=None)
def _descriptor_pool(recognizer_path: str) -> concurrent.futures.ProcessPoolExecutor:
    # spawn, not fork: MediaPipe's threads are running in this process. The pool lives as long as the process and
    # is shut down before interpreter teardown (collected during teardown, it prints an ignored exception).
    pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                                  initializer=_load_worker, initargs=(recognizer_path,))
    atexit.register(pool.shutdown)
    pool.submit(int)  # start the worker now: its start-up (dlib, 22 MB of weights) overlaps the landmarker's
    return pool


@dataclasses.dataclass(frozen=True)
class IdentityModel:
    """dlib's 5-point shape predictor (here) and face-recognition ResNet (in the worker process)."""

    shape_predictor: object
    recognizer_path: str

    def chip(self, image: np.ndarray, points: np.ndarray) -> np.ndarray:
        """The aligned 150×150 RGB crop of the face whose MediaPipe landmarks are `points` in RGB uint8 `image`."""
        import dlib

        image = np.ascontiguousarray(image, dtype=np.uint8)
        shape = self.shape_predictor(image, dlib.rectangle(*face_rectangle(points)))
        return dlib.get_face_chip(image, shape, size=CHIP_SIZE, padding=CHIP_PADDING)

    def submit(self, image: np.ndarray, points: np.ndarray) -> concurrent.futures.Future:
        """A future of the face's 128-d descriptor (no jittering: dlib's default, deterministic)."""
        return _descriptor_pool(self.recognizer_path).submit(_describe_chip, self.chip(image, points))

    def descriptor(self, image: np.ndarray, points: np.ndarray) -> np.ndarray:
        return self.submit(image, points).result()


def _model_folder() -> str | None:
    try:
        spec = importlib.util.find_spec("face_recognition_models")
    except (ImportError, ValueError):  # ValueError: present in sys.modules as None (blocked)
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], "models")


@functools.lru_cache(maxsize=None)
def load_identity_model() -> IdentityModel | None:
    """The model, or None when the eval extra is not installed (callers report `INSTALL_HINT`)."""
    try:
        import dlib
    except ImportError:
        return None
    folder = _model_folder()
    if folder is None:
        return None
    predictor = os.path.join(folder, "shape_predictor_5_face_landmarks.dat")
    recognizer = os.path.join(folder, f"{MODEL_NAME}.dat")
    if not (os.path.isfile(predictor) and os.path.isfile(recognizer)):
        return None
    _descriptor_pool(recognizer)
    return IdentityModel(dlib.shape_predictor(predictor), recognizer)


def distance(a: np.ndarray, b: np.ndarray) -> float:
    """Euclidean distance of two descriptors: 0 for the same image, below `THRESHOLD` for the same person."""
    return float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)))
