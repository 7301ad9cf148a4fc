"""Long videos as overlapping windows (spec §9.1), and how their decoded frames become one video.

A window holds the reference's landmark frame followed by `window` driving frames (48 for the release's 49-frame
clips); window k starts at driving frame `stride·k` (stride = window − overlap = 40) and the last window is padded by
repeating the last driving frame. Windows stop at the first one that reaches the end, as the reference's loop does.

Stitching: window 0 gives its frames `1 …`; a later window gives frames from `1 + overlap` on. The reference smooths
each seam with FILM; we interpolate over the last `seam_frames` frames of the overlap (all 8 by default), which both
windows rendered: seam frame j (of n) is the frame at t = (j + 1) / (n + 1) between the earlier window's rendering of
that driving frame and the later one's. With the `flow` interpolator a head the windows placed differently moves
across; with `blend` this is the plain cross-fade (both renderings faded, edges doubled).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator

import numpy as np

from a1_jax.interpolate import Interpolator, make_interpolator

SEAM_FRAMES = 8  # the release's whole overlap: the more frames, the smaller each step from one window to the other


@dataclasses.dataclass(frozen=True)
class WindowPlan:
    """Where every window starts in the driving frames, for `num_driving` frames and windows of `window`."""

    num_driving: int
    window: int
    overlap: int

    def __post_init__(self):
        if self.num_driving < 1:
            raise ValueError("a window plan needs at least one driving frame")
        if not 0 <= self.overlap < self.window:
            raise ValueError(f"overlap {self.overlap} must be in [0, window {self.window})")

    @property
    def stride(self) -> int:
        return self.window - self.overlap

    @property
    def starts(self) -> list[int]:
        starts = [0]
        while starts[-1] + self.window < self.num_driving:
            starts.append(starts[-1] + self.stride)
        return starts

    def frames_shown(self, k: int) -> int:
        """How many leading frames of window k's `1 + window` decoded frames `stitch` uses: all but the last
        window's padding."""
        if k < len(self.starts) - 1:
            return 1 + self.window
        return 1 + min(self.window, self.num_driving - self.starts[k])

    def indices(self, start: int) -> np.ndarray:
        """Driving-frame indices of the window at `start`, right-padded with the last driving frame."""
        return np.minimum(np.arange(start, start + self.window), self.num_driving - 1)


def stitch(plan: WindowPlan, windows: Iterable[tuple[np.ndarray, np.ndarray]], seam: Interpolator | None = None,
           seam_frames: int = SEAM_FRAMES) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`(output frame, control frame)` for every driving frame, in order, from each window's decoded frames and
    control frames (both `[1 + window, H, W, 3]` uint8, frame 0 the reference's). `seam`: the interpolator between
    the two renderings of a seam frame (default `flow`; `blend` cross-fades). Holds at most `seam_frames` frames
    back, so memory does not grow with the video."""
    seam = make_interpolator("flow") if seam is None else seam
    seam_frames = min(seam_frames, plan.overlap)
    starts = plan.starts
    held: list[np.ndarray] = []  # the earlier window's rendering of the next seam's frames
    for k, (decoded, control) in enumerate(windows):
        start, last = starts[k], k == len(starts) - 1
        first = 0 if k == 0 else plan.overlap  # the first frame of this window nobody emitted yet
        for j, earlier in enumerate(held):
            m = first - len(held) + j  # this window's rendering of the same driving frame
            yield seam(earlier, decoded[1 + m], [(j + 1) / (len(held) + 1)])[0], control[1 + m]
        keep = plan.window if last else plan.window - seam_frames
        stop = min(keep, plan.num_driving - start)  # padding of the last window is dropped
        for m in range(first, stop):
            yield decoded[1 + m], control[1 + m]
        held = [] if last else [decoded[1 + m].copy() for m in range(keep, plan.window)]
