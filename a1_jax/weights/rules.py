"""PyTorch state dict -> Flax params through one declarative rule table per model.

A `Rule` says: a PyTorch name matching `pattern` becomes the Flax leaf at `target` after `transform`. Scanned layers
name the regex group that indexes the stack (`stack="layer"`); those tensors are stacked on a leading axis in index
order. `plan_import` does all matching and checking on shapes alone (so the 5B geometry can be checked from a
meta-device model without memory) and fails with every missing, unexpected or mis-shaped name at once;
`apply_plan` then reads the tensors.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from flax import traverse_util
from flax.core import meta

from a1_jax.errors import UserError

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Transform:
    """An axis permutation, then an optional reshape of the permuted shape."""

    permutation: tuple[int, ...] | None = None
    reshape: Callable[[tuple[int, ...]], tuple[int, ...]] | None = None

    def shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.permutation is not None:
            if len(shape) != len(self.permutation):
                return shape + ("rank mismatch",)  # reported as a shape mismatch, never silently reshaped
            shape = tuple(shape[i] for i in self.permutation)
        return tuple(self.reshape(shape)) if self.reshape is not None else shape

    def __call__(self, array: np.ndarray) -> np.ndarray:
        if self.permutation is not None:
            array = np.transpose(array, self.permutation)
        return np.reshape(array, self.reshape(array.shape)) if self.reshape is not None else array


IDENTITY = Transform()
LINEAR = Transform((1, 0))  # torch Linear [out, in] -> Flax Dense kernel [in, out]
CONV2D = Transform((2, 3, 1, 0))  # [O, I, kh, kw] -> [kh, kw, I, O]
CONV3D = Transform((2, 3, 4, 1, 0))  # [O, I, kt, kh, kw] -> [kt, kh, kw, I, O]


@dataclasses.dataclass(frozen=True)
class Rule:
    pattern: str  # regex matched in full against the PyTorch name; named groups fill `{name}` in `target`
    target: str  # '/'-separated Flax path
    transform: Transform = IDENTITY
    stack: str | None = None  # group whose integer value is the index on a leading stacked (scan) axis


@dataclasses.dataclass
class ImportPlan:
    """Which PyTorch tensors (in stack order) and which transform make each Flax leaf."""

    sources: dict[Path, tuple[list[str], Transform, bool]]
    skipped: list[str]


def _shape_tree(target: Any) -> dict[Path, tuple[int, ...]]:
    flat = traverse_util.flatten_dict(meta.unbox(target))
    return {path: tuple(leaf.shape) for path, leaf in flat.items()}


def _listing(kind: str, items: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    more = f", ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"{len(items)} {kind} ({shown}{more})"


def plan_import(source_shapes: Mapping[str, Sequence[int]], rules: Sequence[Rule], target: Any, *,
                skip: Sequence[str] = (), what: str = "checkpoint") -> ImportPlan:
    """Matches every source name to a rule and every target leaf to sources; raises UserError on any mismatch.

    `source_shapes`: PyTorch name -> shape. `target`: a params pytree of arrays or ShapeDtypeStructs (e.g. from
    `jax.eval_shape`), boxed or not. `skip`: regexes of names deliberately not imported (never silent: the plan
    lists them).
    """
    compiled = [(re.compile(rule.pattern), rule) for rule in rules]
    skip_re = [re.compile(p) for p in skip]
    expected = _shape_tree(target)
    found: dict[Path, dict[int | None, tuple[str, tuple[int, ...]]]] = {}
    transforms: dict[Path, tuple[Transform, bool]] = {}
    unexpected, skipped, clashes = [], [], []
    for name, shape in source_shapes.items():
        if any(p.fullmatch(name) for p in skip_re):
            skipped.append(name)
            continue
        for regex, rule in compiled:
            match = regex.fullmatch(name)
            if match:
                break
        else:
            unexpected.append(name)
            continue
        path = tuple(rule.target.format(**match.groupdict()).split("/"))
        index = int(match.group(rule.stack)) if rule.stack else None
        slot = found.setdefault(path, {})
        if index in slot:
            clashes.append(f"{slot[index][0]} and {name}")
            continue
        slot[index] = (name, rule.transform.shape(tuple(shape)))
        transforms[path] = (rule.transform, rule.stack is not None)

    missing, misshaped = [], []
    for path, want in expected.items():
        key = "/".join(path)
        if path not in found:
            missing.append(key)
            continue
        slot = found[path]
        stacked = transforms[path][1]
        if stacked:
            layers = want[0] if want else 0
            absent = [i for i in range(layers) if i not in slot]
            extra = sorted(i for i in slot if i >= layers)
            if absent:
                missing.append(f"{key} layers {absent}")
            unexpected.extend(slot[i][0] for i in extra)
            want = want[1:]
        for name, got in slot.values():
            if got != tuple(want):
                misshaped.append(f"{name} -> {key}: got {got}, model expects {tuple(want)}")
    for path, slot in found.items():
        if path not in expected:
            unexpected.extend(name for name, _ in slot.values())

    problems = []
    if missing:
        problems.append(_listing("missing", missing))
    if unexpected:
        problems.append(_listing("unexpected", sorted(unexpected)))
    if misshaped:
        problems.append(_listing("mis-shaped", misshaped))
    if clashes:
        problems.append(_listing("mapped twice", clashes))
    if problems:
        raise UserError(f"{what} does not match the model: " + "; ".join(problems))

    sources = {}
    for path, slot in found.items():
        transform, stacked = transforms[path]
        names = [slot[i][0] for i in sorted(slot)] if stacked else [slot[None][0]]
        sources[path] = (names, transform, stacked)
    return ImportPlan(sources=sources, skipped=sorted(skipped))


def leaf_shape(plan: ImportPlan, shapes: Mapping[str, Sequence[int]], path: Path) -> tuple[int, ...]:
    """The shape of the Flax leaf `path`, from the source shapes (nothing is read)."""
    names, transform, stacked = plan.sources[path]
    return ((len(names),) if stacked else ()) + tuple(transform.shape(tuple(shapes[names[0]])))


def read_leaf(plan: ImportPlan, state: Mapping[str, Any], path: Path, dtype: Any = None) -> np.ndarray:
    """One planned Flax leaf, read from `state` into a new array of `dtype` (default: the checkpoint's).

    A stacked leaf is filled layer by layer, so reading it holds the leaf once, plus one layer's source tensor."""
    names, transform, stacked = plan.sources[path]
    first = transform(np.asarray(state[names[0]]))
    leaf = np.empty(((len(names),) if stacked else ()) + first.shape, first.dtype if dtype is None else dtype)
    if not stacked:
        leaf[...] = first
        return leaf
    del first  # a memory-mapped view: dropping it unmaps the file's pages
    for i, name in enumerate(names):
        leaf[i] = transform(np.asarray(state[name]))
    return leaf


def apply_plan(plan: ImportPlan, state: Mapping[str, Any], dtype: Any = None) -> dict:
    """Reads the planned tensors from `state` (NumPy arrays or anything `np.asarray` takes) into a nested dict.

    `dtype`: cast every leaf to it (default: keep the checkpoint's dtype).
    """
    return traverse_util.unflatten_dict({path: read_leaf(plan, state, path, dtype) for path in plan.sources})


def import_params(state: Mapping[str, Any], rules: Sequence[Rule], target: Any, *, skip: Sequence[str] = (),
                  what: str = "checkpoint", dtype: Any = None) -> dict:
    """`plan_import` on the shapes of `state`, then `apply_plan`."""
    shapes = {name: tuple(value.shape) for name, value in state.items()}
    return apply_plan(plan_import(shapes, rules, target, skip=skip, what=what), state, dtype=dtype)
