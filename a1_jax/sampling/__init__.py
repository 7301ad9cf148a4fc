"""Inference: the Animator (conditions, the jitted denoising loop, long-video windows) and `a1-jax animate`.

`Animator` is imported on first use, so the command line's checks (`sampling.preflight`) run before JAX loads."""

from typing import Any

__all__ = ["Animator"]


def __getattr__(name: str) -> Any:
    if name == "Animator":
        from a1_jax.sampling.animator import Animator

        return Animator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
