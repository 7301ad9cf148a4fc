"""Mesh presets, multi-host start-up, per-host batches and step plans, on 8 simulated CPU devices (and two real
processes)."""

import dataclasses
import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from a1_jax.errors import UserError
from a1_jax.parallel import device_grid, global_batch, initialize_distributed, load_preset, make_mesh, mesh
from a1_jax.parallel.plan import CollectiveCost, collective_costs, step_plan

REPO = pathlib.Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (REPO / "configs" / "mesh").glob("*.json"))


def test_every_mesh_preset_parses_and_tiles_the_devices():
    assert {"single", "fsdp", "fsdp_tensor", "data_fsdp"} <= set(PRESETS)
    for name in PRESETS:
        preset = load_preset(name)
        assert json.loads((REPO / "configs" / "mesh" / f"{name}.json").read_text())["description"]
        if -1 in preset.sizes.values():
            grid = make_mesh(preset)
            assert grid.size == 8 and grid.devices.flatten().tolist() == jax.devices(), name
        else:  # fixed sizes: exactly that many devices
            assert make_mesh(preset, jax.devices()[:1]).size == 1, name
            with pytest.raises(UserError):
                make_mesh(preset)
    assert dict(make_mesh(load_preset("data_fsdp")).shape) == {"data": 2, "fsdp": 4, "tensor": 1, "sequence": 1}


@pytest.mark.parametrize("preset_name, rows_per_device", [("data_fsdp", 1), ("fsdp_tensor", 2)])
def test_global_batch_data_equals_host_batch_and_shards_as_the_preset_says(preset_name, rows_per_device):
    preset = load_preset(preset_name)
    grid = make_mesh(preset)
    rng = np.random.default_rng(0)
    host = {"video": rng.standard_normal((8, 2, 3)).astype(np.float32),
            "cond": {"drop_face": rng.random(8) < 0.5, "index": np.arange(8, dtype=np.int32)}}
    batch = global_batch(host, grid, preset.rules)
    assert jax.tree_util.tree_structure(batch) == jax.tree_util.tree_structure(host)
    for got, want in zip(jax.tree_util.tree_leaves(batch), jax.tree_util.tree_leaves(host)):
        np.testing.assert_array_equal(np.asarray(got), want)
        assert got.dtype == want.dtype
        assert got.sharding.spec[0] == ("data", "fsdp") and all(s is None for s in got.sharding.spec[1:])
        for piece in got.addressable_shards:  # each device holds its rows of the host batch, nothing else
            assert piece.data.shape[0] == rows_per_device
            np.testing.assert_array_equal(np.asarray(piece.data), want[piece.index])
    with pytest.raises(UserError, match=f"multiple of {8 // rows_per_device}"):
        global_batch({"video": host["video"][:6]}, grid, preset.rules)


@pytest.fixture
def fake_jax_distributed(monkeypatch):
    """Records `jax.distributed.initialize` calls instead of starting a coordinator."""
    calls = []
    state = {"initialized": False}

    def initialize(**kw):
        calls.append(kw)
        state["initialized"] = True

    monkeypatch.setattr(jax.distributed, "initialize", initialize)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: state["initialized"])
    return calls


def test_initialize_distributed_only_when_asked(fake_jax_distributed):
    calls = fake_jax_distributed
    assert not initialize_distributed(environ={})
    assert not initialize_distributed(environ={"A1_JAX_NUM_PROCESSES": "1"})
    assert calls == []
    env = {"A1_JAX_COORDINATOR": "10.0.0.2:8476", "A1_JAX_NUM_PROCESSES": "4", "A1_JAX_PROCESS_ID": "3"}
    assert initialize_distributed(process_id=2, environ=env)  # an argument wins over the environment
    assert calls == [{"coordinator_address": "10.0.0.2:8476", "num_processes": 4, "process_id": 2}]
    assert initialize_distributed(environ=env)  # idempotent: already initialised, no second call
    assert len(calls) == 1


def test_initialize_distributed_auto_lets_jax_detect_the_cluster(fake_jax_distributed):
    assert initialize_distributed(environ={"A1_JAX_DISTRIBUTED": "auto", "A1_JAX_PROCESS_ID": "1"})
    assert fake_jax_distributed == [{"coordinator_address": None, "num_processes": None, "process_id": 1}]


@pytest.mark.parametrize("env, message", [
    ({"A1_JAX_COORDINATOR": "h:1"}, r"missing \['num_processes', 'process_id'\]"),
    ({"A1_JAX_COORDINATOR": "h:1", "A1_JAX_NUM_PROCESSES": "two", "A1_JAX_PROCESS_ID": "0"}, "must be an integer"),
    ({"A1_JAX_COORDINATOR": "h:1", "A1_JAX_NUM_PROCESSES": "2", "A1_JAX_PROCESS_ID": "2"}, r"below the process count \(2\)"),
    ({"A1_JAX_DISTRIBUTED": "yes"}, "'auto' or unset"),
])
def test_initialize_distributed_bad_settings_are_user_errors(fake_jax_distributed, env, message):
    with pytest.raises(UserError, match=message):
        initialize_distributed(environ=env)
    assert fake_jax_distributed == []


WORKER = """
import json
import jax, numpy as np
from a1_jax.parallel import global_batch, initialize_distributed, load_preset, make_mesh
from jax.sharding import NamedSharding, PartitionSpec
assert initialize_distributed() and initialize_distributed()
preset = load_preset("data_fsdp")
grid = make_mesh(preset)
host = {"x": np.arange(12, dtype=np.float32).reshape(4, 3) + 100 * jax.process_index()}
batch = global_batch(host, grid, preset.rules)
total = jax.jit(lambda b: b["x"].sum(axis=0), out_shardings=NamedSharding(grid, PartitionSpec()))(batch)
mine = sorted(batch["x"].addressable_shards, key=lambda s: s.index[0].start)
print(json.dumps({"count": jax.process_count(), "devices": jax.device_count(), "shape": batch["x"].shape,
                  "total": np.asarray(total).tolist(), "mine": np.concatenate([s.data for s in mine]).tolist()}))
"""


def test_two_processes_assemble_one_global_data_batch(tmp_path):
    """Two CPU processes of 4 devices each join through A1_JAX_* and build one 8-row batch from their 4-row shares."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("A1_JAX_")}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
               A1_JAX_COORDINATOR=f"127.0.0.1:{port}", A1_JAX_NUM_PROCESSES="2")
    workers = [subprocess.Popen([sys.executable, str(script)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env={**env, "A1_JAX_PROCESS_ID": str(i)}) for i in range(2)]
    outputs = [w.communicate(timeout=180) for w in workers]
    assert all(w.returncode == 0 for w in workers), [err[-2000:] for _, err in outputs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    hosts = [np.arange(12, dtype=np.float32).reshape(4, 3) + 100 * i for i in range(2)]
    for i, result in enumerate(results):
        assert (result["count"], result["devices"], result["shape"]) == (2, 8, [8, 3])
        np.testing.assert_array_equal(result["total"], hosts[0].sum(0) + hosts[1].sum(0))
        np.testing.assert_array_equal(result["mine"], hosts[i])  # each host's devices hold its own rows


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    id: int
    slice_index: int
    platform: str = "cpu"
    device_kind: str = "fake"


def test_device_grid_puts_the_data_axis_across_slices():
    """Two slices of 4 devices (listed interleaved): each slice is one contiguous part of the data axis."""
    devices = [FakeDevice(i, slice_index=i % 2) for i in range(8)]
    for data in (2, 4):
        grid = device_grid(mesh.mesh_shape({"data": data, "fsdp": -1, "tensor": 1, "sequence": 1}, 8), devices)
        slices = np.vectorize(lambda d: d.slice_index)(grid)
        assert grid.shape == (data, 8 // data, 1, 1)
        assert (slices == (np.arange(data) // (data // 2))[:, None, None, None]).all(), slices
    with pytest.raises(UserError, match="multiple of 2"):
        device_grid((1, 8, 1, 1), devices)
    single_slice = [FakeDevice(i, slice_index=0) for i in range(8)]
    assert [d.id for d in device_grid((2, 4, 1, 1), single_slice).flatten()] == list(range(8))


def test_step_plan_of_a_sharded_matmul():
    """x[16,64] split on its contraction axis, w[64,32] on its rows, over fsdp=8: each device multiplies its slices
    (x 512 B + w 1024 B in) and one all-reduce of the [16,32] fp32 partial sums (2048 B) gives the replicated
    product. Donating w to `w + 1` aliases its 1024 B."""
    grid = make_mesh(load_preset("fsdp"))
    split = lambda *spec: NamedSharding(grid, PartitionSpec(*spec))
    x = jax.ShapeDtypeStruct((16, 64), np.float32, sharding=split(None, "fsdp"))
    w = jax.ShapeDtypeStruct((64, 32), np.float32, sharding=split("fsdp", None))
    plan = step_plan(jax.jit(jnp.matmul, out_shardings=split()), x, w)
    assert (plan.argument_bytes, plan.output_bytes, plan.alias_bytes) == (512 + 1024, 2048, 0)
    assert plan.collectives == {"all-reduce": CollectiveCost(count=1, operand_bytes=2048)}
    assert plan.communicated_bytes == 2048 and plan.unknown_trip_counts == 0
    assert plan.peak_bytes == plan.argument_bytes + plan.output_bytes + plan.temp_bytes
    donated = step_plan(jax.jit(lambda x, w: (x @ w, w + 1), out_shardings=(split(), split("fsdp", None)),
                                donate_argnums=1), x, w)
    assert donated.alias_bytes == 1024 and donated.collectives == plan.collectives


def test_step_plan_counts_collectives_once_per_loop_trip():
    """Three scanned FSDP layers: each trip all-gathers its [8,64] fp32 weight shard (2048 B), then one scalar
    all-reduce; a data-dependent while loop's collective is counted once and flagged."""
    grid = make_mesh(load_preset("fsdp"))
    split = lambda *spec: NamedSharding(grid, PartitionSpec(*spec))

    def layers(weights, h):
        def layer(h, shard):
            return jnp.tanh(h @ jax.lax.all_gather(shard, "fsdp", tiled=True)), None

        return jax.lax.psum(jnp.sum(jax.lax.scan(layer, h, weights)[0]), "fsdp")

    weights = jax.ShapeDtypeStruct((3, 64, 64), np.float32, sharding=split(None, "fsdp", None))
    h = jax.ShapeDtypeStruct((16, 64), np.float32, sharding=split("fsdp", None))
    step = jax.jit(jax.shard_map(layers, mesh=grid, in_specs=(PartitionSpec(None, "fsdp", None),
                                                               PartitionSpec("fsdp", None)), out_specs=PartitionSpec()))
    plan = step_plan(step, weights, h)
    assert plan.argument_bytes == 3 * 8 * 64 * 4 + 2 * 64 * 4
    assert plan.collectives == {"all-gather": CollectiveCost(count=3, operand_bytes=3 * 2048),
                                "all-reduce": CollectiveCost(count=1, operand_bytes=4)}
    assert plan.unknown_trip_counts == 0

    def until_large(h):
        step = lambda c: (c[0] + 1, c[1] + jax.lax.psum(jnp.sum(c[0]), "fsdp"))
        return jax.lax.while_loop(lambda c: c[1] < 100.0, step, (h, 0.0))[1]

    dynamic = step_plan(jax.jit(jax.shard_map(until_large, mesh=grid, in_specs=PartitionSpec("fsdp", None),
                                              out_specs=PartitionSpec())), h)
    assert dynamic.collectives == {"all-reduce": CollectiveCost(count=1, operand_bytes=4)}
    assert dynamic.unknown_trip_counts == 1


TPU_STYLE_HLO = """HloModule jit_step, num_partitions=8

%all-reduce-scatter.1.clone (input: f32[64,16]) -> f32[16,16] {
  %input = f32[64,16]{1,0:T(8,128)} parameter(0)
  %all-reduce.3 = f32[64,16]{1,0:T(8,128)} all-reduce(%input), channel_id=7, replica_groups={{0,1,2,3}}, to_apply=%add
  %offset = u32[] constant(0)
  ROOT %dynamic-slice.1 = f32[16,16]{1,0} dynamic-slice(%all-reduce.3, %offset, %offset), dynamic_slice_sizes={16,16}
}

%body (param: (s32[], bf16[8,128], f32[64,16])) -> (s32[], bf16[8,128], f32[64,16]) {
  %param = (s32[], bf16[8,128]{1,0:T(8,128)(2,1)}, f32[64,16]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%param), index=0
  %w = bf16[8,128]{1,0:T(8,128)(2,1)} get-tuple-element(%param), index=1
  %g = f32[64,16]{1,0} get-tuple-element(%param), index=2
  %all-gather-start.2 = (bf16[8,128], bf16[32,128]) all-gather-start(%w), replica_groups=[2,4]<=[8], dimensions={0}
  %all-gather-done.2 = bf16[32,128]{1,0} all-gather-done(%all-gather-start.2)
  %fusion.9 = f32[16,16]{1,0} fusion(%g), kind=kCustom, calls=%all-reduce-scatter.1.clone, backend_config={}
  ROOT %tuple = (s32[], bf16[8,128]{1,0}, f32[64,16]{1,0}) tuple(%i, %w, %g)
}

%condition (param.1: (s32[], bf16[8,128], f32[64,16])) -> pred[] {
  %param.1 = (s32[], bf16[8,128]{1,0}, f32[64,16]{1,0}) parameter(0)
  %counter = s32[]{:T(128)} get-tuple-element(%param.1), index=0
  %trips = s32[]{:T(128)} constant(5)
  ROOT %lt = pred[]{:T(512)} compare(%counter, %trips), direction=LT
}

ENTRY %main (p0: bf16[8,128], p1: f32[64,16]) -> f32[] {
  %p0 = bf16[8,128]{1,0} parameter(0)
  %p1 = f32[64,16]{1,0} parameter(1)
  %zero = s32[] constant(0)
  %init = (s32[], bf16[8,128]{1,0}, f32[64,16]{1,0}) tuple(%zero, %p0, %p1)
  %while.1 = (s32[], bf16[8,128]{1,0}, f32[64,16]{1,0}) while(%init), condition=%condition, body=%body
  %scalar = f32[] constant(1)
  ROOT %all-reduce.9 = f32[] all-reduce(%scalar), replica_groups={}, to_apply=%add
}
"""


def test_collective_costs_read_tpu_style_loops_and_reduce_scatters():
    """No `known_trip_count` (the TPU compiler leaves it out): the trips come from `counter < 5`; async all-gathers
    count at their start, with the shard as operand; an `all-reduce-scatter` fusion is a reduce-scatter."""
    costs, unknown = collective_costs(TPU_STYLE_HLO)
    assert costs == {"all-gather": CollectiveCost(count=5, operand_bytes=5 * 8 * 128 * 2),
                     "reduce-scatter": CollectiveCost(count=5, operand_bytes=5 * 64 * 16 * 4),
                     "all-reduce": CollectiveCost(count=1, operand_bytes=4)}
    assert unknown == 0
    no_bound = TPU_STYLE_HLO.replace("direction=LT", "direction=NE")
    assert collective_costs(no_bound) == ({"all-gather": CollectiveCost(1, 8 * 128 * 2),
                                           "reduce-scatter": CollectiveCost(1, 64 * 16 * 4),
                                           "all-reduce": CollectiveCost(1, 4)}, 1)
