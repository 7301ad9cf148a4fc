"""`--plot`: one small PNG of an evaluation: jawOpen, yaw and pitch of driving vs generated over time, and the
identity distance per frame with its same-person threshold.

Drawn with matplotlib's object API on an Agg canvas (no pyplot): no global state, no display needed.
"""

from __future__ import annotations

import numpy as np

from a1_jax.errors import UserError

SIZE_INCHES = (8.0, 7.5)
DPI = 100  # 800 x 750 pixels


def write_plot(path: str, frames: list[dict], summary: dict) -> None:
    """Draw the per-frame rows of one evaluation (`--out`'s "frames") and its summary into a PNG at `path`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=SIZE_INCHES, dpi=DPI)
    FigureCanvasAgg(figure)
    jaw, pose, identity = figure.subplots(3, 1, sharex=True)
    paired = [row for row in frames if row["jawOpen"] is not None]
    x = np.array([row["generated"] for row in paired])

    def series(key: str, side: int) -> np.ndarray:
        return np.array([row[key][side] for row in paired], np.float64)

    jaw.plot(x, series("jawOpen", 1), color="tab:grey", label="driving")
    jaw.plot(x, series("jawOpen", 0), color="tab:red", label="generated")
    jaw.set_ylabel("jawOpen")
    jaw.set_title(f"expression L1 {_fmt(summary['expression_l1'])}, jaw r {_fmt(summary['jaw_corr'])}", fontsize=9)
    jaw.legend(loc="best", fontsize=8)

    for key, colour in (("yaw", "tab:blue"), ("pitch", "tab:green")):
        pose.plot(x, series(key, 1), color=colour, alpha=0.4, linestyle="--", label=f"{key} driving")
        pose.plot(x, series(key, 0), color=colour, label=f"{key} generated")
    pose.set_ylabel("degrees from frame 0")
    pose.set_title(f"pose error {_fmt(summary['pose_error_deg'])} deg, landmark motion "
                   f"{_fmt(summary['landmark_motion'])} IOD", fontsize=9)
    pose.legend(loc="best", fontsize=8, ncol=2)

    scored = [row for row in frames if row["identity_distance"] is not None]
    identity.axhline(summary["identity_threshold"], color="tab:grey", linestyle=":", label="same-person threshold")
    if scored:
        identity.plot([row["generated"] for row in scored], [row["identity_distance"] for row in scored],
                      marker="o", color="tab:purple", label="generated vs reference")
        identity.legend(loc="best", fontsize=8)
    else:
        identity.text(0.5, 0.5, summary.get("identity_note", "no identity"), ha="center", va="center",
                      transform=identity.transAxes, fontsize=8, wrap=True)
    identity.set_ylim(0, max([1.0] + [row["identity_distance"] for row in scored]))
    identity.set_ylabel("identity distance")
    identity.set_xlabel("generated frame (12 fps)")
    figure.tight_layout()
    try:
        figure.savefig(path, format="png")
    except OSError as e:
        raise UserError(f"cannot write the plot {path}: {e.strerror or e}") from None


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"
