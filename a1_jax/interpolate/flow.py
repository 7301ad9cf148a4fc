"""`flow`: frame interpolation by dense optical flow both ways, with occlusion from forward–backward consistency.

No weights; OpenCV only. For a pair `a` (t = 0), `b` (t = 1):

1. Flow both ways (DIS) on the grey frames at half their size, but on no fewer than `MIN_FLOW_PIXELS` and no more
   than `MAX_FLOW_PIXELS` (the flow is smooth; the warp below runs at full resolution).
2. Forward–backward consistency of every pixel of each frame, `|f01(x) + f10(x + f01(x))|`: a pixel the other frame
   hides has no consistent match.
3. For each time t, every pixel of `a` is carried a fraction t of its motion, every pixel of `b` a fraction 1 − t
   back (splatted to the nearest pixel of a half-resolution grid; where nothing lands, the 3×3 neighbourhood closes
   the gap a stretching motion leaves). Where two pixels land together, the consistent one wins: at time t a pixel
   being covered is already inconsistent, the one covering it is not. Where `a`'s pixels land, `a` is visible at t;
   likewise `b`; the motions that land give one motion per pixel of the frame at t (where none lands, the linear
   blend of both flows stands in).
4. Both frames are read along that motion (backward warp at full resolution) and blended with weights
   `(1 − t)·visible_a` and `t·visible_b`: by occlusion and by distance in time.

A pair whose flow is mostly inconsistent does not show one scene moving (a cut, a flash): it is cross-faded, as
`blend` would.
"""

from __future__ import annotations

import dataclasses
import threading

import numpy as np

from a1_jax.interpolate.base import Interpolator, blend

FLOW_SCALE = 0.5  # flow on a half-size copy: at 720×480, ~2.7× less work than full size for 0.05 dB (BUILD_NOTES)
MIN_FLOW_PIXELS = 360 * 240  # small frames keep enough flow resolution
MAX_FLOW_PIXELS = 960 * 540  # large frames (4K) cost what 1080p costs
MIN_FLOW_SIDE = 12  # DIS needs one side at least this long; smaller pairs are cross-faded
MIN_SPLAT_SIDE = 64  # the projection runs at half the flow resolution unless that makes a side shorter than this
CONSISTENCY_PIXELS = 1.0  # scale of the forward–backward error (projection-grid pixels) in a pixel's weight
INCONSISTENT_PIXELS = 2.0  # a pixel whose forward–backward error exceeds this has no match in the other frame
CUT_FRACTION = 0.5  # more pixels without a match than this: not one scene moving


@dataclasses.dataclass(frozen=True)
class PairFlow:
    """A pair's flows on the projection grid (in its pixels) and each pixel's consistency weight."""

    forward: np.ndarray  # [h, w, 2] f01: where a's pixel x is in b, minus x (x, y order)
    backward: np.ndarray  # [h, w, 2] f10
    weight_a: np.ndarray  # [h, w]: ~1 for a pixel whose match in b leads back to it, ~0.001 for one without a match
    weight_b: np.ndarray
    inconsistent: float  # the fraction of pixels (of both frames) without a match


class FlowInterpolator(Interpolator):
    name = "flow"

    def __init__(self):
        import cv2

        self._cv2 = cv2
        self._local = threading.local()  # a DIS object per thread: pairs may be interpolated in parallel
        self._grids: dict[tuple[int, int], np.ndarray] = {}

    @property
    def _dis(self):
        if not hasattr(self._local, "dis"):
            # FAST: within 0.05 dB of MEDIUM on the sample videos at a fraction of the time (BUILD_NOTES, issue 17).
            self._local.dis = self._cv2.DISOpticalFlow_create(self._cv2.DISOPTICAL_FLOW_PRESET_FAST)
        return self._local.dis

    def _between(self, a: np.ndarray, b: np.ndarray, times: np.ndarray) -> np.ndarray:
        flow = self.pair_flow(a, b)
        if flow is None or flow.inconsistent > CUT_FRACTION:
            return np.stack([blend(a, b, t) for t in times])
        return np.stack([self._at(a, b, flow, t) for t in times])

    def pair_flow(self, a: np.ndarray, b: np.ndarray) -> PairFlow | None:
        """Flows both ways (DIS) and their consistency on the projection grid; None where the frames are too small."""
        cv2 = self._cv2
        height, width = a.shape[:2]
        pixels = height * width
        scale = float(np.clip(FLOW_SCALE, np.sqrt(MIN_FLOW_PIXELS / pixels), np.sqrt(MAX_FLOW_PIXELS / pixels)))
        scale = min(1.0, scale)
        flow_size = (max(1, round(width * scale)), max(1, round(height * scale)))
        if max(flow_size) < MIN_FLOW_SIDE:
            return None
        grey = []
        for frame in (a, b):
            g = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
            grey.append(g if scale == 1.0 else cv2.resize(g, flow_size, interpolation=cv2.INTER_AREA))
        return self._pair(self._dis.calc(grey[0], grey[1], None), self._dis.calc(grey[1], grey[0], None))

    def frames_from_flows(self, a: np.ndarray, b: np.ndarray, forward: np.ndarray, backward: np.ndarray,
                          times) -> np.ndarray:
        """The frames at `times` (in (0, 1)) from given flows `f01`, `f10` (`[h, w, 2]` float32, x-y order, in pixels
        of their own size): for flows from elsewhere, and to test the occlusion handling with exact flows."""
        flow = self._pair(np.asarray(forward, np.float32), np.asarray(backward, np.float32))
        return np.stack([self._at(a, b, flow, float(t)) for t in times])

    def _pair(self, forward: np.ndarray, backward: np.ndarray) -> PairFlow:
        """Flows moved to the projection grid (half their size where that stays large enough), with consistency."""
        cv2 = self._cv2
        height, width = forward.shape[:2]
        if min(height, width) >= 2 * MIN_SPLAT_SIDE:  # the flow is smooth: half the grid loses nothing that shows
            size = (width // 2, height // 2)
            factor = np.array([size[0] / width, size[1] / height], np.float32)
            forward = cv2.resize(forward, size, interpolation=cv2.INTER_AREA) * factor
            backward = cv2.resize(backward, size, interpolation=cv2.INTER_AREA) * factor
        error_a, error_b = self._fb_error(forward, backward), self._fb_error(backward, forward)
        limit = INCONSISTENT_PIXELS ** 2
        inconsistent = float((np.count_nonzero(error_a > limit) + np.count_nonzero(error_b > limit))
                             / (2 * error_a.size))
        scale2 = np.float32(CONSISTENCY_PIXELS ** 2)
        # The floor keeps a pixel without a match from vanishing where nothing else lands (what only it shows).
        return PairFlow(forward, backward, np.exp(-error_a / scale2) + 1e-3, np.exp(-error_b / scale2) + 1e-3,
                        inconsistent)

    def _grid(self, height: int, width: int) -> np.ndarray:
        """Pixel coordinates `[h, w, 2]` (x, y), float32; cached per size."""
        if (height, width) not in self._grids:
            x, y = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
            self._grids[(height, width)] = np.stack([x, y], -1)
        return self._grids[(height, width)]

    def _sample(self, image: np.ndarray, coordinates: np.ndarray) -> np.ndarray:
        """`image` read (bilinear) at `coordinates` `[h, w, 2]` (x, y), edges repeated."""
        cv2 = self._cv2
        return cv2.remap(image, coordinates, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)

    def _fb_error(self, there: np.ndarray, back: np.ndarray) -> np.ndarray:
        """Squared forward–backward error of every pixel: `|there(x) + back(x + there(x))|²`."""
        grid = self._grid(*there.shape[:2])
        round_trip = there + self._sample(back, grid + there)
        return np.einsum("hwc,hwc->hw", round_trip, round_trip)

    def _splat(self, motion: np.ndarray, fraction: float, weight: np.ndarray) -> np.ndarray:
        """Carries each pixel `fraction` of its `motion` (the a → b motion of the scene point it shows) to the
        nearest grid pixel: per pixel of the frame at t, `[Σ w·motion_x, Σ w·motion_y, Σ w, count]` over what lands
        there; where nothing does, over its 3×3 neighbourhood (closing the gaps a stretching motion leaves)."""
        cv2 = self._cv2
        height, width = motion.shape[:2]
        target = cv2.scaleAdd(motion, float(fraction), self._grid(height, width))
        x = np.rint(target[..., 0]).astype(np.int32)
        y = np.rint(target[..., 1]).astype(np.int32)
        inside = ((x >= 0) & (x < width) & (y >= 0) & (y < height)).astype(np.float32)
        index = (np.clip(y, 0, height - 1) * width + np.clip(x, 0, width - 1)).ravel()
        w = (weight * inside).ravel()
        size = height * width
        sums = np.stack([np.bincount(index, w * motion[..., 0].ravel(), size),
                         np.bincount(index, w * motion[..., 1].ravel(), size),
                         np.bincount(index, w, size),
                         np.bincount(index, inside.ravel(), size)], -1).astype(np.float32).reshape(height, width, 4)
        around = cv2.boxFilter(sums, -1, (3, 3), normalize=False, borderType=cv2.BORDER_CONSTANT)
        return np.where(sums[..., 3:] > 0, sums, around)

    def _at(self, a: np.ndarray, b: np.ndarray, flow: PairFlow, t: float) -> np.ndarray:
        cv2 = self._cv2
        from_a = self._splat(flow.forward, t, flow.weight_a)
        from_b = self._splat(-flow.backward, -(1 - t), flow.weight_b)  # b's pixel x moves by −f10(x) from a to b
        both = from_a + from_b
        total = both[..., 2:3]
        linear = (1 - t) * flow.forward - t * flow.backward
        motion = np.where(total > 1e-6, both[..., :2] / np.maximum(total, 1e-6), linear)
        weight_a = (1 - t) * (np.minimum(from_a[..., 3], 1) + 1e-3)
        weight_b = t * (np.minimum(from_b[..., 3], 1) + 1e-3)
        share_a = (weight_a / (weight_a + weight_b)).astype(np.float32)  # of a in the blend
        height, width = a.shape[:2]
        h, w = motion.shape[:2]
        if (h, w) != (height, width):  # the fields are smooth: bilinear upsampling loses nothing that matters
            motion = cv2.resize(motion * np.array([width / w, height / h], np.float32), (width, height),
                                interpolation=cv2.INTER_LINEAR)
            share_a = cv2.resize(share_a, (width, height), interpolation=cv2.INTER_LINEAR)
        motion = motion.astype(np.float32)
        grid = self._grid(height, width)
        from_a_frame = self._sample(a, cv2.scaleAdd(motion, -float(t), grid))
        from_b_frame = self._sample(b, cv2.scaleAdd(motion, float(1 - t), grid))
        return cv2.blendLinear(from_a_frame, from_b_frame, share_a, 1 - share_a)
