"""Mesh construction, logical axis rules, sharding helpers, multi-host start-up and per-host batches.

The splash-attention kernel lives in `a1_jax.parallel.splash` (used through `models.layers.attention`).
"""

from a1_jax.parallel.distributed import (agree, barrier, batch_ways, gather, global_batch,
                                         initialize_distributed)
from a1_jax.parallel.mesh import (MESH_AXES, MeshPreset, Rules, activate, device_grid, load_preset,
                                  logical_sharding, logical_specs, make_mesh, shard, shardings)
from a1_jax.parallel.plan import StepPlan, step_plan
