"""`a1-jax evaluate`: one animation (or a CSV of them) scored against its driver and its reference portrait.

One evaluation = the reference's face (MediaPipe, still image), two streaming passes (generated, then driving video,
both at 12 fps), the pairing, then the metrics of `metrics.py` averaged over the compared pairs and the identity
distance over a uniform subset of generated frames (`identity.DEFAULT_FRAMES`, as the reference's `arc_score.py`).
The summary is the command's JSON line; the per-frame rows go to `--out`, the figure to `--plot`.
"""

from __future__ import annotations

import csv
import json
import os
import time

import numpy as np

from a1_jax.errors import UserError
from a1_jax.evaluate import identity, metrics
from a1_jax.evaluate.tracks import ALIGNMENTS, FaceTrack, Pairing, pair_frames, sampled_indices, track_video
from a1_jax.io.video import IMAGE_EXTENSIONS, check_output, probe_video, read_image
from a1_jax.motion.reference import crop_and_resize
from a1_jax.motion.landmarker import BLENDSHAPE_NAMES, Landmarker, find_landmarker_model

# Blendshapes whose time course is correlated: the jaw, the blinks and the mouth corners.
EXPRESSION_CURVES = ("jawOpen", "eyeBlinkLeft", "eyeBlinkRight", "mouthSmileLeft", "mouthSmileRight",
                     "mouthFrownLeft", "mouthFrownRight")
POSE_AXES = ("yaw", "pitch", "roll")
BATCH_COLUMNS = ("ref", "driving", "generated")
# Summary values a batch averages over its videos (None values are skipped) and the counts it adds up.
_MEANS = ("expression_l1", "jaw_corr", "pose_error_deg", "landmark_motion", "identity_distance",
          "identity_same_person")
_MEAN_DICTS = ("expression_corr", "pose_corr")
_SUMS = ("frames", "frames_without_face", "generated_frames", "driving_frames", "generated_frames_without_face",
         "driving_frames_without_face", "identity_frames")


def _num(value) -> float | None:
    return None if value is None else round(float(value), 6)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return _num(np.mean(values)) if values else None


def evaluate_video(ref: str, driving: str, generated: str, *, landmarker: str | None = None,
                   align: str = "sequential", identity_frames: int = identity.DEFAULT_FRAMES,
                   progress: bool = False) -> tuple[dict, list[dict]]:
    """(summary, per-frame rows) of one generated video against its driving video and reference portrait."""
    start = time.perf_counter()
    model = find_landmarker_model(landmarker)
    generated_info, _ = probe_video(generated), probe_video(driving)  # unreadable files fail before any detection
    # The portrait as the animator used it: its 480x720 canvas (a small face in a large photo is found there).
    reference_image = crop_and_resize(read_image(ref))
    recognizer = identity.load_identity_model()  # starts its worker process now, beside the landmarker's start-up
    with Landmarker(model, video=False) as still:
        reference_face = still.detect(reference_image)
    if reference_face is None:
        raise UserError(f"no face found in {ref} (on its 480x720 canvas, as animate crops it)")

    # Identity descriptors are computed by the worker while the landmark passes run here.
    descriptors = {}  # generated frame -> future descriptor
    subset = set()
    if recognizer is not None:
        descriptors["reference"] = recognizer.submit(reference_image, reference_face.points)
        subset = set(identity.uniform_frames(len(sampled_indices(generated_info, generated=True)),
                                             identity_frames).tolist())

    def visit(i, frame, face):
        if i in subset:
            descriptors[i] = recognizer.submit(frame, face.points)

    gen = track_video(generated, model, generated=True, visit=visit, progress=progress)
    # Sequential pairing reads no more of the driver than the generated video has; nearest searches all of it.
    drv = track_video(driving, model, generated=False, limit=len(gen) if align == "sequential" else None,
                      progress=progress)
    pairing = pair_frames(gen, drv, align)
    scores = _pair_scores(gen, drv, pairing) if len(pairing.generated) else None
    reference = descriptors.pop("reference", None)
    distances = {i: identity.distance(reference.result(), future.result()) for i, future in descriptors.items()}

    frames = len(pairing.generated)
    summary = {
        "ref": ref, "driving": driving, "generated": generated, "align": align,
        "frames": frames, "frames_without_face": pairing.frames_without_face,
        "generated_frames": gen.sampled, "driving_frames": drv.sampled,
        "generated_frames_without_face": int((~gen.found).sum()),
        "driving_frames_without_face": int((~drv.found).sum()),
        **_metric_summary(scores),
        "identity_distance": _mean(distances.values()), "identity_threshold": identity.THRESHOLD,
        "identity_frames": len(distances),
        "identity_same_person": _mean([float(v < identity.THRESHOLD) for v in distances.values()]),
    }
    summary.update({"identity_model": identity.MODEL_NAME} if recognizer is not None
                   else {"identity_note": identity.INSTALL_HINT})
    # More than half of the candidate frames without a face (or none compared): the averages describe a minority of
    # the video, or nothing.
    summary["ok"] = frames > 0 and 2 * frames >= frames + pairing.frames_without_face
    summary["seconds"] = round(time.perf_counter() - start, 3)
    return summary, _frame_rows(gen, drv, pairing, scores, distances)


def _metric_summary(scores: dict | None) -> dict:
    """The averaged metrics of the compared pairs (all null when no pair had a face on both sides)."""
    if scores is None:
        return {"expression_l1": None, "jaw_corr": None, "expression_corr": {name: None for name in EXPRESSION_CURVES},
                "pose_error_deg": None, "pose_corr": {axis: None for axis in POSE_AXES}, "landmark_motion": None}
    return {"expression_l1": _num(scores["expression_l1"].mean()), "jaw_corr": _num(scores["curves"]["jawOpen"]),
            "expression_corr": {name: _num(value) for name, value in scores["curves"].items()},
            "pose_error_deg": _num(scores["pose_error_deg"].mean()),
            "pose_corr": {axis: _num(metrics.pearson(scores["angles"][0][:, a], scores["angles"][1][:, a]))
                          for a, axis in enumerate(POSE_AXES)},
            "landmark_motion": _num(scores["landmark_motion"].mean())}


def _pair_scores(gen: FaceTrack, drv: FaceTrack, pairing: Pairing) -> dict:
    """Per-pair arrays of every metric, and the correlations of the expression curves."""
    g, d = pairing.generated, pairing.driving
    relative_gen = metrics.relative_rotations(gen.rotations[g], gen.rotations[pairing.anchor[0]])
    relative_drv = metrics.relative_rotations(drv.rotations[d], drv.rotations[pairing.anchor[1]])
    motion_gen = metrics.landmark_motion(gen.points[g], gen.points[pairing.anchor[0]])
    motion_drv = metrics.landmark_motion(drv.points[d], drv.points[pairing.anchor[1]])
    return {
        "expression_l1": metrics.expression_l1(gen.blendshapes[g], drv.blendshapes[d]),
        "pose_error_deg": metrics.pose_error_deg(relative_gen, relative_drv),
        "landmark_motion": metrics.landmark_motion_error(motion_gen, motion_drv),
        "angles": (metrics.yaw_pitch_roll_deg(relative_gen), metrics.yaw_pitch_roll_deg(relative_drv)),
        "curves": {name: metrics.pearson(gen.blendshapes[g, BLENDSHAPE_NAMES.index(name)],
                                         drv.blendshapes[d, BLENDSHAPE_NAMES.index(name)])
                   for name in EXPRESSION_CURVES},
    }


def _frame_rows(gen: FaceTrack, drv: FaceTrack, pairing: Pairing, scores: dict, distances: dict) -> list[dict]:
    """One row per generated frame read; metric values are null where the frame was not compared."""
    paired = {int(i): k for k, i in enumerate(pairing.generated)}
    jaw = BLENDSHAPE_NAMES.index("jawOpen")
    angles_gen, angles_drv = scores["angles"] if scores is not None else (None, None)
    rows = []
    for i in range(len(gen)):
        k = paired.get(i)
        if k is not None:
            j = int(pairing.driving[k])
        else:  # not compared: sequential still names the driving frame i it would have been paired with
            j = i if pairing.align == "sequential" and i < len(drv) else None
        row = {"generated": i, "generated_source_frame": int(gen.source_indices[i]),
               "driving": j, "driving_source_frame": None if j is None else int(drv.source_indices[j]),
               "generated_face": bool(gen.found[i]), "driving_face": None if j is None else bool(drv.found[j]),
               "expression_l1": None, "pose_error_deg": None, "landmark_motion": None,
               "jawOpen": None, **{axis: None for axis in POSE_AXES},
               "identity_distance": _num(distances.get(i))}
        if k is not None:
            row.update({key: _num(scores[key][k]) for key in ("expression_l1", "pose_error_deg", "landmark_motion")})
            row["jawOpen"] = [_num(gen.blendshapes[i, jaw]), _num(drv.blendshapes[j, jaw])]
            row.update({axis: [_num(angles_gen[k, a]), _num(angles_drv[k, a])] for a, axis in enumerate(POSE_AXES)})
        rows.append(row)
    return rows


def read_batch(path: str) -> list[tuple[str, str, str]]:
    """(ref, driving, generated) per row of a CSV with those columns; relative paths are from the CSV's folder."""
    if not os.path.isfile(path):
        raise UserError(f"batch file not found: {path}")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in BATCH_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise UserError(f"{path} needs the columns {', '.join(BATCH_COLUMNS)} in its header row; "
                                f"missing: {', '.join(missing)}")
            rows = [tuple(os.path.join(folder, (row[c] or "").strip()) for c in BATCH_COLUMNS) for row in reader
                    if any((row[c] or "").strip() for c in BATCH_COLUMNS)]
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"cannot read {path} as CSV: {e}") from None
    if not rows:
        raise UserError(f"{path} lists no videos")
    return rows


def mean_summary(summaries: list[dict]) -> dict:
    """The batch's row: metrics averaged over the videos measured (each counts once, as in the reference's scripts),
    frame counts added up; a video that could not be measured (`error` in its row) counts in `failed`."""
    measured = [s for s in summaries if "error" not in s]
    out = {"videos": len(summaries), "failed": len(summaries) - len(measured),
           "align": summaries[0].get("align", "sequential")}
    out.update({key: int(sum(s[key] for s in measured)) for key in _SUMS})
    out.update({key: _mean(s[key] for s in measured) for key in _MEANS})
    for key in _MEAN_DICTS:
        names = EXPRESSION_CURVES if key == "expression_corr" else POSE_AXES
        out[key] = {name: _mean(s[key][name] for s in measured) for name in names}
    out["identity_threshold"] = identity.THRESHOLD
    for key in ("identity_model", "identity_note"):
        if measured and key in measured[0]:
            out[key] = measured[0][key]
    out["ok"] = all(s["ok"] for s in summaries)
    return out


def _write_json(path: str, content: dict) -> None:
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(content, f, indent=1)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


def run_evaluate(args) -> dict:
    """`a1-jax evaluate`: one (--ref, --driving, --generated) triple or a --batch CSV; returns the summary row."""
    start = time.perf_counter()
    single = (args.ref, args.driving, args.generated)
    if args.batch is None and not all(single):
        raise UserError("evaluate needs --ref, --driving and --generated (or --batch CSV)")
    if args.batch is not None and any(single):
        raise UserError("pass either --batch CSV or --ref/--driving/--generated, not both")
    if args.batch is not None and args.plot:
        raise UserError("--plot draws one evaluation: drop it with --batch (per-video rows go to --out)")
    if args.align not in ALIGNMENTS:
        raise UserError(f"--align must be one of {', '.join(ALIGNMENTS)}")
    identity_frames = identity.DEFAULT_FRAMES if args.identity_frames is None else args.identity_frames
    if identity_frames < 0:
        raise UserError(f"--identity-frames must be 0 (every frame) or more, got {identity_frames}")
    if args.out:
        check_output(args.out, "--out", (".json",))
    if args.plot:
        check_output(args.plot, "--plot", IMAGE_EXTENSIONS)
    options = dict(landmarker=args.landmarker, align=args.align, identity_frames=identity_frames)

    if args.batch is None:
        summary, rows = evaluate_video(*single, progress=True, **options)
        if args.out:
            _write_json(args.out, {"summary": summary, "frames": rows})
        if args.plot:
            from a1_jax.evaluate.plot import write_plot

            write_plot(args.plot, rows, summary)
        return summary

    triples = read_batch(args.batch)
    for number, triple in enumerate(triples, 1):  # every path before any video is read
        for column, path in zip(BATCH_COLUMNS, triple):
            if not os.path.isfile(path):
                raise UserError(f"{args.batch} row {number}: {column} not found: {path}")
    videos = []
    from tqdm import tqdm

    for number, triple in enumerate(tqdm(triples, desc="videos", unit="video", leave=False, disable=None), 1):
        try:
            summary, rows = evaluate_video(*triple, **options)
        except UserError as e:  # reported in its row; the other videos are still measured
            summary, rows = {**dict(zip(BATCH_COLUMNS, triple)), "row": number, "error": str(e), "ok": False}, []
        videos.append({"summary": summary, "frames": rows})
    mean = mean_summary([video["summary"] for video in videos])
    mean["seconds"] = round(time.perf_counter() - start, 3)
    if args.out:
        _write_json(args.out, {"summary": mean, "videos": videos})
    return mean
