"""The sharding plan of the real train step (`a1_jax.train`) for the 5B model: per-device memory and bytes
communicated, from the step compiled on abstract inputs (no weights are allocated).

    # TPU, ahead of time on any machine (libtpu in a throwaway venv; no TPU is used):
    python -m venv --system-site-packages /tmp/tpuvenv && /tmp/tpuvenv/bin/pip install libtpu
    JAX_PLATFORMS=cpu /tmp/tpuvenv/bin/python tools/sharding_plan.py --target tpu:v5p:2x4x4 --mesh fsdp --batch 32
    # 8 simulated CPU devices (a proxy for 8 GPUs: exact state bytes, CPU-compiler activations):
    JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8 python tools/sharding_plan.py --target cpu \
        --mesh fsdp --batch 8

Prints one JSON line: the `StepPlan` (argument / output / temp bytes, collectives) and the per-device split of the
arguments into params, optimizer state, EMA and batch, plus the trainable gradients' fp32 bytes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from a1_jax import parallel
from a1_jax.models import dit
from a1_jax.train import config as train_config, state as train_state, trainer
from a1_jax.weights import checkpoint

STAGES = {"motion": "stage1", "identity": "stage2", "all": "stage3"}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def per_device_bytes(tree, shardings) -> int:
    return sum(math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
               for x, s in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(shardings)))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="cpu", help="cpu (this machine's devices) or tpu:<topology>, e.g. "
                                                        "tpu:v5p:2x4x4 (v5p-64)")
    parser.add_argument("--mesh", default="fsdp", help="mesh preset")
    parser.add_argument("--layers", type=int, default=42, help="DiT blocks (the 5B has 42)")
    parser.add_argument("--remat", default="full")
    parser.add_argument("--batch", type=int, required=True, help="global batch")
    parser.add_argument("--stage", choices=sorted(STAGES), default="all")
    args = parser.parse_args(argv)

    config = train_config.load(os.path.join(REPO, "configs", "train", f"{STAGES[args.stage]}.yaml"))
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, batch_size=args.batch),
                                 compute=dataclasses.replace(config.compute, remat=args.remat))
    if args.target.startswith("tpu:"):
        from jax.experimental import topologies

        devices = topologies.get_topology_desc(platform="tpu", topology_name=args.target[4:]).devices
    else:
        devices = jax.devices()
    preset = parallel.load_preset(args.mesh)
    mesh, rules = parallel.make_mesh(preset, devices), preset.rules
    configs = checkpoint.ModelConfigs.from_folder(checkpoint.model_config_folder("5b"))
    configs = dataclasses.replace(configs, transformer=dataclasses.replace(configs.transformer,
                                                                            num_layers=args.layers))
    fp32 = dit.DiT(configs.transformer, dtype=jnp.float32, param_dtype=jnp.float32, remat=args.remat)
    model = fp32.clone(dtype=jnp.dtype(config.compute.dtype))  # fp32 master weights, compute in the config's dtype
    boxed = dit.abstract_params(fp32, dit.example_inputs(configs.transformer, batch=1))
    param_shardings = parallel.shardings(boxed, mesh, rules)
    params = jax.tree_util.tree_map(lambda x: x.value if hasattr(x, "value") else x, boxed,
                                    is_leaf=lambda x: hasattr(x, "names"))
    labels = train_state.stage_labels(params, config.stage)
    optimizer = train_state.make_optimizer(config.optimizer, labels)
    abstract = jax.eval_shape(lambda p: train_state.init_state(p, optimizer, 0, config.ema_decay is not None), params)
    shardings = train_state.state_shardings(abstract, param_shardings, mesh)
    step, batch_shardings = trainer.build_step(config, configs, model, labels, optimizer, shardings, mesh, rules)
    placed = lambda tree, sh: jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                                     tree, sh)
    batch = trainer.abstract_batch(config, configs)
    start = time.time()
    with parallel.activate(mesh, rules):
        plan = parallel.step_plan(step, placed(abstract, shardings), placed(batch, batch_shardings))
    flat_labels, flat_params = traverse_util.flatten_dict(labels), traverse_util.flatten_dict(params)
    flat_shardings = traverse_util.flatten_dict(param_shardings)
    gradient_bytes = sum(math.prod(flat_shardings[k].shard_shape(flat_params[k].shape)) * 4 for k in flat_params
                         if flat_labels[k] == "trainable")
    summary = {"target": args.target, "devices": len(devices), "mesh": dict(mesh.shape), "layers": args.layers,
               "remat": args.remat, "batch": args.batch, "stage": args.stage, "compute": config.compute.dtype,
               "compile_s": round(time.time() - start, 1),
               "params_bytes": per_device_bytes(abstract.params, shardings.params),
               "opt_state_bytes": per_device_bytes(abstract.opt_state, shardings.opt_state),
               "ema_bytes": per_device_bytes(abstract.ema, shardings.ema) if abstract.ema is not None else 0,
               "batch_bytes": per_device_bytes(batch, batch_shardings), "trainable_grad_bytes": gradient_bytes,
               **plan.as_dict(), "ok": True}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
