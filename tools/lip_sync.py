"""Lip sync against ground truth: the speech track's jawOpen vs MediaPipe's jawOpen on the speaker's own video.

    python tools/lip_sync.py                      # the sample talking videos drive_{1,3,4} and speech_{1,3,4}.wav
    python tools/lip_sync.py --pair VIDEO AUDIO   # any talking video and its audio (the video's own if AUDIO=-)

Per pair: Pearson r between the track's jawOpen (from the audio alone) and MediaPipe's jawOpen measured on the video
at 12 fps (the motion branch's sampling), at the best lag within ±2 frames; next to the same measure for the
baseline, the audio's RMS envelope over each frame's interval. One JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from a1_jax.io.audio import SPEECH_RATE, read_audio  # noqa: E402
from a1_jax.io.video import TARGET_FPS, probe_video, read_frames, resample_indices  # noqa: E402
from a1_jax.motion import speech  # noqa: E402
from a1_jax.motion.landmarker import BLENDSHAPE_NAMES, Landmarker  # noqa: E402

MAX_LAG = 2
SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")
SAMPLES = [(os.path.join(SHARED, "driving", f"drive_{i}.mp4"), os.path.join(SHARED, "audio", f"speech_{i}.wav"))
           for i in (1, 3, 4)]


def measured_jaw(video: str) -> np.ndarray:
    """MediaPipe's jawOpen on the video's 12-fps frames (NaN where no face)."""
    info = probe_video(video)
    indices = resample_indices(info.num_frames, info.fps)
    jaw = np.full(len(indices), np.nan)
    with Landmarker(video=True) as landmarker:
        for k, (frame, index) in enumerate(zip(read_frames(video, indices), indices)):
            face = landmarker.detect(frame, int(round(index * 1000 / info.fps)))
            if face is not None:
                jaw[k] = face.blendshapes[BLENDSHAPE_NAMES.index("jawOpen")]
    return jaw


def rms_envelope(samples: np.ndarray, count: int, rate: int = SPEECH_RATE) -> np.ndarray:
    """RMS of the audio over each 12-fps frame's interval `[k/12 − 1/24, k/12 + 1/24)`."""
    half = rate / TARGET_FPS / 2
    out = np.zeros(count)
    for k in range(count):
        centre = k * rate / TARGET_FPS
        window = samples[max(0, int(centre - half)):int(centre + half)]
        out[k] = np.sqrt(np.mean(window ** 2)) if len(window) else 0.0
    return out


def best_lag_r(predicted: np.ndarray, measured: np.ndarray, max_lag: int = MAX_LAG) -> tuple[float, int]:
    """Highest Pearson r of `predicted[k]` vs `measured[k + lag]` over lags in ±`max_lag` (frames with a face)."""
    best = (-np.inf, 0)
    for lag in range(-max_lag, max_lag + 1):
        a = predicted[max(0, -lag):len(predicted) - max(0, lag)]
        b = measured[max(0, lag):len(measured) - max(0, -lag)]
        n = min(len(a), len(b))
        a, b = a[:n], b[:n]
        keep = np.isfinite(a) & np.isfinite(b)
        if keep.sum() >= 3 and a[keep].std() > 0 and b[keep].std() > 0:
            best = max(best, (float(np.corrcoef(a[keep], b[keep])[0, 1]), lag))
    return best


def evaluate(video: str, audio: str, measured: np.ndarray | None = None) -> dict:
    samples = read_audio(audio).mono
    measured = measured_jaw(video) if measured is None else measured
    track, _ = speech.track_from_speech(samples)
    count = min(len(track), len(measured))
    r, lag = best_lag_r(track.curve("jawOpen")[:count], measured[:count])
    baseline, baseline_lag = best_lag_r(rms_envelope(samples, count), measured[:count])
    return {"video": os.path.basename(video), "frames": count, "r": round(r, 3), "lag": lag,
            "rms_r": round(baseline, 3), "rms_lag": baseline_lag}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", nargs=2, action="append", metavar=("VIDEO", "AUDIO"))
    args = parser.parse_args(argv)
    pairs = [(v, v if a == "-" else a) for v, a in args.pair] if args.pair else SAMPLES
    rows = [evaluate(video, audio) for video, audio in pairs]
    summary = {"pairs": rows, "mean_r": round(float(np.mean([r["r"] for r in rows])), 3),
               "mean_rms_r": round(float(np.mean([r["rms_r"] for r in rows])), 3)}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
