"""Fit the face rig (blendshapes -> canonical landmark offsets) on MediaPipe's own pairs, and write it as package data.

    python tools/fit_face_rig.py --videos ../shared/data/driving --out a1_jax/assets/face_rig.npz

Data: every frame of every video, and its mirror image (left and right blendshapes swap: a symmetric rig from few
people), each (video, mirror) one group. The first `--fit-fraction` of each group's frames are fitted; the rest are
held back and only measured (the tests measure them again). The ridge penalty is chosen by leave-one-video-out on the
fitted frames. Prints one JSON line: residuals (mean landmark error / inter-ocular distance) of the rig and of the
"no motion" prediction, on held-back frames and per left-out video.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from a1_jax.motion import rig  # noqa: E402

RIDGES = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
FIT_FRACTION = 0.75


def split(groups: np.ndarray, fraction: float) -> np.ndarray:
    """True for the first `fraction` of each group's frames (in time order), False for the held-back rest."""
    fitted = np.zeros(len(groups), bool)
    for group in np.unique(groups):
        rows = np.flatnonzero(groups == group)
        fitted[rows[:int(len(rows) * fraction)]] = True
    return fitted


def leave_one_video_out(canonical, scores, groups, videos, ridge) -> dict:
    """Per video: fitted on the others, measured on all of its frames (its own mean as the anchor)."""
    out = {}
    for video in np.unique(videos):
        held = videos == video
        model = rig.fit(canonical[~held], scores[~held], groups[~held], ridge)
        out[str(video)] = rig.residual(model, canonical[held], scores[held], groups[held])
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", default=os.path.join("..", "shared", "data", "driving"))
    parser.add_argument("--out", default=rig.PACKAGED_RIG)
    parser.add_argument("--fit-fraction", type=float, default=FIT_FRACTION)
    parser.add_argument("--landmarker")
    args = parser.parse_args(argv)

    paths = sorted(glob.glob(os.path.join(args.videos, "*.mp4")))
    canonical, scores, groups, videos = [], [], [], []
    for path in paths:
        for mirror in (False, True):
            q, b = rig.measure(path, mirror=mirror, landmarker_path=args.landmarker)
            canonical.append(q)
            scores.append(b)
            groups += [f"{os.path.basename(path)}{' mirrored' if mirror else ''}"] * len(q)
            videos += [os.path.basename(path)] * len(q)
    canonical, scores = np.concatenate(canonical), np.concatenate(scores)
    groups, videos = np.array(groups), np.array(videos)
    fitted = split(groups, args.fit_fraction)

    by_ridge = {}
    for ridge in RIDGES:
        folds = leave_one_video_out(canonical[fitted], scores[fitted], groups[fitted], videos[fitted], ridge)
        by_ridge[ridge] = float(np.mean([fold["rig"] for fold in folds.values()]))
    ridge = min(by_ridge, key=by_ridge.get)
    model = rig.fit(canonical[fitted], scores[fitted], groups[fitted], ridge)
    anchors = {group: (canonical[fitted & (groups == group)].mean(0), scores[fitted & (groups == group)].mean(0))
               for group in np.unique(groups)}
    held_back = rig.residual(model, canonical[~fitted], scores[~fitted], groups[~fitted], anchors)
    summary = {
        "videos": [os.path.basename(p) for p in paths], "frames": int(len(groups)),
        "fitted_frames": int(fitted.sum()), "held_back_frames": int((~fitted).sum()), "ridge": ridge,
        "leave_one_video_out_by_ridge": by_ridge,
        "fitted": rig.residual(model, canonical[fitted], scores[fitted], groups[fitted]),
        "held_back": held_back,
        "leave_one_video_out": leave_one_video_out(canonical[fitted], scores[fitted], groups[fitted],
                                                   videos[fitted], ridge),
    }
    rig.save(model, args.out, ridge=ridge, fit_fraction=args.fit_fraction, videos=np.array(summary["videos"]))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
