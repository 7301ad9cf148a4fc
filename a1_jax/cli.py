"""`a1-jax` (also `python -m a1_jax`): thin argument parsing over the library.

Every command prints, as its last line, one JSON object describing the result. A `UserError` is printed as one line
on stderr with exit code 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import warnings
from typing import Any, Callable, Sequence

from a1_jax.errors import UserError

COMPONENTS = ("vae", "dit", "siglip", "scheduler", "pipeline")
BUILT_IN_CONFIG = ("pipeline",)  # parity components that bring their own (small, release-shaped) configs
LANDMARKER_HELP = "MediaPipe face_landmarker.task (default: $A1_JAX_LANDMARKER, else the model shipped with a1_jax)"


def _component_call(kind: str) -> Callable[[argparse.Namespace], dict]:
    """`parity`/`bench` run `a1_jax.parity.<component>.<kind>(args)`; imported late, torch is heavy."""

    def call(args: argparse.Namespace) -> dict:
        if args.config is None and args.component not in BUILT_IN_CONFIG:
            raise UserError(f"{kind} {args.component} needs --config")
        module = importlib.import_module(f"a1_jax.parity.{args.component}")
        if not hasattr(module, kind):
            raise UserError(f"'{kind}' is not available for {args.component}")
        return getattr(module, kind)(args)

    return call


def _landmarks(args: argparse.Namespace) -> dict:
    from a1_jax.motion.pipeline import run_landmarks

    return run_landmarks(args)


def _make_dataset(args: argparse.Namespace) -> dict:
    if args.latents is not None:
        from a1_jax.train.data.latents import run_make_latents

        return run_make_latents(args)
    if args.videos is None:
        raise UserError("make-dataset needs --videos (or --latents CHECKPOINT to add a latent cache to --out)")
    from a1_jax.train.data.writer import run_make_dataset

    return run_make_dataset(args)


def _train(args: argparse.Namespace) -> dict:
    from a1_jax.train.trainer import run_train

    return run_train(args)


def _evaluate(args: argparse.Namespace) -> dict:
    from a1_jax.evaluate.report import run_evaluate

    return run_evaluate(args)


def _animate(args: argparse.Namespace) -> dict:
    from a1_jax.sampling.animate import run_animate

    return run_animate(args)


def _convert(args: argparse.Namespace) -> dict:
    from tqdm import tqdm

    from a1_jax.weights.checkpoint import NETWORKS, convert

    with tqdm(total=len(NETWORKS), desc="convert", unit="network", disable=None, leave=False) as bar:
        summary = convert(args.source, args.to, progress=lambda name: bar.update())
    return {"from": args.source, "to": args.to, **summary, "ok": True}


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("component", choices=COMPONENTS)
    parser.add_argument("--config", help="the checkpoint's config.json (or its folder); pipeline: not used")
    parser.add_argument("--checkpoint", help="folder with the reference's safetensors weights (default: random init)")
    parser.add_argument("--seed", type=int, default=0, help="seed for random weights and inputs")
    # VAE input geometry (pixels); DiT and SigLIP take theirs from the config.
    parser.add_argument("--frames", type=int, default=9, help="vae: video frames")
    parser.add_argument("--height", type=int, default=None,
                        help="vae: pixel height (default: 4 latent pixels, 32 for the 5B VAE; 1.5 tiles with --tiling)")
    parser.add_argument("--width", type=int, default=None,
                        help="vae: pixel width (default: 6 latent pixels, 48 for the 5B VAE; 1.5 tiles with --tiling)")
    parser.add_argument("--tiling", action="store_true", help="vae: spatial tiling, as enable_tiling()")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: the component's own)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="a1-jax", description="SkyReels-A1 in JAX: portrait animation tools.")
    commands = parser.add_subparsers(dest="command", required=True)

    parity = commands.add_parser("parity", help="our module vs the PyTorch reference, fp32 on CPU")
    _add_model_args(parity)
    parity.set_defaults(run=_component_call("parity"))

    bench = commands.add_parser("bench", help="time our module against the PyTorch reference in one run")
    _add_model_args(bench)
    bench.add_argument("--against", choices=("torch",), default="torch", help="the reference to time against")
    bench.add_argument("--repeats", type=int, default=3, help="timed calls per side (median reported)")
    bench.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    bench.set_defaults(run=_component_call("bench"))

    landmarks = commands.add_parser("landmarks", help="driving video -> control video for the pose guider")
    landmarks.add_argument("--ref", required=True, help="reference portrait image")
    landmarks.add_argument("--driving", required=True, help="driving video")
    landmarks.add_argument("--out", required=True, help="control video to write (.mp4)")
    landmarks.add_argument("--frames-dir", help="also write every control frame as a lossless PNG here")
    landmarks.add_argument("--preview", help="also write a side-by-side preview (reference | driving | control)")
    landmarks.add_argument("--landmarker", help=LANDMARKER_HELP)
    landmarks.add_argument("--max-frames", type=int, help="at most this many control frames (49 = one clip)")
    landmarks.add_argument("--motion", choices=("relative", "absolute"), default="relative",
                           help="expression relative to the driver's first frame (default) or absolute")
    landmarks.add_argument("--expression-scale", type=float, default=1.0, help="scale of the transferred expression")
    landmarks.set_defaults(run=_landmarks)

    dataset = commands.add_parser("make-dataset", help="videos -> 49-frame training clips (ArrayRecord shards + "
                                                       "index.json; TFDS builder `a1_clips`)")
    dataset.add_argument("--videos", help="folder of videos (searched recursively)")
    dataset.add_argument("--out", required=True, help="dataset folder to create (the same command again "
                                                        "finishes an interrupted run)")
    dataset.add_argument("--landmarker", help=LANDMARKER_HELP)
    dataset.add_argument("--workers", type=int, default=1, help="videos processed in parallel (processes; the "
                                                                "output does not depend on it)")
    dataset.add_argument("--clips-per-shard", type=int, help="clips per ArrayRecord shard (default 256)")
    dataset.add_argument("--latents", metavar="CHECKPOINT",
                         help="also cache VAE / pose-guider latents and SigLIP tokens of fixed windows, encoded by "
                              "this checkpoint's encoders (without --videos: add the cache to the dataset at --out)")
    dataset.add_argument("--frames", type=int, help="--latents: frames of the cached window (1 + 4k)")
    dataset.add_argument("--height", type=int, help="--latents: pixel height of the cached window")
    dataset.add_argument("--width", type=int, help="--latents: pixel width of the cached window")
    dataset.add_argument("--seed", type=int, default=0, help="--latents: seed of the first-frame noise augmentation")
    dataset.set_defaults(run=_make_dataset)

    train = commands.add_parser("train", help="train the DiT (a stage config) on a make-dataset folder; resumes an "
                                              "existing workdir")
    train.add_argument("--config", required=True, help="training config (configs/train/*.yaml)")
    train.add_argument("--data", required=True, help="dataset folder from `a1-jax make-dataset`")
    train.add_argument("--workdir", required=True, help="run folder: model/, checkpoints/, metrics.jsonl")
    train.add_argument("--steps", type=int, help="train until this many steps are done (default: the config's)")
    train.add_argument("--save-every", type=int, help="checkpoint every N steps (default: the config's)")
    train.add_argument("--mesh", default="fsdp",
                       help="mesh preset (fsdp, data_fsdp, fsdp_tensor, single, ... or a path; default fsdp)")
    train.add_argument("--init", metavar="CHECKPOINT",
                       help="start from this release folder, converted checkpoint or workdir (overrides model.weights)")
    train.set_defaults(run=_train)

    evaluate = commands.add_parser("evaluate", help="expression, head pose, landmark motion and identity fidelity "
                                                    "of a generated video")
    evaluate.add_argument("--ref", help="reference portrait the video was generated from")
    evaluate.add_argument("--driving", help="driving video")
    evaluate.add_argument("--generated", help="generated video (12 fps, frame i follows driving frame i)")
    evaluate.add_argument("--batch", help="CSV with columns ref, driving, generated: prints the mean over its videos "
                                          "(each video's report goes to --out)")
    evaluate.add_argument("--out", help="per-frame report to write (.json)")
    evaluate.add_argument("--plot", help="figure to write (.png): jawOpen, yaw/pitch and identity over time")
    evaluate.add_argument("--landmarker", help=LANDMARKER_HELP)
    evaluate.add_argument("--align", choices=("sequential", "nearest"), default="sequential",
                          help="pair generated frame i with driving frame i (default), or with its nearest motion")
    evaluate.add_argument("--identity-frames", type=int,
                          help="generated frames the identity is measured on, spread evenly (default 16, as the "
                               "reference's arc_score.py; 0 = every frame)")
    evaluate.set_defaults(run=_evaluate)

    animate = commands.add_parser("animate", help="portrait + driving video -> the portrait performing the driver's "
                                                  "motion (12-fps mp4)")
    animate.add_argument("--ref", required=True, help="reference portrait image")
    animate.add_argument("--driving", required=True, help="driving video (any fps; sampled at 12 fps)")
    animate.add_argument("--out", required=True, help="animated video to write (.mp4, 12 fps)")
    model = animate.add_mutually_exclusive_group()
    model.add_argument("--checkpoint", help="a SkyReels-A1 release folder or an `a1-jax convert` checkpoint")
    model.add_argument("--config", default="tiny",
                       help="without --checkpoint: seeded random weights for these configs (default: tiny)")
    animate.add_argument("--steps", type=int, default=10, help="denoising steps (default 10, as the reference)")
    animate.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance on the face (3.0)")
    animate.add_argument("--seed", type=int, default=0, help="seed of the noise")
    animate.add_argument("--max-frames", type=int, help="use at most this many 12-fps driving frames")
    animate.add_argument("--single-clip", action="store_true",
                         help="the reference's single-clip script: 49 control frames [ref, f0, f0, f1, ...], "
                              "47 output frames")
    animate.add_argument("--preview", help="also write reference | driving | control | output side by side (.mp4)")
    animate.add_argument("--landmarker", help=LANDMARKER_HELP)
    animate.add_argument("--mesh", default="single",
                         help="mesh preset for parameters and activations (single, fsdp, fsdp_tensor, ... or a path)")
    animate.add_argument("--dtype", choices=("float32", "bfloat16"),
                         help="compute dtype (default: bfloat16 on GPU/TPU, float32 on CPU)")
    animate.set_defaults(run=_animate)

    conversion = commands.add_parser("convert", help="a SkyReels-A1 release folder -> one Orbax checkpoint")
    conversion.add_argument("--from", dest="source", required=True,
                            help="release folder (transformer/, vae/, pose_guider/, siglip-so400m-patch14-384/, "
                                 "scheduler/)")
    conversion.add_argument("--to", required=True, help="new folder for the checkpoint")
    conversion.set_defaults(run=_convert)
    return parser


def _enable_compilation_cache() -> None:
    """Keeps compiled XLA programs on disk (`~/.cache/a1_jax/jax`, or `$JAX_COMPILATION_CACHE_DIR`), so a second run
    of the same command and geometry starts in seconds instead of recompiling every network."""
    import jax

    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(os.path.join("~", ".cache", "a1_jax", "jax")))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _enable_compilation_cache()
    # ffmpeg is started with subprocess, which forks and immediately execs: JAX's threads are never touched in the
    # child, so JAX's warning about forking is noise on the user's terminal.
    warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
    try:
        result: dict[str, Any] = args.run(args)
    except UserError as e:
        print(f"a1-jax: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result), flush=True)
    return 0 if result.get("ok", True) else 1
