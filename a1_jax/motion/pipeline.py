"""Reference image + driving video or motion track -> control video `[T, 480, 720, 3]` (spec §1.3–1.6, §9.1).

A driving video keeps its measured landmarks; a motion track (speech, text, curve files) has none, so the face rig
builds its driver on the reference's own face (`plan_track`). Both give a `MotionPlan`, whose `track` is what the
source said (for a video: what MediaPipe measured).

Two passes over the driving video, both streaming: the first detects landmarks in every sampled frame (a few KB a
frame are kept, so faceless frames can be filled from both sides), the second draws and writes. Memory stays
bounded for any length.

Frame order. Frame 0 is always the reference's own landmarks. One clip (`max_frames=N`, N=49 in the reference)
then holds N-1 driving frames `[f0, f0, f1, …, f_{N-3}]` (the reference duplicates f0), padded with the last sampled
frame when the video is short; long mode (`max_frames=None`) holds every sampled frame once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Callable, Iterable, Iterator, Sequence

import cv2
import numpy as np

from a1_jax.errors import UserError
from a1_jax.io.video import TARGET_FPS, VideoWriter, probe_video, read_frames, read_image, resample_indices, write_png
from a1_jax.motion import draw, retarget, rig
from a1_jax.motion.landmarker import Landmarker, find_landmarker_model
from a1_jax.motion.reference import ReferenceFace, prepare_reference
from a1_jax.motion.track import MotionTrack, check_output_file, write_track

_POINTS = 478


def clip_order(num_sampled: int, max_frames: int | None) -> np.ndarray:
    """For each driving control frame (frames 1..T-1), the index of the 12-fps sampled frame it shows."""
    if max_frames is None:
        return np.arange(num_sampled)
    if max_frames < 2:
        raise UserError(f"--max-frames must be at least 2 (the reference frame and one driving frame), "
                        f"got {max_frames}")
    order = np.concatenate([[0], np.arange(max_frames - 2)])
    return np.minimum(order, num_sampled - 1)


MISSING_FACE = ("drop", "fill")


@dataclasses.dataclass(frozen=True)
class MotionPlan:
    """Everything the drawing pass needs: the reference, where each control frame comes from, the driver's motion."""

    reference: ReferenceFace
    driving_path: str | None  # None: a motion track, no video
    source_indices: np.ndarray  # [S] source-video frame index of each sampled frame used
    order: np.ndarray  # [T-1] sampled-frame index of each driving control frame
    driving_points: np.ndarray  # [S, 478, 3] pixels of the driving frame, faceless frames filled
    driving_transforms: np.ndarray  # [S, 4, 4]
    faces_found: int
    frames_filled: int
    track: MotionTrack  # [S] frames: the source's motion (a video's: MediaPipe's blendshapes, pose and gaze)
    sample_times: np.ndarray  # [S] seconds of each sampled frame in the source (what its audio plays then)
    measured: bool = True  # driving landmarks measured on a video; False: built by the rig on the reference
    missing_face: str = "fill"  # what was done with the frames without a face: "drop" or "fill"
    frames_without_face: tuple[int, ...] = ()  # 12-fps frames (of those examined) where no face was found

    @property
    def num_frames(self) -> int:
        return 1 + len(self.order)


def _progress(iterable, total: int, description: str, progress: bool | Callable[[int, int], None]):
    """`iterable` with a tqdm bar (`progress` True, on a terminal), or calling `progress(done, total)` per item."""
    if callable(progress):
        def counted():
            for done, item in enumerate(iterable, 1):
                yield item
                progress(min(done, total), total)
        return counted()
    if not progress:
        return iterable
    from tqdm import tqdm

    # disable=None: a bar on a terminal only, so redirected stderr keeps just the one-line errors
    return tqdm(iterable, total=total, desc=description, unit="frame", leave=False, disable=None)


def plan_motion(reference_image: np.ndarray, driving_path: str, *, landmarker_path: str | None = None,
                max_frames: int | None = None, progress: bool | Callable[[int, int], None] = False,
                reference_name: str = "the reference image", min_confidence: float = 0.5,
                max_driving_frames: int | None = None, missing_face: str = "drop") -> MotionPlan:
    """Detect the reference face and the driver's landmarks in every sampled frame a control video needs.

    `max_driving_frames`: use only the first this many 12-fps frames of the driving video. `missing_face`: `drop`
    the frames without a face (the reference's long-video script; a clip then reads on until it has enough faces) or
    `fill` them from their neighbours."""
    if max_driving_frames is not None and max_driving_frames < 1:
        raise UserError(f"--max-frames must be at least 1, got {max_driving_frames}")
    model = find_landmarker_model(landmarker_path)
    info = probe_video(driving_path)
    sampled = resample_indices(info.num_frames, info.fps)[:max_driving_frames]
    timestamps = [int(round(index * 1000 / info.fps)) for index in sampled]
    return plan_motion_frames(reference_image, read_frames(driving_path, sampled), timestamps, None,
                              max_frames=max_frames, landmarker_path=model, driving_name=driving_path,
                              source_indices=sampled, progress=progress, reference_name=reference_name,
                              min_confidence=min_confidence, missing_face=missing_face,
                              sample_times=np.arange(len(sampled)) / TARGET_FPS)


def plan_motion_frames(reference_image: np.ndarray, driving_frames: Iterable[np.ndarray],
                       timestamps_ms: Sequence[int], order: np.ndarray | None, *, max_frames: int | None = None,
                       landmarker_path: str | None = None, driving_name: str = "the driving frames",
                       source_indices: np.ndarray | None = None, progress: bool | Callable[[int, int], None] = False,
                       reference_name: str = "the reference image", min_confidence: float = 0.5,
                       missing_face: str = "fill", sample_times: np.ndarray | None = None) -> MotionPlan:
    """`plan_motion` on driving frames the caller decodes (the dataset writer cuts clips from a video it reads once).

    `driving_frames` (any iterable, consumed lazily) are shown at `timestamps_ms`, one per frame. `order` indexes
    them as `MotionPlan.order` does (with `missing_face="fill"` only), or None: `clip_order(frames kept,
    max_frames)`, reading only as many frames as that needs. An iterable that ends early leaves the rest faceless, as
    a short container does. `driving_name` names the frames in errors; `source_indices` (default `0..n-1`) and
    `sample_times` (default: the timestamps) are kept in the plan (of the frames kept).
    """
    if missing_face not in MISSING_FACE:
        raise ValueError(f"missing_face must be one of {MISSING_FACE}, got {missing_face!r}")
    if order is not None and missing_face == "drop":
        raise ValueError("an explicit order indexes the frames as given: it needs missing_face='fill'")
    model = find_landmarker_model(landmarker_path)
    count = len(timestamps_ms)
    source_indices = np.arange(count) if source_indices is None else np.asarray(source_indices)
    times = np.asarray(timestamps_ms) / 1000.0 if sample_times is None else np.asarray(sample_times, np.float64)
    # How many sampled frames the plan needs (with a face, when dropping): an explicit order's, or a clip's.
    needed = count
    if order is not None:
        needed = min(count, int(np.max(order)) + 1) if len(order) else 1
    elif max_frames is not None:
        needed = min(count, int(clip_order(count, max_frames).max()) + 1)
    with Landmarker(model, video=False, min_confidence=min_confidence) as landmarker:
        reference = prepare_reference(reference_image, landmarker, reference_name)

    points = np.zeros((count, _POINTS, 3), np.float32)
    transforms = np.tile(np.eye(4, dtype=np.float32), (count, 1, 1))
    blendshapes = np.zeros((count, 52), np.float32)
    found = np.zeros(count, bool)
    examined = 0
    with Landmarker(model, video=True, min_confidence=min_confidence) as landmarker:
        pairs = zip(driving_frames, timestamps_ms)
        for i, (frame, timestamp) in enumerate(_progress(pairs, needed, "landmarks", progress)):
            examined = i + 1
            face = landmarker.detect(frame, timestamp)
            if face is not None:
                points[i], transforms[i], found[i] = face.points, face.transform, True
                blendshapes[i] = face.blendshapes
            if (found[:examined].sum() if missing_face == "drop" else examined) >= needed:
                break
    # Frames the container promised but did not hold count as faceless (fill), or are simply gone (drop).
    examined = needed if missing_face == "fill" else examined
    found, points, transforms = found[:examined], points[:examined], transforms[:examined]
    blendshapes, times, used = blendshapes[:examined], times[:examined], source_indices[:examined]
    without = tuple(int(i) for i in np.flatnonzero(~found))
    if len(without) * 2 > examined:
        raise UserError(f"no face in {len(without)} of {examined} sampled frames of {driving_name}: the driving video "
                        "needs a visible face in at least half of its frames")
    if missing_face == "drop":
        kept = np.flatnonzero(found)
        points, transforms, blendshapes = points[kept], transforms[kept], blendshapes[kept]
        used, times = used[kept], times[kept]
    else:
        points, transforms = retarget.fill_missing(points, found), retarget.fill_missing(transforms, found)
        blendshapes = retarget.fill_missing(blendshapes, found)
    if order is None:
        order = clip_order(len(points), max_frames)
    return MotionPlan(reference=reference, driving_path=driving_name, source_indices=used,
                      order=np.asarray(order), driving_points=points, driving_transforms=transforms,
                      faces_found=int(found.sum()), frames_filled=len(without) if missing_face == "fill" else 0,
                      track=measured_track(points, transforms, blendshapes), sample_times=times,
                      missing_face=missing_face, frames_without_face=without)


def measured_track(points: np.ndarray, transforms: np.ndarray, blendshapes: np.ndarray) -> MotionTrack:
    """A video's track from its landmarks `[S, 478, 3]`, matrices `[S, 4, 4]` and MediaPipe scores `[S, 52]`."""
    rotations = np.stack([retarget.rotation_from_transform(t) for t in transforms]) if len(transforms) else \
        np.zeros((0, 3, 3))
    canonical = np.stack([retarget.decompose(p, t)[1] for p, t in zip(points, transforms)]) if len(points) else \
        np.zeros((0, 478, 3))
    return MotionTrack(blendshapes=np.asarray(blendshapes, np.float32)[:, 1:],
                       rotation=retarget.yaw_pitch_roll_deg(rotations).astype(np.float32).reshape(-1, 3),
                       gaze=rig.gaze_of(canonical).astype(np.float32))


def plan_track(reference_image: np.ndarray, track: MotionTrack, *, landmarker_path: str | None = None,
               max_frames: int | None = None, reference_name: str = "the reference image",
               min_confidence: float = 0.5) -> MotionPlan:
    """The plan of a motion track (12 fps): the reference's face, and a driver the rig builds on it per frame.
    `max_frames` as in `plan_motion` (one clip of that many control frames; None: every frame once)."""
    if len(track) < 1:
        raise UserError("the motion track has no frames")
    with Landmarker(find_landmarker_model(landmarker_path), video=False, min_confidence=min_confidence) as landmarker:
        reference = prepare_reference(reference_image, landmarker, reference_name)
    points, transforms = rig.track_landmarks(track, reference.points, reference.transform,
                                             reference.blendshapes[1:])
    return MotionPlan(reference=reference, driving_path=None, source_indices=np.arange(len(track)),
                      order=clip_order(len(track), max_frames), driving_points=points, driving_transforms=transforms,
                      faces_found=len(track), frames_filled=0, track=track,
                      sample_times=np.arange(len(track)) / track.fps, measured=False)


def render_control(plan: MotionPlan, *, motion: str = "relative", expression_scale: float = 1.0,
                   progress: bool = False) -> Iterator[np.ndarray]:
    """The control frames one by one, each uint8 `[480, 720, 3]`: the reference's landmarks, then the driver's.

    A rig-built driver already wears the reference's face, so it is placed as is (`absolute`): a track's neutral
    frame is the neutral face, not whatever its first frame shows."""
    reference = plan.reference
    motion = motion if plan.measured else "absolute"
    yield draw.paste(draw.draw_face(reference.normalised[:, :2], _reference_pupils(reference),
                                    reference.box.width, reference.box.height, draw.REFERENCE_STYLE), reference.box)
    points = retarget.retarget(reference.points, reference.transform, plan.driving_points,
                               plan.driving_transforms, motion=motion, expression_scale=expression_scale)
    pupils = retarget.transfer_pupils(plan.driving_points, points)
    cache: tuple[int, np.ndarray] | None = None  # clip order repeats sampled frames back to back
    for sample in _progress(plan.order, len(plan.order), "drawing", progress):
        if cache is None or cache[0] != sample:
            cache = (sample, draw.control_frame(points[sample], pupils[sample], reference.box, draw.DRIVING_STYLE))
        yield cache[1]


def _reference_pupils(reference: ReferenceFace) -> np.ndarray:
    """Pupils of the 2-D reference landmarks in crop pixels (the reference's int() of the normalised point)."""
    size = (reference.box.width, reference.box.height)
    return reference.normalised[[retarget.RIGHT_PUPIL, retarget.LEFT_PUPIL], :2] * size


def control_video(reference_image: np.ndarray, driving_path: str, *, landmarker_path: str | None = None,
                  max_frames: int | None = 49, motion: str = "relative", expression_scale: float = 1.0) -> np.ndarray:
    """The control video as one uint8 array `[T, 480, 720, 3]` (one 49-frame clip by default)."""
    plan = plan_motion(reference_image, driving_path, landmarker_path=landmarker_path, max_frames=max_frames)
    return np.stack(list(render_control(plan, motion=motion, expression_scale=expression_scale)))


def side_by_side(canvas: np.ndarray, driving: np.ndarray, *frames: np.ndarray) -> np.ndarray:
    """One preview frame: the reference canvas | the driving frame scaled to the canvas height | `frames`..."""
    height, width = driving.shape[:2]
    scaled_width = 2 * max(1, round(canvas.shape[0] * width / height / 2))  # even, for yuv420p
    scaled = cv2.resize(driving, (scaled_width, canvas.shape[0]), interpolation=cv2.INTER_AREA)
    return np.concatenate([canvas, scaled, *frames], axis=1)


def plan_driver(reference_image: np.ndarray, driver: str | MotionTrack, *, landmarker_path: str | None = None,
                max_frames: int | None = None, progress: bool | Callable[[int, int], None] = False,
                reference_name: str = "the reference image", max_driving_frames: int | None = None,
                missing_face: str = "drop") -> MotionPlan:
    """`plan_motion` for a driving video's path, `plan_track` for a motion track (cut to `max_driving_frames`)."""
    if isinstance(driver, MotionTrack):
        if max_driving_frames is not None:
            if max_driving_frames < 1:
                raise UserError(f"--max-frames must be at least 1, got {max_driving_frames}")
            driver = driver.first(max_driving_frames)
        return plan_track(reference_image, driver, landmarker_path=landmarker_path, max_frames=max_frames,
                          reference_name=reference_name)
    return plan_motion(reference_image, driver, landmarker_path=landmarker_path, max_frames=max_frames,
                       progress=progress, reference_name=reference_name, max_driving_frames=max_driving_frames,
                       missing_face=missing_face)


def _preview_frames(plan: MotionPlan, control: Iterator[np.ndarray]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(side by side, control frame): reference canvas | driving frame scaled to 480 high | control frame (a track
    has no driving frames: reference canvas | control frame)."""
    if plan.driving_path is None:
        for control_frame in control:
            yield np.concatenate([plan.reference.canvas, control_frame], axis=1), control_frame
        return
    frame_indices = np.concatenate([[0], plan.order])  # frame 0 shows the driver's first frame
    driving = read_frames(plan.driving_path, plan.source_indices[frame_indices])
    for frame, control_frame in zip(driving, control):
        yield side_by_side(plan.reference.canvas, frame, control_frame), control_frame


def run_landmarks(args) -> dict:
    """`a1-jax landmarks`: write the control mp4 (12 fps), optional PNG frames, preview and track; report counts.

    `frames` counts the control video's frames: the reference's own landmarks, then one per driving frame used
    (`driving_frames`, the number of frames `animate` writes for the same inputs)."""
    from a1_jax.motion.sources import load_source

    start = time.perf_counter()
    if args.frames_dir and os.path.exists(args.frames_dir) and not os.path.isdir(args.frames_dir):
        raise UserError(f"--frames-dir {args.frames_dir} exists and is not a folder")
    image = read_image(args.ref)
    with contextlib.ExitStack() as stack:  # writers first: a bad output path fails before any detection
        writer = stack.enter_context(VideoWriter(args.out, TARGET_FPS, what="--out"))
        preview = stack.enter_context(VideoWriter(args.preview, TARGET_FPS, what="--preview")) if args.preview else None
        if args.track:
            check_output_file(args.track, ".json")
        if args.frames_dir:
            try:
                os.makedirs(args.frames_dir, exist_ok=True)
            except OSError as e:
                raise UserError(f"cannot create --frames-dir {args.frames_dir}: {e.strerror or e}") from None
        source = load_source(driving=args.driving, audio=args.audio, transcript=args.transcript, text=args.text,
                             blendshapes=args.blendshapes, seed=args.seed, with_audio=False)
        plan = plan_driver(image, source.driving, landmarker_path=args.landmarker, max_frames=args.max_frames,
                           progress=True, reference_name=args.ref, missing_face=args.missing_face)
        if args.track:
            write_track(args.track, plan.track)
        control = render_control(plan, motion=args.motion, expression_scale=args.expression_scale, progress=True)
        pairs = _preview_frames(plan, control) if preview is not None else ((None, frame) for frame in control)
        count = 0
        for side_by_side, frame in pairs:
            writer.write(frame)
            if preview is not None:
                preview.write(side_by_side)
            if args.frames_dir:
                write_png(os.path.join(args.frames_dir, f"{count:05d}.png"), frame)
            count += 1
    return {"frames": count, "driving_frames": count - 1, "fps": TARGET_FPS, "faces_found": plan.faces_found,
            "missing_face": plan.missing_face, "frames_without_face": list(plan.frames_without_face),
            **source.summary, "seconds": round(time.perf_counter() - start, 3), "ok": count == plan.num_frames}
