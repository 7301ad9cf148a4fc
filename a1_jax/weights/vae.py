"""diffusers `AutoencoderKLCogVideoX` state dict -> `a1_jax.models.vae` params (also the pose guider's).

One declarative table. PyTorch `ModuleList` indices become name suffixes (`down_blocks.1.resnets.0` ->
`down_blocks_1_resnets_0`, `downsamplers.0` -> `down_blocks_1_downsample`); every other name segment is kept, so a
Flax path reads like its PyTorch name. Conv3d `[O, I, T, H, W]` -> `[T, H, W, I, O]`, Conv2d likewise; GroupNorm
`weight` -> `scale`.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax.numpy as jnp

from a1_jax.config import VAEConfig
from a1_jax.models.vae import abstract_params
from a1_jax.weights.rules import CONV2D, CONV3D, Rule, Transform, import_params
from a1_jax.weights.safetensors_io import open_checkpoint

DECODER_SKIP = (r"decoder\..*",)  # what an encoder-only (pose guider) import leaves out, deliberately


def _conv(src: str, dst: str, transform: Transform) -> list[Rule]:
    return [Rule(rf"{src}\.weight", f"{dst}/kernel", transform), Rule(rf"{src}\.bias", f"{dst}/bias")]


def _group_norm(src: str, dst: str) -> list[Rule]:
    return [Rule(rf"{src}\.weight", f"{dst}/scale"), Rule(rf"{src}\.bias", f"{dst}/bias")]


def _norm(src: str, dst: str) -> list[Rule]:
    """A resnet norm: GroupNorm in the encoder, SpatialNorm3D (norm_layer, conv_y, conv_b) in the decoder."""
    return (_group_norm(src, dst) + _group_norm(rf"{src}\.norm_layer", f"{dst}/norm_layer")
            + _conv(rf"{src}\.conv_(?P<yb>[yb])\.conv", f"{dst}/conv_{{yb}}", CONV3D))


def _resnets(src: str, dst: str) -> list[Rule]:
    """The resnets of one block: PyTorch prefix regex `src`, Flax module-name prefix `dst`."""
    src, dst = rf"{src}\.resnets\.(?P<r>\d+)", f"{dst}_resnets_{{r}}"
    return (_conv(rf"{src}\.conv(?P<n>[12])\.conv", f"{dst}/conv{{n}}/conv", CONV3D)
            + _conv(rf"{src}\.conv_shortcut", f"{dst}/conv_shortcut", CONV3D)
            + _norm(rf"{src}\.norm(?P<n>[12])", f"{dst}/norm{{n}}"))


def vae_rules() -> list[Rule]:
    """The rule table for the full VAE (an encoder-only import uses it with `skip=DECODER_SKIP`)."""
    rules = []
    for part in ("encoder", "decoder"):
        rules += _conv(rf"{part}\.conv_(?P<io>in|out)\.conv", f"{part}/conv_{{io}}/conv", CONV3D)
        rules += _resnets(rf"{part}\.mid_block", f"{part}/mid_block")
    rules += _resnets(r"encoder\.down_blocks\.(?P<b>\d+)", "encoder/down_blocks_{b}")
    rules += _conv(r"encoder\.down_blocks\.(?P<b>\d+)\.downsamplers\.0\.conv",
                   "encoder/down_blocks_{b}_downsample/conv", CONV2D)
    rules += _group_norm(r"encoder\.norm_out", "encoder/norm_out")
    rules += _resnets(r"decoder\.up_blocks\.(?P<b>\d+)", "decoder/up_blocks_{b}")
    rules += _conv(r"decoder\.up_blocks\.(?P<b>\d+)\.upsamplers\.0\.conv", "decoder/up_blocks_{b}_upsample/conv",
                   CONV2D)
    rules += _norm(r"decoder\.norm_out", "decoder/norm_out")
    return rules


def load_vae_params(checkpoint: str | os.PathLike | Mapping[str, Any], config: VAEConfig, *,
                    encoder_only: bool = False, dtype: Any = jnp.float32) -> dict:
    """VAE params from a diffusers checkpoint folder / safetensors file, or an in-memory `{name: array}` state.

    `encoder_only`: import `encoder.*` only (the pose guider) and skip `decoder.*` on purpose. `dtype`: of every
    leaf (fp32 by default; None keeps the checkpoint's).
    """
    state = checkpoint if isinstance(checkpoint, Mapping) else open_checkpoint(checkpoint)
    what = "VAE checkpoint" if isinstance(checkpoint, Mapping) else f"VAE checkpoint {os.fspath(checkpoint)}"
    target = abstract_params(config, encoder_only=encoder_only)
    return import_params(state, vae_rules(), target, skip=DECODER_SKIP if encoder_only else (), what=what,
                         dtype=dtype)
