"""Makes the example inputs shipped in `a1_jax/examples/` from public-domain material (provenance: LICENSES.md there).

    pip download --no-deps -d /tmp/wheels scikit-image        # any version: skimage/data/astronaut.png (NASA)
    unzip -o /tmp/wheels/scikit_image-*.whl skimage/data/astronaut.png -d /tmp/skimage
    python tools/make_examples.py --astronaut /tmp/skimage/skimage/data/astronaut.png   # needs espeak-ng (apt)

* `portrait.png`: the top 512×341 (3:2, the canvas's shape) of the photograph, pixels unchanged.
* `driving.mp4`: 4 s at 24 fps (48 frames at 12 fps: one window), 288×288, a close-up of the same photograph that
  talks: the lower face is warped open with the loudness of an espeak-ng sentence (its audio track, AAC), and the
  head rolls, shifts and scales a little. Made here, so we dedicate it to the public domain as well.

Run once by a maintainer; the files are committed, so nothing here runs at install or test time.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import wave

import cv2
import imageio_ffmpeg
import numpy as np

from a1_jax.io.video import VideoWriter
from a1_jax.motion.landmarker import Landmarker

FPS, SECONDS, SIZE = 24, 4.0, 288
QUALITY = 5  # imageio's scale (0-10): a few hundred KB
CROP = (100, 0, 340, 240)  # x1, y1, x2, y2 of the close-up in the 512×512 photograph
SENTENCE = "Hello! This little clip comes with a one jax, so you can try it right away."
MAX_OPEN = 0.16  # the widest mouth opening, as a fraction of the face's height
UPPER_LIP, LOWER_LIP, MOUTH_LEFT, MOUTH_RIGHT, CHIN, FOREHEAD = 13, 14, 61, 291, 152, 10


def speech(path: str) -> np.ndarray:
    """Writes the sentence as a mono wav at `path` (padded or cut to SECONDS); its loudness per video frame in [0, 1]."""
    subprocess.run(["espeak-ng", "-s", "165", "-w", path, SENTENCE], check=True)
    with wave.open(path) as f:
        rate, samples = f.getframerate(), np.frombuffer(f.readframes(f.getnframes()), np.int16)
    total = int(rate * SECONDS)
    samples = np.pad(samples, (0, max(0, total - len(samples))))[:total]
    with wave.open(path, "wb") as f:
        f.setnchannels(1), f.setsampwidth(2), f.setframerate(rate)
        f.writeframes(samples.astype(np.int16).tobytes())
    frames = np.array_split(samples.astype(np.float32), int(FPS * SECONDS))
    loudness = np.array([np.sqrt((frame ** 2).mean()) for frame in frames])
    loudness = np.convolve(loudness, np.ones(3) / 3, mode="same")  # the jaw is slower than the waveform
    return np.clip(loudness / np.percentile(loudness, 95), 0, 1)


def open_mouth(image: np.ndarray, points: np.ndarray, amount: float) -> np.ndarray:
    """The lower face pulled down by `amount` pixels below the lips (a smooth remap) with a dark gap between them."""
    height, width = image.shape[:2]
    lip_y = (points[UPPER_LIP, 1] + points[LOWER_LIP, 1]) / 2
    centre_x = (points[MOUTH_LEFT, 0] + points[MOUTH_RIGHT, 0]) / 2
    half_width = (points[MOUTH_RIGHT, 0] - points[MOUTH_LEFT, 0]) / 2
    chin_y = points[CHIN, 1]
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    across = np.exp(-((xs - centre_x) / (2.2 * half_width)) ** 2)
    below = np.clip((ys - lip_y) / 2.0, 0, 1) * np.clip(1 - (ys - chin_y) / (0.6 * (chin_y - lip_y)), 0, 1)
    source_y = (ys - amount * across * below).astype(np.float32)
    shifted = cv2.remap(image, xs, source_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    if amount >= 1:
        cv2.ellipse(shifted, (int(round(centre_x)), int(round(lip_y + amount / 2))),
                    (int(round(0.8 * half_width)), int(round(amount / 2))), 0, 0, 360, (60, 22, 28), -1, cv2.LINE_AA)
    return shifted


def head_motion(image: np.ndarray, centre: tuple[float, float], t: float) -> np.ndarray:
    """A little roll, shift and scale about the face centre at time `t` seconds."""
    angle = 6 * np.sin(2 * np.pi * t / 3.1)
    scale = 1 + 0.04 * np.sin(2 * np.pi * t / 2.7)
    matrix = cv2.getRotationMatrix2D(centre, angle, scale)
    matrix[:, 2] += (7 * np.sin(2 * np.pi * t / 2.3), 4 * np.sin(2 * np.pi * t / 1.9))
    return cv2.warpAffine(image, matrix, image.shape[1::-1], flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--astronaut", required=True, help="skimage/data/astronaut.png from a scikit-image wheel")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "a1_jax", "examples"))
    args = parser.parse_args()
    photo = cv2.cvtColor(cv2.imread(args.astronaut, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    if photo.shape != (512, 512, 3):
        raise SystemExit(f"expected the 512x512 astronaut photograph, got {photo.shape}")
    cv2.imwrite(os.path.join(args.out, "portrait.png"), cv2.cvtColor(photo[:341], cv2.COLOR_RGB2BGR),
                [cv2.IMWRITE_PNG_COMPRESSION, 9])

    with Landmarker() as landmarker:
        face = landmarker.detect(photo)
    points = face.points
    centre = (float(points[:, 0].mean()), float(points[:, 1].mean()))
    face_height = points[CHIN, 1] - points[FOREHEAD, 1]
    x1, y1, x2, y2 = CROP
    with tempfile.TemporaryDirectory() as folder:
        audio = os.path.join(folder, "speech.wav")
        loudness = speech(audio)
        frames = []
        for i, level in enumerate(loudness):
            moved = head_motion(open_mouth(photo, points, MAX_OPEN * face_height * level), centre, i / FPS)
            frames.append(cv2.resize(moved[y1:y2, x1:x2], (SIZE, SIZE), interpolation=cv2.INTER_CUBIC))
        silent = os.path.join(folder, "silent.mp4")
        with VideoWriter(silent, FPS, quality=QUALITY) as writer:
            for frame in frames:
                writer.write(frame)
        subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-i", silent, "-i", audio,
                        "-c:v", "copy", "-c:a", "aac", "-b:a", "48k", "-shortest",
                        os.path.join(args.out, "driving.mp4")], check=True)


if __name__ == "__main__":
    main()
