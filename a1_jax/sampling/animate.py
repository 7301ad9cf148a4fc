"""`a1-jax animate`: a portrait and a motion source in (driving video, speech, text or blendshape curves), an animated
mp4 (12 fps or `--fps`) with the source's sound (and an optional 12-fps preview) out.

Order of work, so that every mistake costs seconds, not minutes: every path (`preflight`, before JAX loads) and the
output rate and interpolator, then the configs and the motion source (`load_source`), then the inputs (`plan`:
portrait, landmarks; configs only), then the weights, then the networks.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

import numpy as np

from a1_jax.interpolate import BlendInterpolator, make_interpolator, parse_fps, retime, retimed_length
from a1_jax.io.audio import frame_segments, mux_audio
from a1_jax.io.video import TARGET_FPS, VideoWriter, read_frames
from a1_jax.motion.pipeline import side_by_side
from a1_jax.motion.sources import MotionSource, load_source
from a1_jax.progress import Stages
from a1_jax.sampling import preflight
from a1_jax.sampling.animator import Animator, NonFiniteLatents, Report, VideoPlan, plan_video
from a1_jax.weights.checkpoint import ModelConfigs, model_config_folder


def random_weights_notice(networks: list[str]) -> str:
    which = "every network" if len(networks) == 4 else ", ".join(networks)
    return f"random weights ({which}): the output shows the pipeline, not a likeness"


@contextlib.contextmanager
def open_outputs(named: list[tuple[str, str]], fps: float) -> Iterator[list[VideoWriter]]:
    """The writers of `preflight.outputs` (`--out` at `fps`, the preview at the model's 12); on an exception they
    remove their partial files."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(VideoWriter(path, fps if flag == "--out" else TARGET_FPS, what=flag))
               for flag, path in named]


def plan(args, configs: ModelConfigs, ref: str, source: MotionSource, stages: Stages) -> VideoPlan:
    """The motion source of the command line as a plan (the portrait's canvas and face, the driver's landmarks)."""
    with stages("landmarks"):
        return plan_video(configs, ref, source.driving, single_clip=args.single_clip, max_frames=args.max_frames,
                          landmarker=args.landmarker, missing_face=args.missing_face,
                          progress=lambda done, total: stages.advance(done, total, "frames"))


def build_animator(args, stages: Stages) -> Animator:
    with stages("model"):
        if args.checkpoint:
            return Animator.from_pretrained(args.checkpoint, dtype=args.dtype, mesh=args.mesh)
        return Animator.from_config(model_config_folder(args.config), seed=0, dtype=args.dtype, mesh=args.mesh)


def run_animate(args) -> dict:
    """Writes `args.out` (and `args.preview`: reference | driving | control | output); the summary dict.

    `args.stages` (a `Stages` the CLI started before its heavy imports) times and shows the stages, if given."""
    stages = getattr(args, "stages", None) or Stages("animate")
    report, animator, error, source, audio_seconds, written = Report(), None, None, None, None, 0
    ref, driving, named = preflight.check(args)
    fps = parse_fps(args.fps)
    interpolator = make_interpolator(args.interpolator, args.interpolator_weights)  # a bad FILM file fails here
    seam = interpolator if args.seam == "interpolate" else BlendInterpolator()
    folder = args.checkpoint or model_config_folder(args.config)
    try:
        # "write": the output checks, the mp4 encoding and finishing; every other stage runs nested inside it.
        with stages("write"), open_outputs(named, fps) as writers:
            writer, preview = writers[0], (writers[1] if len(writers) > 1 else None)
            with stages("checks"):
                configs = ModelConfigs.from_folder(folder)  # a bad checkpoint or config fails before the inputs load
                source = load_source(driving=driving, audio=args.audio, transcript=args.transcript, text=args.text,
                                     blendshapes=args.blendshapes, seed=args.seed, with_audio=not args.no_audio)
            video_plan = plan(args, configs, ref, source, stages)
            animator = build_animator(args, stages)
            if animator.random_networks:
                print(random_weights_notice(animator.random_networks), file=sys.stderr, flush=True)
            pairs = animator.frames(ref, source.driving, steps=args.steps, guidance=args.guidance, seed=args.seed,
                                    report=report, plan=video_plan, stages=stages, seam=seam)

            def model_frames() -> Iterator[np.ndarray]:  # at 12 fps; the preview is written as they come
                driving_frames = None
                for frame, control in pairs:
                    if preview is not None:
                        if report.motion.driving_path is None:  # a motion track: no driving frames to show
                            preview.write(np.concatenate([report.reference.canvas, control, frame], axis=1))
                        else:
                            if driving_frames is None:  # frame j shows driving frame j (the last where a clip pads)
                                used = report.motion.source_indices
                                order = np.minimum(np.arange(report.expected_frames), len(used) - 1)
                                driving_frames = read_frames(report.motion.driving_path, used[order])
                            preview.write(side_by_side(report.reference.canvas, next(driving_frames), control, frame))
                    yield frame

            for frame in retime(model_frames(), TARGET_FPS, fps, interpolator):
                writer.write(frame)
                written += 1
        if source.audio is not None and report.frames > 0:  # the sound under the frames actually shown
            # Re-timing keeps the 12-fps frames' timeline (frame j's time is still j / 12), so the same cut applies.
            with stages("write"):
                segments = frame_segments(np.rint(report.sample_times[:report.frames] * TARGET_FPS).astype(int))
                audio_seconds = round(mux_audio(args.out, source.audio, segments), 3)
    except NonFiniteLatents as e:  # the writers have removed their partial files
        error = str(e)
        print(f"a1-jax: {error}", file=sys.stderr, flush=True)
    finally:
        stages.close()
    summary = {"out": None if error else args.out, "ref": ref, "driving": driving, "frames": written, "fps": fps,
               "frames_12fps": report.frames, "driving_frames": report.expected_frames, "windows": report.windows,
               "seconds": round(stages.elapsed(), 3),
               "stage_seconds": {k: round(v, 3) for k, v in stages.seconds.items()},
               "steps": args.steps, "guidance": args.guidance, "seed": args.seed,
               "dtype": None if animator is None else str(animator.dtype),
               "faces_found": report.faces_found, "missing_face": report.missing_face,
               "frames_without_face": list(report.frames_without_face),
               "weights": None if animator is None else animator.weights,
               "random_weights": None if animator is None else animator.random_weights,
               **(source.summary if source is not None else {}), "audio_seconds": audio_seconds,
               "interpolator": interpolator.name, "seam": args.seam}
    if error:
        return {**summary, "error": error, "ok": False}
    return {**summary, "ok": (report.frames == report.expected_frames and report.frames > 0
                              and written == retimed_length(report.frames, TARGET_FPS, fps))}
