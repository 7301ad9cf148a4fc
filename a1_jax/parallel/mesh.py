"""Meshes from presets, logical-axis rules, and sharding helpers.

A preset (`configs/mesh/*.json`) names the size of each mesh axis (`data`, `fsdp`, `tensor`, `sequence`; one may be
-1 = the devices left over) and lists `[logical name, mesh axis or axes]` rules in priority order. Flax assigns the
first rule whose mesh axes are still free in that array, so one logical name may have fallbacks and `batch` and
`embed` can share `fsdp` (activations shard on batch, parameters on embed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import pathlib
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from a1_jax.config import read_json
from a1_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor", "sequence")
PRESETS = pathlib.Path(__file__).resolve().parents[2] / "configs" / "mesh"

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]


@dataclasses.dataclass(frozen=True)
class MeshPreset:
    """Axis sizes (`-1` = the rest) and logical-axis rules, as read from a preset JSON."""

    sizes: dict[str, int]
    rules: Rules


def load_preset(name_or_path: str | os.PathLike) -> MeshPreset:
    """Reads a preset by name (`single`, `fsdp`, `fsdp_tensor`, `data_fsdp`, ... in `configs/mesh/`) or by path."""
    path = pathlib.Path(name_or_path)
    if not path.suffix and not path.exists():
        path = PRESETS / f"{path}.json"
        if not path.is_file():
            known = sorted(p.stem for p in PRESETS.glob("*.json"))
            raise UserError(f"unknown mesh preset {name_or_path!r}; known presets: {', '.join(known)}")
    data = read_json(path)
    sizes = data.get("mesh", {})
    if set(sizes) != set(MESH_AXES) or not all(isinstance(v, int) and (v > 0 or v == -1) for v in sizes.values()):
        raise UserError(f"{path}: 'mesh' must give a positive size (or -1) for each of {MESH_AXES}; got {sizes}")
    rules = []
    for rule in data.get("rules", []):
        if not (isinstance(rule, list) and len(rule) == 2 and isinstance(rule[0], str)):
            raise UserError(f"{path}: each rule must be [logical name, mesh axis or list of axes]; got {rule}")
        target = tuple(rule[1]) if isinstance(rule[1], list) else rule[1]
        unknown = {target} - {None, *MESH_AXES} if not isinstance(target, tuple) else set(target) - set(MESH_AXES)
        if unknown:
            raise UserError(f"{path}: rule {rule} names unknown mesh axes {sorted(unknown)}; use {MESH_AXES}")
        rules.append((rule[0], target))
    return MeshPreset(sizes={axis: sizes[axis] for axis in MESH_AXES}, rules=tuple(rules))


def mesh_shape(sizes: dict[str, int], device_count: int) -> tuple[int, ...]:
    """Axis sizes in `MESH_AXES` order with the one `-1` resolved; UserError if they cannot tile the devices."""
    fixed = math.prod(v for v in sizes.values() if v != -1)
    free = [axis for axis, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise UserError(f"at most one mesh axis may be -1; got {free}")
    if device_count % fixed:
        raise UserError(f"mesh {sizes} does not divide {device_count} devices")
    resolved = {**sizes, **{axis: device_count // fixed for axis in free}}
    if math.prod(resolved.values()) != device_count:
        raise UserError(f"mesh {resolved} uses {math.prod(resolved.values())} devices, but {device_count} are present")
    return tuple(resolved[axis] for axis in MESH_AXES)


def device_grid(shape: tuple[int, ...], devices: Sequence[Any]) -> np.ndarray:
    """`devices` laid out as a mesh of `shape` (in `MESH_AXES` order).

    Devices of several slices (multi-slice TPU pods, joined by the slower data-center network): the `data` axis spans
    the slices, so only the data-parallel gradient reduction crosses between them, and each slice holds the rest of
    the mesh. Within one slice, JAX's topology-aware order (neighbouring mesh positions are neighbouring chips on
    TPU); elsewhere the devices in order.
    """
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices > 1:
        if shape[0] % slices:
            raise UserError(f"the devices span {slices} slices, so the mesh's data axis ({shape[0]}) must be a "
                            f"multiple of {slices}: set 'data' in the mesh preset (see configs/mesh/data_fsdp.json)")
        return mesh_utils.create_hybrid_device_mesh((shape[0] // slices, *shape[1:]), (slices,) + (1,) * (
            len(shape) - 1), devices)
    return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)


def make_mesh(preset: MeshPreset, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `Mesh` with axes `MESH_AXES` over `devices` (default: all, of every host), laid out by `device_grid`."""
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(device_grid(mesh_shape(preset.sizes, len(devices)), devices), MESH_AXES)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Makes `mesh` and `rules` current, so `nn.with_logical_constraint` inside the models shards activations."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def logical_specs(boxed_tree: Any) -> Any:
    """PartitionSpecs of logical names for every leaf of a boxed tree (e.g. `jax.eval_shape(model.init, ...)`).

    A leaf that carries no logical names is an error: every parameter must say how it may be sharded.
    """
    unannotated = [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_leaves_with_path(
        boxed_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned)) if not isinstance(leaf, nn.Partitioned)]
    if unannotated:
        raise ValueError(f"parameters without logical axis names: {unannotated}")
    return nn.get_partition_spec(boxed_tree)


def as_tuple(mesh_axes: str | Sequence[str] | None) -> tuple[str, ...]:
    """A PartitionSpec entry (None, one mesh axis or several) as a tuple of mesh axes."""
    return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())


def dividing_axes(size: int, mesh_axes: str | Sequence[str] | None, sizes: dict[str, int]) -> tuple[str, ...]:
    """The mesh axes (in order) that still divide `size` once the earlier ones have split it: an uneven split is not
    allowed, and an axis of size 1 splits nothing."""
    kept, ways = [], 1
    for axis in as_tuple(mesh_axes):
        if sizes[axis] > 1 and size % (ways * sizes[axis]) == 0:
            kept.append(axis)
            ways *= sizes[axis]
    return tuple(kept)


def _divisible(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """`spec` keeping, for each dimension, only the mesh axes that divide it (e.g. the 3 output channels of the
    VAE's last conv stay unsharded on 4 fsdp devices): such a parameter is small."""
    entries = tuple(spec) + (None,) * (len(shape) - len(spec))
    return PartitionSpec(*(dividing_axes(size, axes, dict(mesh.shape)) or None for size, axes in zip(shape, entries)))


def shardings(boxed_tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """`NamedSharding`s on `mesh` for every leaf of a boxed tree, through the logical-axis `rules`; a dimension the
    assigned mesh axes do not divide stays unsharded."""
    named = nn.logical_to_mesh_sharding(logical_specs(boxed_tree), mesh, rules)
    leaves = jax.tree_util.tree_map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, boxed_tree,
                                    is_leaf=lambda x: isinstance(x, nn.Partitioned))
    return jax.tree_util.tree_map(lambda sharding, leaf: NamedSharding(mesh, _divisible(sharding.spec, leaf.shape, mesh)),
                                  named, leaves)


def logical_sharding(logical_axes: Sequence[str | None], mesh: Mesh, rules: Rules) -> NamedSharding:
    """The sharding of one array (e.g. an input batch) from its logical axis names."""
    return NamedSharding(mesh, PartitionSpec(*nn.logical_to_mesh_axes(tuple(logical_axes), rules)))


def shard(tree: Any, tree_shardings: Any) -> Any:
    """Places every leaf of `tree` (host arrays or single-device arrays) with its sharding."""
    return jax.tree_util.tree_map(jax.device_put, tree, tree_shardings)
