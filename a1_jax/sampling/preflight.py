"""What `a1-jax animate` checks before anything heavy loads (no JAX, no MediaPipe here): the inputs exist and every
output can be written in its format. A mistake costs a second, not a minute of compute."""

from __future__ import annotations

import os

from a1_jax import examples
from a1_jax.errors import UserError
from a1_jax.interpolate.retime import parse_fps
from a1_jax.io.video import VIDEO_EXTENSIONS, check_output


def inputs(args) -> tuple[str, str | None]:
    """(portrait, driving video or None) of the command line: `--example` supplies the shipped portrait when `--ref`
    is not given, and the shipped talking clip when no motion source is (`--driving`, `--audio`, `--text`,
    `--blendshapes`; `motion.sources.load_source` checks that exactly one is given)."""
    ref = args.ref or (examples.portrait_path() if args.example else None)
    if ref is None:
        raise UserError("animate needs --ref (or --example for the portrait shipped with a1_jax)")
    named = {flag: getattr(args, flag[2:], None) for flag in ("--driving", "--audio", "--blendshapes")}
    driving = named["--driving"]
    if driving is None and args.example and not any(named.values()) and getattr(args, "text", None) is None:
        driving = named["--driving"] = examples.driving_path()
    for flag, path in [("--ref", ref), *named.items()]:
        if path is not None and not os.path.isfile(path):
            raise UserError(f"{'image' if flag == '--ref' else 'file'} not found: {path} ({flag})")
    return ref, driving


def outputs(args, sources: tuple[str, ...]) -> list[tuple[str, str]]:
    """(flag, path) of every video output, each checked (`io.video.check_output`); none may be an input or another
    output. Callers adding outputs (audio, other rates) check theirs with `check_output` the same way."""
    named = [("--out", args.out)] + ([("--preview", args.preview)] if args.preview else [])
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


def check(args) -> tuple[str, str | None, list[tuple[str, str]]]:
    """Every path and the output rate of the command line: (portrait, driving video or None, outputs)."""
    parse_fps(args.fps)
    ref, driving = inputs(args)
    sources = [path for path in (ref, driving, getattr(args, "audio", None), getattr(args, "blendshapes", None))
               if path is not None]
    return ref, driving, outputs(args, tuple(sources))
