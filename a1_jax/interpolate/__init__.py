"""Frame interpolation: output at any frame rate (`retime`, `a1-jax interpolate`, `animate --fps`) and long-video seams.

```python
from a1_jax.interpolate import make_interpolator, retime

flow = make_interpolator("flow")
middle = flow(frame_a, frame_b, [0.5])[0]                      # uint8 [H, W, 3], halfway from a to b
frames_60 = retime(frames_12, 12, 60, flow)                    # a stream of frames at 60 fps, same duration
```

Interpolators (one call: two frames and times in [0, 1] → the frames at those times):
* `flow` (default): dense optical flow both ways, occlusion from forward–backward consistency; no weights.
* `blend`: a linear cross-fade, the baseline (and the long-video seam's cross-fade).
* `film`: FILM from a TorchScript file the user supplies (`film_net_fp16.pt`, as the reference); needs torch.
"""

from __future__ import annotations

from a1_jax.errors import UserError
from a1_jax.interpolate.base import BlendInterpolator, Interpolator, blend
from a1_jax.interpolate.retime import MAX_FPS, MIN_FPS, parse_fps, retime, retimed_length

INTERPOLATORS = ("flow", "blend", "film")


def make_interpolator(name: str = "flow", weights: str | None = None) -> Interpolator:
    """The interpolator called `name`; `weights`: the TorchScript file `film` needs (and the others refuse)."""
    if name not in INTERPOLATORS:
        raise UserError(f"unknown interpolator {name!r}: choose one of {', '.join(INTERPOLATORS)}")
    if name == "film":
        if not weights:
            raise UserError("--interpolator film needs --interpolator-weights FILE (FILM's film_net_fp16.pt, "
                            "a TorchScript file: github.com/dajes/frame-interpolation-pytorch/releases)")
        from a1_jax.interpolate.film import FilmInterpolator

        return FilmInterpolator(weights)
    if weights:
        raise UserError(f"--interpolator-weights is for --interpolator film, not {name}")
    if name == "blend":
        return BlendInterpolator()
    from a1_jax.interpolate.flow import FlowInterpolator

    return FlowInterpolator()


__all__ = ["INTERPOLATORS", "MAX_FPS", "MIN_FPS", "BlendInterpolator", "Interpolator", "blend", "make_interpolator",
           "parse_fps", "retime", "retimed_length"]
