"""transformers SigLIP vision weights -> `SiglipVisionTower` params.

Names come with a `vision_model.` prefix from a full `SiglipModel` checkpoint (google/siglip-so400m-patch14-384) or
a `SiglipVisionModel` saved by transformers 4, and without it from one saved by transformers 5; both are accepted.
The text tower, the contrastive logit scale/bias and the attention-pooling head are skipped by name (SkyReels-A1
uses `last_hidden_state` only) and listed in the plan; any other stray name is an error.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from a1_jax.config import SiglipConfig
from a1_jax.models.siglip import SiglipVisionTower, param_shapes
from a1_jax.weights.rules import CONV2D, LINEAR, ImportPlan, Rule, apply_plan, plan_import
from a1_jax.weights.safetensors_io import open_checkpoint

_PREFIX = r"(?:vision_model\.)?"
_LAYER = _PREFIX + r"encoder\.layers\.(?P<layer>\d+)\."

RULES = [
    Rule(_PREFIX + r"embeddings\.patch_embedding\.weight", "patch_embedding/kernel", CONV2D),
    Rule(_PREFIX + r"embeddings\.patch_embedding\.bias", "patch_embedding/bias"),
    Rule(_PREFIX + r"embeddings\.position_embedding\.weight", "position_embedding"),
    Rule(_LAYER + r"(?P<norm>layer_norm[12])\.weight", "encoder/{norm}/scale", stack="layer"),
    Rule(_LAYER + r"(?P<norm>layer_norm[12])\.bias", "encoder/{norm}/bias", stack="layer"),
    Rule(_LAYER + r"self_attn\.(?P<proj>[qkv]_proj|out_proj)\.weight", "encoder/self_attn/{proj}/kernel", LINEAR,
         stack="layer"),
    Rule(_LAYER + r"self_attn\.(?P<proj>[qkv]_proj|out_proj)\.bias", "encoder/self_attn/{proj}/bias",
         stack="layer"),
    Rule(_LAYER + r"mlp\.(?P<fc>fc[12])\.weight", "encoder/{fc}/kernel", LINEAR, stack="layer"),
    Rule(_LAYER + r"mlp\.(?P<fc>fc[12])\.bias", "encoder/{fc}/bias", stack="layer"),
    Rule(_PREFIX + r"post_layernorm\.weight", "post_layernorm/scale"),
    Rule(_PREFIX + r"post_layernorm\.bias", "post_layernorm/bias"),
]

SKIP = [
    r"text_model\..*",  # the text tower of a full SiglipModel
    r"logit_(?:scale|bias)",  # its contrastive logit calibration
    _PREFIX + r"head\..*",  # the attention-pooling (MAP) head: unused, SkyReels-A1 takes every token
]


def plan(shapes: Mapping[str, Any], model: SiglipVisionTower, what: str = "SigLIP checkpoint") -> ImportPlan:
    """Checks names and shapes of a transformers SigLIP state dict against `model` (no weights are read)."""
    return plan_import(shapes, RULES, param_shapes(model), skip=SKIP, what=what)


def import_siglip(state: Mapping[str, Any], model: SiglipVisionTower, dtype: Any = None,
                  what: str = "SigLIP checkpoint") -> dict:
    """A transformers SigLIP state dict (name -> array) as `model` params; `dtype` casts every leaf."""
    shapes = {name: tuple(value.shape) for name, value in state.items()}
    return apply_plan(plan(shapes, model, what), state, dtype=dtype)


def load_siglip(folder: str | os.PathLike, dtype: Any = None, **model_kwargs: Any) -> tuple[SiglipVisionTower, dict]:
    """The model (geometry from the folder's `config.json`) and its params from the folder's safetensors.

    `model_kwargs` are the runtime knobs of `SiglipVisionTower` (dtype, param_dtype, attention_kernel, remat).
    """
    model = SiglipVisionTower(SiglipConfig.from_json(folder), **model_kwargs)
    checkpoint = open_checkpoint(folder)
    return model, import_siglip(checkpoint, model, dtype=dtype, what=f"SigLIP checkpoint {os.fspath(folder)}")
