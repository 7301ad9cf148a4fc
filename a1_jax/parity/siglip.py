"""SigLIP vision tower vs transformers' `SiglipVisionModel` (`a1-jax parity siglip`, `a1-jax bench siglip`)."""

from __future__ import annotations

import argparse
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from a1_jax.config import SiglipConfig
from a1_jax.models.siglip import SiglipVisionTower
from a1_jax.parity import (errors, fp32_reference, import_reference, perturb_plain_tensors, report, time_call,
                           to_numpy, torch_state)
from a1_jax.weights.safetensors_io import open_checkpoint
from a1_jax.weights.rules import apply_plan
from a1_jax.weights.siglip import SKIP, plan

DEFAULT_PARITY_BATCH = 2
DEFAULT_BENCH_BATCH = 1
BENCH_TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2}  # a sanity bound on the timed outputs, not the parity gate


def _reference(config: SiglipConfig, args: argparse.Namespace, dtype: str = "float32") -> Any:
    """transformers' model: from `args.checkpoint`, else random init from `args.seed` with every 1-D tensor
    (norm scales, biases) perturbed, since the default init leaves them at 1/0 and would hide a swapped mapping."""
    torch = import_reference("torch")
    transformers = import_reference("transformers")
    torch_dtype = getattr(torch, dtype)
    if args.checkpoint:
        model = transformers.SiglipVisionModel.from_pretrained(args.checkpoint, dtype=torch_dtype)
    else:
        torch.manual_seed(args.seed)
        fields = {f: getattr(config, f) for f in config.__dataclass_fields__}
        model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**fields))
        perturb_plain_tensors(model, args.seed)
        model = model.to(torch_dtype)
    return model.eval()


def _setup(args: argparse.Namespace,
           dtype: str = "float32") -> tuple[SiglipConfig, Any, SiglipVisionTower, dict, list[str]]:
    """Config, reference model, our model, our params imported from the same weights, and the skipped names."""
    config = SiglipConfig.from_json(args.config)
    reference = _reference(config, args, dtype)
    model = SiglipVisionTower(config, dtype=getattr(jnp, dtype))
    # A checkpoint is imported from its files, exactly as inference loads it; random weights from the torch model.
    state = open_checkpoint(args.checkpoint) if args.checkpoint else torch_state(reference)
    checked = plan({name: tuple(value.shape) for name, value in state.items()}, model)
    return config, reference, model, apply_plan(checked, state, dtype=np.float32), checked.skipped


def _count_by_pattern(names: list[str]) -> dict[str, int]:
    """How many checkpoint tensors each skip pattern dropped (the full list would drown the JSON line)."""
    return {pattern: sum(bool(re.fullmatch(pattern, name)) for name in names) for pattern in SKIP}


def _pixels(config: SiglipConfig, batch: int, seed: int) -> np.ndarray:
    """Preprocessed-range pixels `[batch, channels, size, size]` (NCHW, as transformers takes them)."""
    shape = (batch, config.num_channels, config.image_size, config.image_size)
    return np.random.default_rng(seed).uniform(-1.0, 1.0, shape).astype(np.float32)


def parity(args: argparse.Namespace) -> dict:
    """`last_hidden_state` of ours vs transformers on one random pixel batch, fp32 on CPU."""
    torch = import_reference("torch")
    config, reference, model, params, skipped = _setup(args)
    pixels = _pixels(config, args.batch or DEFAULT_PARITY_BATCH, args.seed)
    with fp32_reference():
        with torch.no_grad():
            expected = to_numpy(reference(torch.from_numpy(pixels)).last_hidden_state)
        ours = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(pixels.transpose(0, 2, 3, 1))))
    source = args.checkpoint or f"random (seed {args.seed})"
    return report("siglip", os.fspath(args.config), pixels.shape,
                  {"last_hidden_state": (ours, expected)}, weights=source, skipped=_count_by_pattern(skipped))


def bench(args: argparse.Namespace) -> dict:
    """Wall time of one forward, ours (jitted; compile timed apart) vs transformers, same weights and input."""
    torch = import_reference("torch")
    config, reference, model, params, _ = _setup(args, args.dtype)
    pixels = _pixels(config, args.batch or DEFAULT_BENCH_BATCH, args.seed)
    params = jax.tree.map(lambda a: jnp.asarray(a, getattr(jnp, args.dtype)), params)
    x = jnp.asarray(pixels.transpose(0, 2, 3, 1))
    start = time.perf_counter()
    compiled = jax.jit(model.apply).lower({"params": params}, x).compile()
    compile_s = time.perf_counter() - start
    ours = np.asarray(compiled({"params": params}, x).astype(jnp.float32))  # warm-up
    jax_s = time_call(lambda: compiled({"params": params}, x), args.repeats, sync=jax.block_until_ready)

    torch_pixels = torch.from_numpy(pixels).to(getattr(torch, args.dtype))
    with torch.no_grad():
        expected = to_numpy(reference(torch_pixels).last_hidden_state)  # warm-up
        torch_s = time_call(lambda: reference(torch_pixels), args.repeats)
    rel = errors({"last_hidden_state": (ours, expected)})["last_hidden_state"]["max_rel_err"]
    tol = BENCH_TOLERANCE[args.dtype]
    return {"component": "siglip", "config": os.fspath(args.config), "input_shape": list(pixels.shape),
            "dtype": args.dtype, "repeats": args.repeats, "jax_s": jax_s, "torch_s": torch_s,
            "speedup": torch_s / jax_s, "compile_s": compile_s, "torch_threads": torch.get_num_threads(),
            "devices": str(jax.devices()[0]), "max_rel_err": rel, "tol": tol, "ok": bool(rel <= tol)}
