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
from a1_jax.progress import Cancelled, Stages
from a1_jax.sampling import preflight
from a1_jax.sampling.preflight import AnimateRequest
from a1_jax.sampling.animator import Animator, NonFiniteLatents, Report, VideoPlan, plan_video
from a1_jax.weights.checkpoint import ModelConfigs, model_config_folder


def random_weights_notice(networks: list[str]) -> str:
    which = "every network" if len(networks) == 4 else ", ".join(networks)
    return f"random weights ({which}): the output shows the pipeline, not a likeness"


@contextlib.contextmanager
def open_outputs(named: list[tuple[str, str]], fps: float) -> Iterator[dict[str, VideoWriter]]:
    """The writers of `preflight.outputs` by flag (`--out` at `fps`, the preview and control videos at the model's
    12); on an exception they remove their partial files."""
    with contextlib.ExitStack() as stack:
        yield {flag: stack.enter_context(VideoWriter(path, fps if flag == "--out" else TARGET_FPS, what=flag))
               for flag, path in named}


def plan(request: AnimateRequest, configs: ModelConfigs, ref: str, source: MotionSource,
         stages: Stages) -> VideoPlan:
    """The motion source of a request as a plan (the portrait's canvas and face, the driver's landmarks)."""
    with stages("landmarks"):
        return plan_video(configs, ref, source.driving, single_clip=request.single_clip,
                          max_frames=request.max_frames, landmarker=request.landmarker,
                          missing_face=request.missing_face,
                          progress=lambda done, total: stages.advance(done, total, "frames"))


def build_animator(checkpoint: str | None, config: str = "tiny", *, dtype: str | None = None,
                   mesh: str | None = None, offload: str = "auto") -> Animator:
    """The Animator of `checkpoint`, or seeded random weights for `config` without one (`--checkpoint`/`--config`);
    `offload`: `on`, `off` or `auto` (`Animator.from_pretrained`)."""
    if checkpoint:
        return Animator.from_pretrained(checkpoint, dtype=dtype, mesh=mesh, offload=offload)
    return Animator.from_config(model_config_folder(config), seed=0, dtype=dtype, mesh=mesh, offload=offload)


def run_animate(request: AnimateRequest, *, stages: Stages | None = None, animator: Animator | None = None) -> dict:
    """Writes `request.out` (and `request.preview`: reference | driving | control | output, `request.control`: the
    control video); returns the summary dict (`ok`, `out`, `frames`, `stage_seconds`, ...).

    `stages` times and shows the stages (the CLI starts one before its heavy imports); `stages.cancel()` from another
    thread stops the run at its next progress point (a driving frame, a denoising step, a decoder chunk): the summary
    then has `cancelled` and `error`, `ok` false, and no output is left. `animator`: one already built (a server
    keeps its own; `request.checkpoint`, `config`, `dtype`, `mesh` and `offload` are then not used). A user's mistake
    raises `UserError` before any output is written."""
    stages = stages or Stages("animate")
    report, error, cancelled, source, audio_seconds, written = Report(), None, False, None, None, 0
    ref, driving, named = preflight.check(request)
    fps = parse_fps(request.fps)
    interpolator = make_interpolator(request.interpolator, request.interpolator_weights)  # a bad FILM file fails here
    seam = interpolator if request.seam == "interpolate" else BlendInterpolator()
    try:
        # "write": the output checks, the mp4 encoding and finishing; every other stage runs nested inside it.
        with stages("write"), open_outputs(named, fps) as writers:
            writer, preview, control_writer = writers["--out"], writers.get("--preview"), writers.get("--control")
            with stages("checks"):
                # a bad checkpoint or config fails before the inputs load
                configs = animator.configs if animator else ModelConfigs.from_folder(
                    request.checkpoint or model_config_folder(request.config))
                source = load_source(driving=driving, audio=request.audio, transcript=request.transcript,
                                     text=request.text, blendshapes=request.blendshapes, seed=request.seed,
                                     with_audio=not request.no_audio, max_seconds=request.max_seconds)
            video_plan = plan(request, configs, ref, source, stages)
            if animator is None:
                with stages("model"):
                    animator = build_animator(request.checkpoint, request.config, dtype=request.dtype,
                                              mesh=request.mesh, offload=request.offload)
            if animator.random_networks:
                print(random_weights_notice(animator.random_networks), file=sys.stderr, flush=True)
            pairs = animator.frames(ref, source.driving, steps=request.steps, guidance=request.guidance,
                                    seed=request.seed, report=report, plan=video_plan, stages=stages, seam=seam)

            def model_frames() -> Iterator[np.ndarray]:  # at 12 fps; the preview and control are written as they come
                driving_frames = None
                for frame, control in pairs:
                    if control_writer is not None:
                        control_writer.write(control)
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
                audio_seconds = round(mux_audio(request.out, source.audio, segments), 3)
    except NonFiniteLatents as e:  # the writers have removed their partial files
        error = str(e)
        print(f"a1-jax: {error}", file=sys.stderr, flush=True)
    except Cancelled:
        error, cancelled = f"cancelled at {stages.cancelled_at}: nothing was written", True
    finally:
        stages.close()
    summary = {"out": None if error else request.out, "ref": ref, "driving": driving, "frames": written, "fps": fps,
               "frames_12fps": report.frames, "driving_frames": report.expected_frames, "windows": report.windows,
               "seconds": round(stages.elapsed(), 3),
               "stage_seconds": {k: round(v, 3) for k, v in stages.seconds.items()},
               "steps": request.steps, "guidance": request.guidance, "seed": request.seed,
               "dtype": None if animator is None else str(animator.dtype),
               "faces_found": report.faces_found, "missing_face": report.missing_face,
               "frames_without_face": list(report.frames_without_face),
               "weights": None if animator is None else animator.weights,
               "random_weights": None if animator is None else animator.random_weights,
               **(source.summary if source is not None else {}), "audio_seconds": audio_seconds,
               "interpolator": interpolator.name, "seam": request.seam,
               "preview": None if error else request.preview, "control": None if error else request.control}
    if cancelled:
        return {**summary, "error": error, "cancelled": True, "ok": False}
    if error:
        return {**summary, "error": error, "ok": False}
    return {**summary, "ok": (report.frames == report.expected_frames and report.frames > 0
                              and written == retimed_length(report.frames, TARGET_FPS, fps))}
