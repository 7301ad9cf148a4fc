"""`film`: FILM (Reda et al., ECCV 2022) as the reference runs it, from a TorchScript file the user supplies.

The reference loads `film_net_fp16.pt` (the TorchScript export of dajes/frame-interpolation-pytorch) with
`torch.jit.load`, casts it to fp16 on CUDA and calls `model(x0, x1, dt)`: `x0`, `x1` RGB `[1, 3, H, W]` in [0, 1],
`dt` `[1, 1]`, all in the model's dtype; the result `[1, 3, H, W]` is clamped to [0, 1] (spec §1.7, §9.1). Frames are
passed at their own size, unpadded, as the reference does. Several in-betweens of one pair are made the reference's
recursive way: the next frame made is the remaining time nearest the middle of an interval between frames already
known (ties: the earliest), from that interval's two ends; its result, unrounded, is a known frame from then on
(12 → 48 fps: t = ½ from the pair, then ¼ and ¾ from the halves, each at dt = ½).

torch is an optional extra, imported here only. fp16 on CUDA as the reference; fp32 on CPU, where half-precision
convolutions are slow (the FILM port's own CPU path is fp32 too).
"""

from __future__ import annotations

import os
import warnings

import numpy as np

from a1_jax.errors import UserError
from a1_jax.interpolate.base import Interpolator

CHECK_SIZE = 64  # side of the frames the file is tried on when loaded: FILM's 7-level pyramid halves 6 times


class FilmInterpolator(Interpolator):
    name = "film"
    parallel = False  # torch runs its own threads

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise UserError(f"FILM weights not found: {path}")
        try:
            import torch
        except ImportError:
            raise UserError("--interpolator film needs PyTorch: pip install torch (FILM runs as a TorchScript file)")
        self._torch = torch
        try:
            with warnings.catch_warnings():  # recent torch deprecates TorchScript; FILM's release is one
                warnings.simplefilter("ignore", DeprecationWarning)
                model = torch.jit.load(path, map_location="cpu")
        except Exception as e:  # torch raises RuntimeError, ValueError, pickle errors... for a file it cannot read
            raise UserError(f"{path} is not a TorchScript file (FILM's film_net_fp16.pt): "
                            f"{_first_line(e)}") from None
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self._model = model.eval().to(device=self.device, dtype=self.dtype)
        self._check(path)

    def _check(self, path: str) -> None:
        """A file that loads but is not FILM (another network, a different signature) fails here, before any work."""
        torch = self._torch
        x = torch.zeros((1, 3, CHECK_SIZE, CHECK_SIZE))
        try:
            out = self._run(x, x, 0.5)
        except Exception as e:
            raise UserError(f"{path} is not a FILM model: model(x0, x1, dt) failed: {_first_line(e)}") from None
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(x.shape):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise UserError(f"{path} is not a FILM model: model(x0, x1, dt) on [1, 3, {CHECK_SIZE}, {CHECK_SIZE}] "
                            f"frames returned {shape}")

    def _run(self, x0, x1, dt: float):
        """One call as the reference makes it; float32 `[1, 3, H, W]` in and out, clamped to [0, 1]."""
        torch = self._torch
        x0 = x0.to(device=self.device, dtype=self.dtype)
        x1 = x1.to(device=self.device, dtype=self.dtype)
        with torch.no_grad():
            out = self._model(x0, x1, x0.new_full((1, 1), dt))
        return out.clamp(0, 1).float().cpu() if isinstance(out, torch.Tensor) else out

    def _between(self, a: np.ndarray, b: np.ndarray, times: np.ndarray) -> np.ndarray:
        torch = self._torch
        known = {0.0: _to_tensor(torch, a), 1.0: _to_tensor(torch, b)}
        remaining = sorted(set(float(t) for t in times))
        while remaining:
            ends = sorted(known)
            best = None  # (distance from the middle, time, start, end)
            for time in remaining:
                end = next(e for e in ends if e > time)
                start = max(s for s in ends if s < time)
                candidate = (round(abs((time - start) / (end - start) - 0.5), 9), time, start, end)
                best = candidate if best is None or candidate < best else best
            _, time, start, end = best
            known[time] = self._run(known[start], known[end], (time - start) / (end - start))
            remaining.remove(time)
        # The reference's conversion: ×255, then truncated to uint8.
        return np.stack([(known[float(t)][0].permute(1, 2, 0) * 255).clamp(0, 255).to(torch.uint8).numpy()
                         for t in times])


def _to_tensor(torch, frame: np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)[None].float() / 255


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
