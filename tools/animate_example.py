"""Animate a portrait from Python: the API behind `a1-jax animate`, stage by stage, for your own inference scripts.

    python tools/animate_example.py --out /tmp/example.mp4 [--ref PORTRAIT] [--driving VIDEO] [--checkpoint DIR]

Without `--ref` / `--driving` it takes the example portrait and talking clip shipped in `a1_jax.examples`; without
`--checkpoint` it runs the tiny random-weight configuration (the output shows the pipeline, not a likeness).
It animates one clip (the reference's single-clip script: 47 frames at 12 fps) and prints a JSON summary. For a whole
video in windows, `animator(ref, driving)` or `animator.frames(...)` do the same stages per window.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from a1_jax import examples
from a1_jax.io.video import TARGET_FPS, write_video
from a1_jax.motion.pipeline import render_control
from a1_jax.sampling import Animator
from a1_jax.sampling.animator import plan_video


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", default=examples.portrait_path(), help="portrait (default: the shipped example)")
    parser.add_argument("--driving", default=examples.driving_path(), help="driving video (default: the shipped "
                                                                            "example)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--checkpoint", help="release folder or `a1-jax convert` output (default: tiny, random)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()

    # 1. The model: a checkpoint (bf16 on GPU/TPU, fp32 on CPU by default; `mesh="fsdp"` shards it over devices).
    animator = (Animator.from_pretrained(args.checkpoint) if args.checkpoint else Animator.from_config("tiny"))

    # 2. The inputs: the portrait's 480x720 canvas and aligned face, and the driver's landmarks (MediaPipe).
    plan = plan_video(animator.configs, args.ref, args.driving, single_clip=True)
    control = np.stack(list(render_control(plan.motion)))  # [49, 480, 720, 3]: reference landmarks, then the driver

    # 3. Conditions: the reference latent and face tokens once, the pose latents of this clip's control video.
    key = jax.random.key(args.seed)
    image_key, loop_key = jax.random.split(key)
    reference = animator.encode_reference(plan.reference.canvas, plan.reference.face)
    conditions = animator.conditions(reference, control, image_key)

    # 4. The denoising loop: one compiled lax.scan over the steps, CFG on the face tokens.
    latents, _ = animator.denoise(conditions, steps=args.steps, guidance=3.0, key=loop_key)

    # 5. Decode (tiled VAE) and drop the reference frame and the duplicated first driving frame, as the reference does.
    frames = animator.decode(latents)[2:]
    write_video(args.out, frames, fps=TARGET_FPS)
    summary = {"out": args.out, "frames": len(frames), "fps": TARGET_FPS, "shape": list(frames.shape),
               "seconds": round(time.perf_counter() - start, 3), "weights": animator.weights}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
