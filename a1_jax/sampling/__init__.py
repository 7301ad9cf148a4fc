"""Inference: the Animator (conditions, the jitted denoising loop, long-video windows) and `a1-jax animate`."""

from a1_jax.sampling.animator import Animator

__all__ = ["Animator"]
