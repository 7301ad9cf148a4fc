"""`a1-jax` (also `python -m a1_jax`): thin argument parsing over the library.

Every command prints, as its last line, one JSON object describing the result. A `UserError` is printed as one line
on stderr with exit code 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import warnings
from typing import Any, Callable, Sequence

from a1_jax import __version__
from a1_jax.errors import UserError

COMPONENTS = ("vae", "dit", "siglip", "scheduler", "pipeline")
BUILT_IN_CONFIG = ("pipeline",)  # parity components that bring their own (small, release-shaped) configs
LANDMARKER_HELP = "MediaPipe face_landmarker.task (default: $A1_JAX_LANDMARKER, else the model shipped with a1_jax)"


class _Parser(argparse.ArgumentParser):
    """argparse with the house's error format: one line on stderr, exit code 2 (no usage block)."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(kind: type, *, low: float | None = None, what: str = "") -> Callable[[str], Any]:
    """An argparse `type` that parses `kind` and refuses values below `low` (and NaN/inf), naming the bound."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got "
                                             f"{text!r}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if low is not None and value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low:g}{what}, got {text}")
        return value

    return parse


POSITIVE = _number(int, low=1)
NON_NEGATIVE = _number(int, low=0)


def _component_call(kind: str) -> Callable[[argparse.Namespace], dict]:
    """`parity`/`bench` run `a1_jax.parity.<component>.<kind>(args)`; imported late, torch is heavy."""

    def call(args: argparse.Namespace) -> dict:
        if args.config is None and args.component not in BUILT_IN_CONFIG:
            raise UserError(f"{kind} {args.component} needs --config")
        if kind == "bench" and args.dtype is None:
            args.dtype = "bfloat16" if args.component == "pipeline" else "float32"
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
    from a1_jax.sampling import preflight

    request = preflight.AnimateRequest.from_args(args)
    preflight.check(request)  # every path, before the heavy imports below
    with args.stages("startup"):  # JAX, Flax, MediaPipe: seconds the user should see counted
        from a1_jax.sampling.animate import run_animate

    return run_animate(request, stages=args.stages)


def _app(args: argparse.Namespace) -> dict:
    from a1_jax.app.server import Limits, serve

    return serve(checkpoint=args.checkpoint, config=args.config, mesh=args.mesh, dtype=args.dtype,
                 offload=args.offload, host=args.host,
                 port=args.port, limits=Limits(max_seconds=args.max_seconds, max_upload_mb=args.max_upload_mb))


def _interpolate(args: argparse.Namespace) -> dict:
    from a1_jax.interpolate.retime import run_interpolate

    return run_interpolate(args)


def _convert(args: argparse.Namespace) -> dict:
    from tqdm import tqdm

    from a1_jax.weights.checkpoint import convert

    with tqdm(desc="convert", unit="B", unit_scale=True, disable=None, leave=False) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        summary = convert(args.source, args.to, progress=progress)
    return {"from": args.source, "to": args.to, **summary, "ok": True}


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("component", choices=COMPONENTS)
    parser.add_argument("--config", help="the checkpoint's config.json (or its folder); pipeline: not used")
    parser.add_argument("--checkpoint", help="folder with the reference's safetensors weights (default: random init)")
    parser.add_argument("--seed", type=int, default=0, help="seed for random weights and inputs")
    # VAE input geometry (pixels); DiT and SigLIP take theirs from the config.
    parser.add_argument("--frames", type=POSITIVE, default=9, help="vae: video frames")
    parser.add_argument("--height", type=POSITIVE, default=None,
                        help="vae: pixel height (default: 4 latent pixels, 32 for the 5B VAE; 1.5 tiles with --tiling)")
    parser.add_argument("--width", type=POSITIVE, default=None,
                        help="vae: pixel width (default: 6 latent pixels, 48 for the 5B VAE; 1.5 tiles with --tiling)")
    parser.add_argument("--tiling", action="store_true", help="vae: spatial tiling, as enable_tiling()")
    parser.add_argument("--batch", type=POSITIVE, default=None, help="batch size (default: the component's own)")


def _command(commands: Any, name: str, summary: str, description: str) -> argparse.ArgumentParser:
    """A subcommand with its one-line `summary` (in `a1-jax --help`) and a `description` (in `a1-jax NAME --help`)."""
    return commands.add_parser(name, help=summary, description=f"{summary}. {description}")


def _add_motion_source_args(parser: argparse.ArgumentParser) -> None:
    """The motion sources (exactly one per run; checked by `motion.sources.load_source`, one line and exit 2)."""
    parser.add_argument("--driving", help="driving video (any fps; sampled at 12 fps)")
    parser.add_argument("--audio", help="speech to lip-sync: any audio ffmpeg reads (wav, mp3, m4a, a video's sound)")
    parser.add_argument("--transcript", help="with --audio: the words spoken, aligned to the recording instead of "
                                             "free phone recognition")
    parser.add_argument("--text", help="text to speak (offline eSpeak NG voice, the `tts` extra) and lip-sync")
    parser.add_argument("--blendshapes", help="blendshape curves: our track .json or an ARKit / Live Link Face .csv")


def _add_animator_args(parser: argparse.ArgumentParser) -> None:
    """The model that animates: its weights, mesh and dtype (`animate`, `app`)."""
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--checkpoint", help="a SkyReels-A1 release folder, an `a1-jax convert` checkpoint or a "
                                            "training workdir")
    model.add_argument("--config", default="tiny",
                       help="without --checkpoint: seeded random weights for these configs (default: tiny)")
    parser.add_argument("--mesh", default="single",
                        help="mesh preset for parameters and activations (single, fsdp, fsdp_tensor, ... or a path)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"),
                        help="compute dtype (default: bfloat16 on GPU/TPU, float32 on CPU)")
    parser.add_argument("--offload", choices=("auto", "on", "off"), default="auto",
                        help="keep only the running stage's network on the device, the others in host memory "
                             "(same output; for a 24 GB card with the 5B model). auto (default): on where all "
                             "parameters and the largest stage would not fit the device")


def _add_interpolator_args(parser: argparse.ArgumentParser) -> None:
    # A string, checked by the library: a bad value is one line and exit 2 like every other user mistake.
    parser.add_argument("--interpolator", metavar="{flow,blend,film}", default="flow",
                        help="how in-between frames are made: flow (default; optical flow, no weights), blend "
                             "(cross-fade) or film (FILM, needs --interpolator-weights and torch)")
    parser.add_argument("--interpolator-weights", metavar="FILE",
                        help="--interpolator film: the TorchScript file the reference uses (film_net_fp16.pt)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="a1-jax", description="SkyReels-A1 in JAX: portrait animation, its PyTorch parity checks, "
                                                "training and evaluation. Start with `a1-jax animate --example "
                                                "--out out.mp4`.")
    parser.add_argument("--version", action="version", version=f"a1-jax {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    parity = _command(commands, "parity", "our module vs the PyTorch reference, fp32 on CPU",
                      "Runs one component (VAE, DiT, SigLIP, scheduler, or the whole sampling pipeline) in JAX and in "
                      "the diffusers/transformers reference on the same weights and inputs and prints the largest "
                      "error; needs the test extra (torch).")
    _add_model_args(parity)
    parity.set_defaults(run=_component_call("parity"))

    bench = _command(commands, "bench", "time our module against the PyTorch reference in one run",
                     "Median seconds per call of one component, ours and the reference's, on the same inputs; needs "
                     "the test extra (torch). `bench pipeline`: the accelerator's whole table in one call (a clip, "
                     "the DiT forward, a train step).")
    _add_model_args(bench)
    bench.add_argument("--against", choices=("torch", "diffusers"),
                       help="the reference to time against (vae, dit, siglip: always torch; pipeline: diffusers, "
                            "only when given)")
    bench.add_argument("--repeats", type=POSITIVE, default=3, help="timed calls per side (median reported)")
    bench.add_argument("--dtype", choices=("float32", "bfloat16"),
                       help="default float32; pipeline: bfloat16")
    bench.add_argument("--geometry", choices=("full", "tiny"), default="full",
                       help="pipeline: the release's 480x720 / 5B, or the small release of the parity tests")
    bench.add_argument("--blocks", type=POSITIVE, default=4, help="pipeline: DiT blocks of the timed train step")
    bench.set_defaults(run=_component_call("bench"))

    landmarks = _command(commands, "landmarks", "motion source -> control video for the pose guider",
                         "Finds the face in the portrait, takes the motion of a driving video (MediaPipe, every 12-fps "
                         "frame), speech, text or blendshape curves, moves the portrait's landmarks with it and draws "
                         "them: frame 0 is the portrait's own landmarks, then one frame per driving frame.")
    landmarks.add_argument("--ref", required=True, help="reference portrait image")
    _add_motion_source_args(landmarks)
    landmarks.add_argument("--out", required=True, help="control video to write (.mp4)")
    landmarks.add_argument("--track", help="also write the motion track used, 12 fps (.json; for a video: what "
                                           "MediaPipe measured)")
    landmarks.add_argument("--seed", type=int, default=0, help="seed of the blinks and head motion of speech and text")
    landmarks.add_argument("--frames-dir", help="also write every control frame as a lossless PNG here")
    landmarks.add_argument("--preview", help="also write a side-by-side preview (reference | driving | control, .mp4)")
    landmarks.add_argument("--landmarker", help=LANDMARKER_HELP)
    landmarks.add_argument("--max-frames", type=_number(int, low=2), help="at most this many control frames (49 = one "
                                                                          "clip)")
    landmarks.add_argument("--motion", choices=("relative", "absolute"), default="relative",
                           help="expression relative to the driver's first frame (default) or absolute")
    landmarks.add_argument("--expression-scale", type=_number(float, low=0), default=1.0,
                           help="scale of the transferred expression")
    _add_missing_face(landmarks)
    landmarks.set_defaults(run=_landmarks)

    dataset = _command(commands, "make-dataset", "videos -> 49-frame training clips",
                       "ArrayRecord shards + index.json (TFDS builder `a1_clips`), each clip with its control video, "
                       "reference frame and aligned face; --latents adds a cache of encoder outputs.")
    dataset.add_argument("--videos", help="folder of videos (searched recursively)")
    dataset.add_argument("--out", required=True, help="dataset folder to create (the same command again "
                                                        "finishes an interrupted run)")
    dataset.add_argument("--landmarker", help=LANDMARKER_HELP)
    dataset.add_argument("--workers", type=POSITIVE, default=1, help="videos processed in parallel (processes; the "
                                                                     "output does not depend on it)")
    dataset.add_argument("--clips-per-shard", type=POSITIVE, help="clips per ArrayRecord shard (default 256)")
    dataset.add_argument("--latents", metavar="CHECKPOINT",
                         help="also cache VAE / pose-guider latents and SigLIP tokens of fixed windows, encoded by "
                              "this checkpoint's encoders (without --videos: add the cache to the dataset at --out)")
    dataset.add_argument("--frames", type=POSITIVE, help="--latents: frames of the cached window (1 + 4k)")
    dataset.add_argument("--height", type=POSITIVE, help="--latents: pixel height of the cached window")
    dataset.add_argument("--width", type=POSITIVE, help="--latents: pixel width of the cached window")
    dataset.add_argument("--seed", type=int, default=0, help="--latents: seed of the first-frame noise augmentation")
    dataset.set_defaults(run=_make_dataset)

    train = _command(commands, "train", "train the DiT (a stage config) on a make-dataset folder",
                     "One jitted, sharded train step per batch, Orbax checkpoints every --save-every steps; the same "
                     "command on an existing workdir resumes exactly where it stopped.")
    train.add_argument("--config", required=True, help="training config (configs/train/*.yaml)")
    train.add_argument("--data", required=True, help="dataset folder from `a1-jax make-dataset`")
    train.add_argument("--workdir", required=True, help="run folder: model/, checkpoints/, metrics.jsonl")
    train.add_argument("--steps", type=POSITIVE, help="train until this many steps are done (default: the config's)")
    train.add_argument("--save-every", type=POSITIVE, help="checkpoint every N steps (default: the config's)")
    train.add_argument("--mesh", default="fsdp",
                       help="mesh preset (fsdp, data_fsdp, fsdp_tensor, single, ... or a path; default fsdp)")
    train.add_argument("--init", metavar="CHECKPOINT",
                       help="start from this release folder, converted checkpoint or workdir (overrides model.weights)")
    train.set_defaults(run=_train)

    evaluate = _command(commands, "evaluate", "how well a generated video follows its driver and keeps its identity",
                        "Expression, head pose and landmark motion against the driving video, identity against the "
                        "portrait (as the animator saw it: its 480x720 canvas), per frame and on average; --batch "
                        "scores a CSV of videos, one row each.")
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
    evaluate.add_argument("--identity-frames", type=NON_NEGATIVE,
                          help="generated frames the identity is measured on, spread evenly (default 16, as the "
                               "reference's arc_score.py; 0 = every frame)")
    evaluate.set_defaults(run=_evaluate)

    animate = _command(commands, "animate", "portrait + driving video, speech, text or blendshape curves -> the "
                                            "portrait performing that motion (mp4 with sound, 12 fps or --fps)",
                       "One model frame per 12-fps driving frame, in windows of 48 frames; --fps interpolates the "
                       "frames in between. Without --checkpoint it runs the "
                       "tiny random-weight configuration (every stage real, the picture not). `--example` animates "
                       "the portrait and talking clip shipped with the package.")
    animate.add_argument("--ref", help="reference portrait image (default with --example: the shipped portrait)")
    _add_motion_source_args(animate)
    animate.add_argument("--example", action="store_true",
                         help="use the example portrait shipped with a1_jax when --ref is not given, and its talking "
                              "clip when no motion source is")
    animate.add_argument("--out", required=True, help="animated video to write (.mp4)")
    animate.add_argument("--no-audio", action="store_true",
                         help="leave the sound out (default: the driving video's, the speech or the spoken text)")
    _add_animator_args(animate)
    animate.add_argument("--steps", type=POSITIVE, default=10, help="denoising steps (default 10, as the reference)")
    animate.add_argument("--guidance", type=_number(float, low=1, what=" (1 = no classifier-free guidance)"),
                         default=3.0, help="classifier-free guidance on the face tokens, at least 1 (default 3.0)")
    animate.add_argument("--seed", type=int, default=0,
                         help="seed of the noise, and of the blinks and head motion of speech and text")
    animate.add_argument("--max-frames", type=POSITIVE, help="use at most this many 12-fps driving frames")
    animate.add_argument("--single-clip", action="store_true",
                         help="the reference's single-clip script: 49 control frames [ref, f0, f0, f1, ...], "
                              "47 output frames")
    animate.add_argument("--preview", help="also write reference | driving | control | output side by side (.mp4)")
    animate.add_argument("--control", help="also write the control video the model followed, one frame per output "
                                           "frame at 12 fps (.mp4)")
    animate.add_argument("--landmarker", help=LANDMARKER_HELP)
    _add_missing_face(animate)
    animate.add_argument("--fps", metavar="N", default="12",
                         help="frame rate of --out, any number from 12 (the model's rate, default) to 240: frames "
                              "in between are interpolated, the duration is kept (--preview stays at 12)")
    _add_interpolator_args(animate)
    animate.add_argument("--seam", choices=("interpolate", "crossfade"), default="interpolate",
                         help="long videos: where two windows rendered the same frames, go from one to the other by "
                              "interpolating between their renderings (default) or by a plain cross-fade")
    animate.set_defaults(run=_animate, stages=True)

    app = _command(commands, "app", "the web app: animate in a browser, or through its API",
                   "A page (and the same function as an API, `/animate`) on http://HOST:PORT: a portrait and a "
                   "driving video, speech or text in; the animated video, the side-by-side preview, the summary and "
                   "the control video out, with progress per stage and step. One generation at a time; the others "
                   "queue. Needs the app extra (Gradio).")
    _add_animator_args(app)
    app.add_argument("--host", default="127.0.0.1",
                     help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for the network)")
    app.add_argument("--port", type=_number(int, low=1), default=7860, help="port (default 7860)")
    app.add_argument("--max-seconds", type=_number(float, low=0), default=60.0,
                     help="the longest motion source a request may bring, in seconds (default 60)")
    app.add_argument("--max-upload-mb", type=_number(float, low=0), default=100.0,
                     help="the largest file a request may upload, in MB (default 100)")
    app.set_defaults(run=_app)

    interpolate = _command(commands, "interpolate", "re-time a video to another frame rate by frame interpolation",
                           "Every output frame sits at its exact time k/N: the source frame itself where one falls "
                           "there, otherwise a frame interpolated between the two around it; the duration and the "
                           "sound are kept.")
    interpolate.add_argument("--in", dest="input", metavar="VIDEO", required=True, help="video to re-time")
    interpolate.add_argument("--out", metavar="VIDEO", required=True, help="video to write (.mp4)")
    interpolate.add_argument("--fps", metavar="N", required=True, help="frame rate of --out, 12 to 240")
    _add_interpolator_args(interpolate)
    interpolate.set_defaults(run=_interpolate)

    conversion = _command(commands, "convert", "a SkyReels-A1 release folder -> our Orbax checkpoint",
                          "Reads the release's safetensors with NumPy (no torch), checks every tensor against the "
                          "configs, and writes a checkpoint that `animate --checkpoint` restores straight into "
                          "shards. Streamed (one piece of the parameters in memory at a time); rerun the same command "
                          "to resume an interrupted one.")
    conversion.add_argument("--from", dest="source", required=True,
                            help="release folder (transformer/, vae/, pose_guider/, siglip-so400m-patch14-384/, "
                                 "scheduler/)")
    conversion.add_argument("--to", required=True, help="new folder for the checkpoint (or an interrupted convert's, "
                                                        "to resume it)")
    conversion.set_defaults(run=_convert)
    return parser


def _add_missing_face(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--missing-face", choices=("drop", "fill"), default="drop",
                        help="driving frames where no face is found: drop them (default, as the reference's "
                             "long-video script) or fill them from their neighbours; the summary lists them")


def _enable_compilation_cache() -> None:
    """Keeps compiled XLA programs on disk (`~/.cache/a1_jax/jax`, or `$JAX_COMPILATION_CACHE_DIR`), so a second run
    of the same command and geometry starts in seconds instead of recompiling every network. Every program is kept,
    however fast it compiled (JAX's default keeps those over 1 s): a run has some fifty small ones (casts, slices,
    the scheduler's state), seconds of compiling on every run otherwise. Through the environment when JAX is not
    imported yet (JAX reads it at import), so a command's checks run before that import."""
    settings = {"JAX_COMPILATION_CACHE_DIR": os.path.expanduser(os.path.join("~", ".cache", "a1_jax", "jax")),
                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    for name, default in settings.items():
        value = os.environ.setdefault(name, default)
        if "jax" in sys.modules:
            sys.modules["jax"].config.update(name.lower(), float(value) if name.endswith("_SECS") else value)


def _close_stages(args: argparse.Namespace) -> None:
    if getattr(args, "stages", None):
        args.stages.close()  # clears the status line before the last word


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, or a bad value (one line already printed): a code, not an exit
        return int(e.code or 0)
    if getattr(args, "stages", False) is True:  # a status line from the first second, before the heavy imports
        from a1_jax.progress import Stages

        args.stages = Stages(args.command)
    _enable_compilation_cache()
    # ffmpeg is started with subprocess, which forks and immediately execs: JAX's threads are never touched in the
    # child, so JAX's warning about forking is noise on the user's terminal.
    warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
    try:
        result: dict[str, Any] = args.run(args)
    except UserError as e:
        _close_stages(args)
        print(f"a1-jax: error: {e}", file=sys.stderr)
        return 2
    _close_stages(args)
    print(json.dumps(result), flush=True)
    return 0 if result.get("ok", True) else 1
