"""What `a1-jax animate` and the web app ask for (`AnimateRequest`), and what is checked before anything heavy loads
(no JAX, no MediaPipe here): the values, the inputs exist and every output can be written in its format. A mistake
costs a second, not a minute of compute."""

from __future__ import annotations

import dataclasses
import math
import os

from a1_jax import examples
from a1_jax.errors import UserError
from a1_jax.interpolate.retime import parse_fps
from a1_jax.io.video import VIDEO_EXTENSIONS, check_output


@dataclasses.dataclass(frozen=True)
class AnimateRequest:
    """One animation, as `a1-jax animate` (its flags, same names and defaults) or the web app asks for it.

    Exactly one motion source (`driving`, `audio`, `text`, `blendshapes`; `example` fills in the shipped files).
    `preview` (reference | driving | control | output) and `control` (the control video the model followed) are
    optional outputs, at 12 fps. `max_seconds`: the longest motion source accepted (a server's limit; None: any)."""

    out: str
    ref: str | None = None
    driving: str | None = None
    audio: str | None = None
    transcript: str | None = None
    text: str | None = None
    blendshapes: str | None = None
    example: bool = False
    preview: str | None = None
    control: str | None = None
    no_audio: bool = False
    checkpoint: str | None = None
    config: str = "tiny"
    steps: int = 10
    guidance: float = 3.0
    seed: int = 0
    max_frames: int | None = None
    single_clip: bool = False
    landmarker: str | None = None
    missing_face: str = "drop"
    mesh: str = "single"
    dtype: str | None = None
    offload: str = "auto"
    fps: str | float = "12"
    interpolator: str = "flow"
    interpolator_weights: str | None = None
    seam: str = "interpolate"
    max_seconds: float | None = None

    @classmethod
    def from_args(cls, args) -> "AnimateRequest":
        """The request of a parsed `a1-jax animate` command line."""
        return cls(**{field.name: getattr(args, field.name) for field in dataclasses.fields(cls)
                      if hasattr(args, field.name)})


def values(request: AnimateRequest) -> None:
    """The numbers (the CLI's argparse checks them too; other callers get the same limits here)."""
    if request.steps < 1:
        raise UserError(f"--steps must be at least 1, got {request.steps}")
    if not math.isfinite(request.guidance) or request.guidance < 1:
        raise UserError(f"--guidance must be at least 1 (1 = no classifier-free guidance), got {request.guidance:g}")
    if request.max_frames is not None and request.max_frames < 1:
        raise UserError(f"--max-frames must be at least 1, got {request.max_frames}")
    parse_fps(request.fps)


def inputs(request: AnimateRequest) -> tuple[str, str | None]:
    """(portrait, driving video or None) of a request: `--example` supplies the shipped portrait when `--ref` is not
    given, and the shipped talking clip when no motion source is (`--driving`, `--audio`, `--text`, `--blendshapes`;
    `motion.sources.load_source` checks that exactly one is given)."""
    ref = request.ref or (examples.portrait_path() if request.example else None)
    if ref is None:
        raise UserError("animate needs --ref (or --example for the portrait shipped with a1_jax)")
    named = {"--driving": request.driving, "--audio": request.audio, "--blendshapes": request.blendshapes}
    driving = request.driving
    if driving is None and request.example and not any(named.values()) and request.text is None:
        driving = named["--driving"] = examples.driving_path()
    for flag, path in [("--ref", ref), *named.items()]:
        if path is not None and not os.path.isfile(path):
            raise UserError(f"{'image' if flag == '--ref' else 'file'} not found: {path} ({flag})")
    return ref, driving


def outputs(request: AnimateRequest, sources: tuple[str, ...]) -> list[tuple[str, str]]:
    """(flag, path) of every video output, each checked (`io.video.check_output`); none may be an input or another
    output. Callers adding outputs (audio, other rates) check theirs with `check_output` the same way."""
    named = [("--out", request.out)] + [(flag, path) for flag, path in (("--preview", request.preview),
                                                                        ("--control", request.control)) if path]
    inputs_real = {os.path.realpath(source) for source in sources}
    seen: set[str] = set()
    for flag, path in named:
        real = os.path.realpath(path)
        if real in inputs_real:
            raise UserError(f"{flag} {path} is one of the inputs: it would be overwritten")
        if real in seen:
            raise UserError(f"{flag} {path} names the same file as another output")
        seen.add(real)
        check_output(path, flag, VIDEO_EXTENSIONS)
    return named


def check(request: AnimateRequest) -> tuple[str, str | None, list[tuple[str, str]]]:
    """Every value and path of a request: (portrait, driving video or None, outputs)."""
    values(request)
    ref, driving = inputs(request)
    sources = [path for path in (ref, driving, request.audio, request.blendshapes) if path is not None]
    return ref, driving, outputs(request, tuple(sources))
