"""The train state and the optimizer: which DiT parameters train, AdamW on those, optional EMA, shardings.

`TrainState` holds the step, the DiT's params (fp32 master weights, whatever the compute dtype), the optimizer state,
the EMA of the trainable params (or None) and the run's base PRNG key (raw `uint32[2]`; step k draws from
`fold_in(key, k)`, so a resumed run draws what an uninterrupted one would).

EMA. Only trainable leaves have one (a frozen leaf's average is itself: keeping a copy would cost its bytes again,
2.6 GB a chip for the 5B DiT at 8-way). Update t (0-based) uses the decay min(decay, (1 + t) / (10 + t)): 0.1 at
the first update, so the average forgets the stage's starting weights in a few hundred steps instead of holding
e^{-n(1-decay)} of them after n steps (37% after 10k steps at 0.9999).

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
    ema: Any  # the trainable leaves of params (a nested dict of those only), or None
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


def trainable_paths(labels: Any) -> list[tuple[str, ...]]:
    """The trainable leaves' paths, sorted: the order of `select` and of the step's `learned` flags."""
    return sorted(path for path, label in traverse_util.flatten_dict(labels).items() if label == TRAINABLE)


def select(tree: Any, paths: list[tuple[str, ...]]) -> dict:
    """The nested dict of `tree`'s leaves at `paths` only."""
    flat = traverse_util.flatten_dict(tree)
    return traverse_util.unflatten_dict({path: flat[path] for path in paths})


def overlay(tree: Any, part: Any) -> dict:
    """`tree` with the leaves `part` holds replaced by `part`'s."""
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(tree), **traverse_util.flatten_dict(part)})


def ema_decay_at(decay: float, update: jax.Array) -> jax.Array:
    """The decay of update `update` (0-based): min(decay, (1 + t) / (10 + t))."""
    t = jnp.asarray(update, jnp.float32)
    return jnp.minimum(decay, (1.0 + t) / (10.0 + t))


def ema_update(ema: Any, params: Any, decay: float, update: jax.Array) -> Any:
    """The EMA after update `update`: d·ema + (1 − d)·params for each leaf `ema` holds (`params` may hold more)."""
    d = ema_decay_at(decay, update)
    return jax.tree_util.tree_map(lambda e, p: d * e + (1 - d) * p, ema, select(params, list(
        traverse_util.flatten_dict(ema))))


def init_state(params: Any, optimizer: optax.GradientTransformation, seed: int,
               ema_paths: list[tuple[str, ...]] | None) -> TrainState:
    """Pure: jit it with the state shardings as `out_shardings` (the params are donated into the state).
    `ema_paths`: the leaves that get an EMA (the trainable ones), None for no EMA."""
    params = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      ema=None if ema_paths is None else jax.tree_util.tree_map(jnp.copy, select(params, ema_paths)),
                      rng=jax.random.key_data(jax.random.key(seed)).astype(jnp.uint32))


def _lookup(tree: Any, path: tuple) -> Any:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def state_shardings(abstract: TrainState, param_shardings: Any, mesh: Mesh) -> TrainState:
    """Shardings of a (possibly abstract) state: params and EMA leaves as `param_shardings`; an optimizer-state leaf
    shaped like the parameter at the end of its path (Adam's moments) as that parameter; the rest replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    flat_params = traverse_util.flatten_dict(abstract.params)

    def for_opt_leaf(path, leaf):
        keys = tuple(getattr(k, "key", None) for k in path)
        for start in range(len(keys)):
            tail = keys[start:]
            if tail in flat_params and tuple(flat_params[tail].shape) == tuple(leaf.shape):
                return _lookup(param_shardings, tail)
        return replicated

    ema = None if abstract.ema is None else select(param_shardings, list(traverse_util.flatten_dict(abstract.ema)))
    return TrainState(step=replicated, params=param_shardings,
                      opt_state=jax.tree_util.tree_map_with_path(for_opt_leaf, abstract.opt_state),
                      ema=ema, rng=replicated)
