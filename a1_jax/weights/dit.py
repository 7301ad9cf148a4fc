"""diffusers `CogVideoXTransformer3DModel` (+ SkyReels `patch_embed.pose_proj`) names -> `models.dit.DiT` params.

One rule per tensor family (spec §2.6). Per-layer tensors `transformer_blocks.{i}.*` are stacked on the leading
`layers` axis of the scanned `blocks`; convert with `models.dit.unstack_layers` for the unrolled layout.
"""

from __future__ import annotations

from typing import Any, Mapping

from a1_jax.weights.rules import CONV2D, IDENTITY, LINEAR, Rule, Transform, import_params

_DROP_BATCH_AXIS = Transform(reshape=lambda shape: shape[1:])  # pos_embedding (1, rows, width) -> (rows, width)


def _linear(torch_prefix: str, flax_prefix: str, stack: str | None = None) -> list[Rule]:
    return [Rule(rf"{torch_prefix}\.weight", f"{flax_prefix}/kernel", LINEAR, stack),
            Rule(rf"{torch_prefix}\.bias", f"{flax_prefix}/bias", IDENTITY, stack)]


def _norm(torch_prefix: str, flax_prefix: str, stack: str | None = None) -> list[Rule]:
    return [Rule(rf"{torch_prefix}\.weight", f"{flax_prefix}/scale", IDENTITY, stack),
            Rule(rf"{torch_prefix}\.bias", f"{flax_prefix}/bias", IDENTITY, stack)]


_BLOCK = r"transformer_blocks\.(?P<layer>\d+)"

DIT_RULES: tuple[Rule, ...] = (
    Rule(r"patch_embed\.pos_embedding", "patch_embed/pos_embedding", _DROP_BATCH_AXIS),
    Rule(r"patch_embed\.proj\.weight", "patch_embed/proj_kernel", CONV2D),
    Rule(r"patch_embed\.proj\.bias", "patch_embed/proj_bias"),
    *_linear(r"patch_embed\.pose_proj\.0", "patch_embed/pose_proj_0"),
    *_linear(r"patch_embed\.pose_proj\.2", "patch_embed/pose_proj_2"),
    *_linear(r"patch_embed\.text_proj", "patch_embed/text_proj"),
    *_linear(r"time_embedding\.linear_1", "time_embedding_1"),
    *_linear(r"time_embedding\.linear_2", "time_embedding_2"),
    *_linear(rf"{_BLOCK}\.norm1\.linear", "blocks/norm1/linear", "layer"),
    *_norm(rf"{_BLOCK}\.norm1\.norm", "blocks/norm1/norm", "layer"),
    *_linear(rf"{_BLOCK}\.attn1\.to_q", "blocks/attn/to_q", "layer"),
    *_linear(rf"{_BLOCK}\.attn1\.to_k", "blocks/attn/to_k", "layer"),
    *_linear(rf"{_BLOCK}\.attn1\.to_v", "blocks/attn/to_v", "layer"),
    *_linear(rf"{_BLOCK}\.attn1\.to_out\.0", "blocks/attn/to_out", "layer"),
    *_norm(rf"{_BLOCK}\.attn1\.norm_q", "blocks/attn/norm_q", "layer"),
    *_norm(rf"{_BLOCK}\.attn1\.norm_k", "blocks/attn/norm_k", "layer"),
    *_linear(rf"{_BLOCK}\.norm2\.linear", "blocks/norm2/linear", "layer"),
    *_norm(rf"{_BLOCK}\.norm2\.norm", "blocks/norm2/norm", "layer"),
    *_linear(rf"{_BLOCK}\.ff\.net\.0\.proj", "blocks/ff/proj_in", "layer"),
    *_linear(rf"{_BLOCK}\.ff\.net\.2", "blocks/ff/proj_out", "layer"),
    *_norm(r"norm_final", "norm_final"),
    *_linear(r"norm_out\.linear", "norm_out_linear"),
    *_norm(r"norm_out\.norm", "norm_out_norm"),
    *_linear(r"proj_out", "proj_out"),
)


def import_dit(state: Mapping[str, Any], target: Any, dtype: Any = None) -> dict:
    """A diffusers/SkyReels transformer state dict (e.g. `open_checkpoint(folder)`) -> scanned `DiT` params.

    `target`: the (boxed) params of the model, e.g. `models.dit.abstract_params`. Raises UserError listing every
    missing, unexpected or mis-shaped tensor.
    """
    return import_params(state, DIT_RULES, target, what="DiT checkpoint", dtype=dtype)
