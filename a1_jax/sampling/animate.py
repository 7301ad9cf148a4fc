"""`a1-jax animate`: a portrait and a motion source in (driving video, speech, text or blendshape curves), an animated
mp4 (12 fps or `--fps`) with the source's sound (and an optional 12-fps preview) out."""

from __future__ import annotations

import contextlib
import sys
import time

import numpy as np

from a1_jax.errors import UserError
from a1_jax.interpolate import BlendInterpolator, make_interpolator, parse_fps, retime, retimed_length
from a1_jax.io.audio import frame_segments, mux_audio
from a1_jax.io.video import TARGET_FPS, VideoWriter, read_frames
from a1_jax.motion.pipeline import side_by_side
from a1_jax.motion.sources import load_source
from a1_jax.sampling.animator import Animator, Report, plan_video
from a1_jax.weights.checkpoint import ModelConfigs, model_config_folder

RANDOM_WEIGHTS_NOTICE = "random weights: the output shows the pipeline, not a likeness"


def run_animate(args) -> dict:
    """Writes `args.out` (and `args.preview`: reference | driving | control | output); the summary dict."""
    start = time.perf_counter()
    if args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    if args.max_frames is not None and args.max_frames < 1:
        raise UserError(f"--max-frames must be at least 1, got {args.max_frames}")
    fps = parse_fps(args.fps)
    interpolator = make_interpolator(args.interpolator, args.interpolator_weights)  # a bad FILM file fails here
    seam = interpolator if args.seam == "interpolate" else BlendInterpolator()
    with contextlib.ExitStack() as stack:  # outputs first: a path that cannot be written fails before any compute
        writer = stack.enter_context(VideoWriter(args.out, fps))
        preview = stack.enter_context(VideoWriter(args.preview, TARGET_FPS)) if args.preview else None
        # The inputs next: a portrait or driving video without a usable face fails before any weights load.
        source = load_source(driving=args.driving, audio=args.audio, transcript=args.transcript, text=args.text,
                             blendshapes=args.blendshapes, seed=args.seed, with_audio=not args.no_audio)
        folder = args.checkpoint or model_config_folder(args.config)
        plan = plan_video(ModelConfigs.from_folder(folder), args.ref, source.driving, single_clip=args.single_clip,
                          max_frames=args.max_frames, landmarker=args.landmarker, progress=True)
        if args.checkpoint:
            animator = Animator.from_pretrained(folder, dtype=args.dtype, mesh=args.mesh)
        else:
            animator = Animator.from_config(folder, seed=0, dtype=args.dtype, mesh=args.mesh)
            print(RANDOM_WEIGHTS_NOTICE, file=sys.stderr, flush=True)
        report = Report()
        pairs = animator.frames(args.ref, source.driving, steps=args.steps, guidance=args.guidance, seed=args.seed,
                                report=report, progress=True, plan=plan, seam=seam)

        def model_frames():  # at 12 fps; the preview is written as they come
            driving = None
            for frame, control in pairs:
                if preview is not None:
                    if report.motion.driving_path is None:  # a motion track: no driving frames to show
                        preview.write(np.concatenate([report.reference.canvas, control, frame], axis=1))
                    else:
                        if driving is None:  # output frame j shows 12-fps driving frame j (the last where a clip pads)
                            used = report.motion.source_indices
                            order = np.minimum(np.arange(report.expected_frames), len(used) - 1)
                            driving = read_frames(report.motion.driving_path, used[order])
                        preview.write(side_by_side(report.reference.canvas, next(driving), control, frame))
                yield frame

        written = 0
        for frame in retime(model_frames(), TARGET_FPS, fps, interpolator):
            writer.write(frame)
            written += 1
    audio_seconds = None
    if source.audio is not None and report.frames > 0:  # the sound under the frames actually shown
        # Re-timing keeps the 12-fps frames' timeline (frame j's time is still j / 12), so the same cut applies.
        segments = frame_segments(np.rint(report.sample_times[:report.frames] * TARGET_FPS).astype(int))
        audio_seconds = round(mux_audio(args.out, source.audio, segments), 3)
    return {"out": args.out, "frames": written, "fps": fps, "frames_12fps": report.frames, "windows": report.windows,
            "seconds": round(time.perf_counter() - start, 3),
            "stage_seconds": {k: round(v, 3) for k, v in report.stage_seconds.items()},
            "steps": args.steps, "guidance": args.guidance, "seed": args.seed, "dtype": str(animator.dtype),
            "faces_found": report.faces_found, "frames_filled": report.frames_filled,
            "random_weights": animator.random_weights, **source.summary, "audio_seconds": audio_seconds,
            "interpolator": interpolator.name, "seam": args.seam,
            "ok": (report.frames == report.expected_frames and report.frames > 0
                   and written == retimed_length(report.frames, TARGET_FPS, fps))}
