"""The train state and the optimizer: which DiT parameters train, AdamW on those, optional EMA, shardings.

`TrainState` holds the step, the DiT's params (fp32 master weights, whatever the compute dtype), the optimizer state,
the EMA of the params (or None) and the run's base PRNG key (raw `uint32[2]`; step k draws from `fold_in(key, k)`,
so a resumed run draws what an uninterrupted one would).

Stages pick trainable parameters by regexes on '/'-joined paths (`blocks/attn/to_q/kernel`); everything else, and
always the learned position table (a fixed buffer in diffusers), is frozen through `optax.multi_transform`: frozen
leaves get `set_to_zero` (no optimizer state, and XLA drops their gradient computation since nothing reads it),
trainable ones are clipped by their own global norm, then AdamW with linear warmup and cosine decay. Weight decay
applies to matrices and conv kernels only.
"""

from __future__ import annotations

import re
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from a1_jax.errors import UserError
from a1_jax.train.config import OptimizerSection, StageSection

TRAINABLE, FROZEN = "trainable", "frozen"
ALWAYS_FROZEN = ("patch_embed", "pos_embedding")  # the fixed sin-cos table: a buffer in diffusers, never trained
DECAYED = ("kernel", "proj_kernel")  # leaf names that get weight decay


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps done
    params: Any  # the DiT's params, fp32
    opt_state: Any
    ema: Any  # same tree as params, or None
    rng: jax.Array  # uint32[2]: the run's base key


def param_paths(params: Any) -> list[str]:
    return ["/".join(path) for path in traverse_util.flatten_dict(params)]


def stage_labels(params: Any, stage: StageSection) -> Any:
    """`trainable`/`frozen` for every leaf of `params`; a pattern that matches nothing is a `UserError` (a typo
    would otherwise freeze or train something silently)."""
    trainable = [re.compile(p) for p in stage.trainable]
    frozen = [re.compile(p) for p in stage.frozen]
    paths = param_paths(params)
    unused = [p.pattern for p in trainable + frozen if not any(p.fullmatch(path) for path in paths)]
    if unused:
        raise UserError(f"stage {stage.name!r}: pattern(s) {', '.join(unused)} match no DiT parameter "
                        f"(paths look like {', '.join(paths[:4])}, ...)")
    flat = {}
    for path in traverse_util.flatten_dict(params):
        key = "/".join(path)
        chosen = (any(p.fullmatch(key) for p in trainable) and not any(p.fullmatch(key) for p in frozen)
                  and path != ALWAYS_FROZEN)
        flat[path] = TRAINABLE if chosen else FROZEN
    labels = traverse_util.unflatten_dict(flat)
    if not any(label == TRAINABLE for label in flat.values()):
        raise UserError(f"stage {stage.name!r} leaves no DiT parameter trainable")
    return labels


def learning_rate(config: OptimizerSection) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=config.learning_rate,
                                              warmup_steps=config.warmup_steps, decay_steps=config.decay_steps,
                                              end_value=config.end_learning_rate)


def make_optimizer(config: OptimizerSection, labels: Any) -> optax.GradientTransformation:
    decay_mask = traverse_util.unflatten_dict({path: path[-1] in DECAYED
                                               for path in traverse_util.flatten_dict(labels)})
    trainable = optax.chain(
        optax.clip_by_global_norm(config.clip_norm) if config.clip_norm > 0 else optax.identity(),
        optax.adamw(learning_rate(config), b1=config.b1, b2=config.b2, eps=config.eps,
                    weight_decay=config.weight_decay, mask=decay_mask))
    return optax.multi_transform({TRAINABLE: trainable, FROZEN: optax.set_to_zero()}, labels)


def init_state(params: Any, optimizer: optax.GradientTransformation, seed: int, ema: bool) -> TrainState:
    """Pure: jit it with the state shardings as `out_shardings` (the params are donated into the state)."""
    params = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      ema=jax.tree_util.tree_map(jnp.copy, params) if ema else None,
                      rng=jax.random.key_data(jax.random.key(seed)).astype(jnp.uint32))


def _lookup(tree: Any, path: tuple) -> Any:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def state_shardings(abstract: TrainState, param_shardings: Any, mesh: Mesh) -> TrainState:
    """Shardings of a (possibly abstract) state: params and EMA as `param_shardings`; an optimizer-state leaf shaped
    like the parameter at the end of its path (Adam's moments) as that parameter; the rest replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    flat_params = traverse_util.flatten_dict(abstract.params)

    def for_opt_leaf(path, leaf):
        keys = tuple(getattr(k, "key", None) for k in path)
        for start in range(len(keys)):
            tail = keys[start:]
            if tail in flat_params and tuple(flat_params[tail].shape) == tuple(leaf.shape):
                return _lookup(param_shardings, tail)
        return replicated

    return TrainState(step=replicated, params=param_shardings,
                      opt_state=jax.tree_util.tree_map_with_path(for_opt_leaf, abstract.opt_state),
                      ema=None if abstract.ema is None else param_shardings, rng=replicated)
