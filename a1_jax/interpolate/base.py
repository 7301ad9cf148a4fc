"""What every interpolator is: two frames and times in [0, 1] in, the frames at those times out; and `blend`.

Frames are RGB uint8 `[H, W, 3]`, as everywhere in a1_jax. `a` is the frame at t = 0, `b` the one at t = 1. Asking
several times of one pair in one call lets an interpolator do its per-pair work once (the optical flow of `flow`,
the anchor frames of `film`); times 0 and 1 return copies of the inputs without calling it.
"""

from __future__ import annotations

import abc
from typing import Sequence

import numpy as np


class Interpolator(abc.ABC):
    """`interpolator(a, b, times)` → uint8 `[len(times), H, W, 3]`, frame i at time `times[i]` between `a` and `b`."""

    name: str
    parallel = True  # `retime` may interpolate several pairs at once in threads

    def __call__(self, a: np.ndarray, b: np.ndarray, times: Sequence[float]) -> np.ndarray:
        times = np.asarray(times, np.float64).reshape(-1)
        if a.shape != b.shape or a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8 or b.dtype != np.uint8:
            raise ValueError(f"interpolation needs two uint8 RGB frames of one size, got {a.shape} {a.dtype} and "
                             f"{b.shape} {b.dtype}")
        if np.any((times < 0) | (times > 1)) or not np.all(np.isfinite(times)):
            raise ValueError(f"interpolation times must lie in [0, 1], got {times.tolist()}")
        out = np.empty((len(times), *a.shape), np.uint8)
        out[times == 0], out[times == 1] = a, b
        inner = (times > 0) & (times < 1)
        if inner.any():
            out[inner] = self._between(a, b, times[inner])
        return out

    @abc.abstractmethod
    def _between(self, a: np.ndarray, b: np.ndarray, times: np.ndarray) -> np.ndarray:
        """The frames at `times`, all strictly inside (0, 1)."""


class BlendInterpolator(Interpolator):
    """The baseline: a linear cross-fade, `(1 - t)·a + t·b`, rounded. Moving edges show twice."""

    name = "blend"

    def _between(self, a: np.ndarray, b: np.ndarray, times: np.ndarray) -> np.ndarray:
        return np.stack([blend(a, b, t) for t in times])


def blend(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    """`(1 - t)·a + t·b` rounded to uint8 (float32 arithmetic)."""
    mixed = np.float32(1 - t) * a.astype(np.float32) + np.float32(t) * b.astype(np.float32)
    return np.rint(mixed).astype(np.uint8)
