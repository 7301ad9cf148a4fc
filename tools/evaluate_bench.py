"""What `a1-jax evaluate` scores on known cases, and how fast it runs (the figures in BUILD_NOTES "Evaluation").

    python tools/evaluate_bench.py --shared ../shared --work /tmp/ev [--identity-frames 16] [--repeats 2]

Builds "generated" videos from the sample drivers (each driver re-encoded at 12 fps, the same shifted by 3 frames,
and 47-frame 480×720 clips the size of `animate --single-clip`'s output), scores them against their drivers (and
against another driver), then times the 47-frame clips: generated frames per second in steady state (the first
evaluation, which pays imports and the identity worker's start-up, is not timed). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import cv2
import numpy as np

from a1_jax.evaluate.report import evaluate_video
from a1_jax.io import probe_video, read_frames, resample_indices, write_video

DRIVERS = ("drive_1", "drive_4", "drive_7")
KEYS = ("frames", "expression_l1", "jaw_corr", "pose_error_deg", "landmark_motion")


def sampled(path: str) -> list[np.ndarray]:
    info = probe_video(path)
    return list(read_frames(path, resample_indices(info.num_frames, info.fps)))


def single_clip(frames: list[np.ndarray]) -> list[np.ndarray]:
    """47 frames of 480×720 (animate's single-clip output), the driver's square frames padded to the canvas."""
    return [np.pad(cv2.resize(frames[min(i, len(frames) - 1)], (480, 480)), ((0, 0), (120, 120), (0, 0)))
            for i in range(47)]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared"))
    parser.add_argument("--work", default="/tmp/ev", help="folder for the synthetic generated videos")
    parser.add_argument("--identity-frames", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="timed passes over the three 47-frame clips")
    args = parser.parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    ref = os.path.join(args.shared, "data", "portraits", "ref_1.png")
    driving = {name: os.path.join(args.shared, "data", "driving", f"{name}.mp4") for name in DRIVERS}
    videos = {}
    for name, path in driving.items():
        frames = sampled(path)
        for kind, clip in (("12fps", frames), ("shift3", frames[3:]), ("clip47", single_clip(frames))):
            videos[name, kind] = os.path.join(args.work, f"{name}_{kind}.mp4")
            write_video(videos[name, kind], clip)

    scores = {}
    for name in DRIVERS:
        for kind, align in (("12fps", "sequential"), ("shift3", "sequential"), ("shift3", "nearest")):
            summary, _ = evaluate_video(ref, driving[name], videos[name, kind], align=align,
                                        identity_frames=args.identity_frames)
            scores[f"{name} {kind} {align}"] = {k: summary[k] for k in KEYS}
    for name, other in zip(DRIVERS, DRIVERS[1:] + DRIVERS[:1]):
        summary, _ = evaluate_video(ref, driving[name], videos[other, "12fps"], identity_frames=args.identity_frames)
        scores[f"{other} against driver {name}"] = {k: summary[k] for k in KEYS}

    frames, start, load = 0, time.perf_counter(), os.getloadavg()[0]
    for _ in range(args.repeats):
        for name in DRIVERS:
            summary, _ = evaluate_video(ref, driving[name], videos[name, "clip47"],
                                        identity_frames=args.identity_frames)
            frames += summary["generated_frames"]
    seconds = time.perf_counter() - start
    result = {"scores": scores, "generated_frames": frames, "seconds": round(seconds, 2),
              "frames_per_second": round(frames / seconds, 1), "identity_frames": args.identity_frames,
              "load_average": [round(load, 2), round(os.getloadavg()[0], 2)], "ok": True}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
