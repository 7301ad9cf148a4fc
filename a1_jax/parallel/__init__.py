"""Mesh construction, logical axis rules and sharding helpers."""

from a1_jax.parallel.mesh import (MESH_AXES, MeshPreset, activate, load_preset, logical_sharding, logical_specs,
                                  make_mesh, shard, shardings)
