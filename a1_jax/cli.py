"""`a1-jax` (also `python -m a1_jax`): thin argument parsing over the library.

Every command prints, as its last line, one JSON object describing the result. A `UserError` is printed as one line
on stderr with exit code 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any, Callable, Sequence

from a1_jax.errors import UserError

COMPONENTS = ("vae", "dit", "siglip")
LANDMARKER_HELP = "MediaPipe face_landmarker.task (default: $A1_JAX_LANDMARKER, else the model shipped with a1_jax)"


def _component_call(kind: str) -> Callable[[argparse.Namespace], dict]:
    """`parity`/`bench` run `a1_jax.parity.<component>.<kind>(args)`; imported late, torch is heavy."""

    def call(args: argparse.Namespace) -> dict:
        module = importlib.import_module(f"a1_jax.parity.{args.component}")
        if not hasattr(module, kind):
            raise UserError(f"'{kind}' is not available for {args.component}")
        return getattr(module, kind)(args)

    return call


def _landmarks(args: argparse.Namespace) -> dict:
    from a1_jax.motion.pipeline import run_landmarks

    return run_landmarks(args)


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("component", choices=COMPONENTS)
    parser.add_argument("--config", required=True, help="the checkpoint's config.json (or its folder)")
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: dict[str, Any] = args.run(args)
    except UserError as e:
        print(f"a1-jax: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result), flush=True)
    return 0 if result.get("ok", True) else 1
