"""The rule-table importer and the NumPy safetensors reader, on small hand-made checkpoints; our checkpoint's pieces,
a convert killed with kill -9 and rerun, and loads refused before reading when the parameters cannot fit."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from a1_jax.cli import main
from a1_jax.errors import UserError
from a1_jax.parity import pipeline as reference
from a1_jax.weights import CONV3D, LINEAR, Rule, checkpoint, import_params, open_checkpoint, plan_import
from a1_jax.weights.rules import read_leaf

REPO = pathlib.Path(__file__).resolve().parents[1]

RULES = [
    Rule(r"proj\.weight", "proj/kernel", LINEAR),
    Rule(r"proj\.bias", "proj/bias"),
    Rule(r"blocks\.(?P<layer>\d+)\.fc\.weight", "blocks/fc/kernel", LINEAR, stack="layer"),
    Rule(r"conv\.weight", "conv/kernel", CONV3D),
]
TARGET = {
    "proj": {"kernel": jax.ShapeDtypeStruct((4, 3), jnp.float32), "bias": jax.ShapeDtypeStruct((3,), jnp.float32)},
    "blocks": {"fc": {"kernel": jax.ShapeDtypeStruct((2, 5, 6), jnp.float32)}},
    "conv": {"kernel": jax.ShapeDtypeStruct((3, 3, 3, 2, 8), jnp.float32)},
}


def _state(rng):
    return {
        "proj.weight": rng.standard_normal((3, 4)).astype(np.float32),
        "proj.bias": rng.standard_normal(3).astype(np.float32),
        "blocks.1.fc.weight": rng.standard_normal((6, 5)).astype(np.float32),
        "blocks.0.fc.weight": rng.standard_normal((6, 5)).astype(np.float32),
        "conv.weight": rng.standard_normal((8, 2, 3, 3, 3)).astype(np.float32),
    }


def test_import_transposes_and_stacks_in_index_order():
    state = _state(np.random.default_rng(0))
    params = import_params(state, RULES, TARGET)
    np.testing.assert_array_equal(params["proj"]["kernel"], state["proj.weight"].T)
    np.testing.assert_array_equal(params["blocks"]["fc"]["kernel"][0], state["blocks.0.fc.weight"].T)
    np.testing.assert_array_equal(params["blocks"]["fc"]["kernel"][1], state["blocks.1.fc.weight"].T)
    np.testing.assert_array_equal(params["conv"]["kernel"], state["conv.weight"].transpose(2, 3, 4, 1, 0))


@pytest.mark.parametrize("edit, words", [
    (lambda s: s.pop("proj.bias"), ["1 missing", "proj/bias"]),
    (lambda s: s.pop("blocks.1.fc.weight"), ["blocks/fc/kernel layers [1]"]),
    (lambda s: s.update({"extra.weight": np.zeros(2)}), ["1 unexpected", "extra.weight"]),
    (lambda s: s.update({"blocks.2.fc.weight": np.zeros((6, 5))}), ["unexpected", "blocks.2.fc.weight"]),
    (lambda s: s.update({"proj.weight": np.zeros((3, 5))}), ["mis-shaped", "proj.weight", "(5, 3)", "(4, 3)"]),
])
def test_every_mismatch_is_a_user_error_naming_the_tensor(edit, words):
    state = _state(np.random.default_rng(0))
    edit(state)
    with pytest.raises(UserError) as info:
        import_params(state, RULES, TARGET)
    for word in words:
        assert word in str(info.value)


def test_skip_list_is_explicit_and_reported():
    state = _state(np.random.default_rng(0)) | {"head.weight": np.zeros(1)}
    plan = plan_import({k: v.shape for k, v in state.items()}, RULES, TARGET, skip=[r"head\..*"])
    assert plan.skipped == ["head.weight"]


def test_safetensors_single_sharded_and_bf16(tmp_path):
    rng = np.random.default_rng(1)
    state = _state(rng)
    bf16 = rng.standard_normal((2, 3)).astype(ml_dtypes.bfloat16)
    # Two shards plus an index, the layout diffusers' save_pretrained writes for large models.
    names = sorted(state)
    shards = {"m-00001-of-00002.safetensors": names[:2], "m-00002-of-00002.safetensors": names[2:]}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(tmp_path / file))
    index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps(index))
    checkpoint = open_checkpoint(tmp_path)
    assert sorted(checkpoint) == names
    params = import_params(checkpoint, RULES, TARGET)
    np.testing.assert_array_equal(params["proj"]["bias"], state["proj.bias"])

    # bf16 is written by hand: NumPy's safetensors writer has no bf16.
    raw = bf16.tobytes()
    header = json.dumps({"x": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, len(raw)]}}).encode()
    single = tmp_path / "single" / "w.safetensors"
    single.parent.mkdir()
    single.write_bytes(len(header).to_bytes(8, "little") + header + raw)
    loaded = open_checkpoint(single.parent)["x"]
    assert loaded.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(loaded, bf16)


def test_checkpoint_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        open_checkpoint(tmp_path / "nope")
    with pytest.raises(UserError, match="expected one"):
        open_checkpoint(tmp_path)
    (tmp_path / "bad.safetensors").write_bytes(b"\x05")
    with pytest.raises(UserError, match="not a readable safetensors"):
        open_checkpoint(tmp_path)


def test_read_leaf_fills_a_stacked_leaf_layer_by_layer_in_the_asked_dtype():
    state = _state(np.random.default_rng(2))
    plan = plan_import({k: v.shape for k, v in state.items()}, RULES, TARGET)
    leaf = read_leaf(plan, state, ("blocks", "fc", "kernel"), ml_dtypes.bfloat16)
    expected = np.stack([state["blocks.0.fc.weight"].T, state["blocks.1.fc.weight"].T]).astype(ml_dtypes.bfloat16)
    assert leaf.dtype == ml_dtypes.bfloat16 and leaf.flags.c_contiguous
    np.testing.assert_array_equal(leaf, expected)


def test_pieces_pack_each_network_largest_first_within_the_size():
    mb = 2 ** 20
    sizes = {("transformer", "a"): 700 * mb, ("transformer", "b"): 300 * mb, ("transformer", "c"): 200 * mb,
             ("transformer", "d"): 100 * mb, ("vae", "x"): 1, ("siglip", "y"): 2}
    pieces = checkpoint.plan_pieces(sizes, piece_bytes=512 * mb)
    assert pieces == {"transformer-00": [("transformer", "a")],  # bigger than a piece: alone
                      "transformer-01": [("transformer", "b"), ("transformer", "c")],
                      "transformer-02": [("transformer", "d")],
                      "vae-00": [("vae", "x")], "siglip-00": [("siglip", "y")]}
    assert checkpoint.plan_pieces(dict(reversed(sizes.items())), piece_bytes=512 * mb) == pieces


# --------------------------------------------------------------------------------- convert: streamed, resumable
@pytest.fixture(scope="module")
def release(tmp_path_factory):
    folder = tmp_path_factory.mktemp("release")
    reference.write_release(folder)
    return folder


@pytest.fixture(scope="module")
def release_params(release):
    networks = checkpoint.build_networks(checkpoint.ModelConfigs.from_folder(release))
    return networks, checkpoint.load_params(release, networks)


def _assert_same_params(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def resumed(release, tmp_path_factory):
    """A convert killed with kill -9 after its first piece, plus the temporary folder a kill inside Orbax's write
    leaves, then the same command again: `(output, what the kill left, the rerun's exit code)`."""
    out = tmp_path_factory.mktemp("resumed") / "a1"
    script = ("import os, signal\n"
              "from a1_jax.weights import checkpoint\n"
              "checkpoint.convert(os.environ['SOURCE'], os.environ['OUT'],\n"
              "                   lambda done, total: os.kill(os.getpid(), signal.SIGKILL))\n")
    env = {**os.environ, "SOURCE": str(release), "OUT": str(out), "PYTHONPATH": str(REPO)}
    killed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    left = {"pieces": sorted(p.name for p in (out / checkpoint.PARAMS).iterdir()),
            "converted": checkpoint.is_converted(out), "record": (out / checkpoint.CONVERTING).is_file()}
    half = out / checkpoint.PARAMS / "vae-00.orbax-checkpoint-tmp-1234567"  # what a kill inside Orbax leaves
    half.mkdir()
    (half / "d").write_bytes(b"partial")
    return out, left, main(["convert", "--from", str(release), "--to", str(out)])


def test_convert_killed_early_then_rerun_completes(release, release_params, resumed):
    """The same command resumes (the finished piece is kept, the half-written one discarded), and the checkpoint
    holds exactly the release's parameters."""
    out, left, code = resumed
    assert len(left["pieces"]) == 1 and not left["converted"] and left["record"]
    assert code == 0 and checkpoint.is_converted(out) and not (out / checkpoint.CONVERTING).exists()
    assert sorted(p.name for p in (out / checkpoint.PARAMS).iterdir()) == sorted(
        ["transformer-00", "vae-00", "pose_guider-00", "siglip-00"])
    networks, expected = release_params
    _assert_same_params(checkpoint.load_params(out, networks), expected)

    # A finished convert of the same release: rerunning it is a no-op, not a refusal.
    summary = checkpoint.convert(release, out)
    assert summary["resumed"] and summary["written_pieces"] == 0


def test_convert_refuses_an_unfinished_convert_of_another_release(release, tmp_path):
    out = tmp_path / "a1"
    out.mkdir()
    (out / checkpoint.CONVERTING).write_text(json.dumps({"source": "/elsewhere/release"}))
    with pytest.raises(UserError, match="unfinished convert of /elsewhere/release"):
        checkpoint.convert(release, out)


def test_an_older_checkpoint_format_is_explained(release_params, resumed, tmp_path):
    out = tmp_path / "a1"
    shutil.copytree(resumed[0], out)
    marker = json.loads((out / checkpoint.MARKER).read_text())
    (out / checkpoint.MARKER).write_text(json.dumps({**marker, "version": 1}))
    with pytest.raises(UserError, match="checkpoint format 1.*convert the release folder again"):
        checkpoint.load_params(out, release_params[0])


# -------------------------------------------------------------------------------------- refused before reading
def test_weights_that_cannot_fit_are_refused_in_one_line_before_reading(release, monkeypatch):
    configs = checkpoint.ModelConfigs.from_folder(release)
    fp32 = checkpoint.build_networks(configs, jnp.float32)
    need = sum(checkpoint.bytes_per_device(fp32, None).values())
    monkeypatch.setattr(checkpoint, "available_host_bytes", lambda: need - 1)
    monkeypatch.setattr(checkpoint, "read_leaf", lambda *a, **k: pytest.fail("read weights it cannot hold"))
    with pytest.raises(UserError) as info:
        checkpoint.load_params(release, fp32)
    message = str(info.value)
    assert "\n" not in message and "float32" in message and "--dtype bfloat16" in message
    # In bfloat16 the same host fits them (SigLIP stays float32, so a little over half).
    bf16 = checkpoint.build_networks(configs, jnp.bfloat16)
    assert sum(checkpoint.bytes_per_device(bf16, None).values()) < need


# ------------------------------------------------------------------------------ the release-folder writer (tools/)
def test_the_release_folder_writer_makes_a_folder_that_loads(tmp_path):
    """tools/write_release_folder.py (run at 5B for BUILD_NOTES' release-scale figures) at the tiny sizes, its
    transformer split into shards with an index: every network loads from it, SigLIP's text tower and the pose
    guider's decoder skipped, in the dtypes the release stores."""
    sys.path.insert(0, str(REPO / "tools"))
    import write_release_folder
    from flax.core import meta

    out = tmp_path / "release"
    summary = write_release_folder.main(["--out", str(out), "--config", "tiny", "--shard-bytes", "200000"])
    index = json.loads((out / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = {p.name for p in (out / "transformer").glob("*.safetensors")}
    assert len(shards) > 1 and set(index["weight_map"].values()) == shards
    assert summary["tensors"]["transformer"] == len(index["weight_map"])
    assert (out / "model_index.json").is_file() and (out / "text_encoder" / "config.json").is_file()

    networks = checkpoint.build_networks(checkpoint.ModelConfigs.from_folder(out), jnp.bfloat16)
    params = checkpoint.load_params(out, networks)
    expected = meta.unbox(checkpoint.abstract_params(networks))
    for leaf, want in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(expected), strict=True):
        assert leaf.shape == want.shape and leaf.dtype == want.dtype
        assert np.isfinite(np.asarray(leaf, np.float32)).all()
    assert params["siglip"]["patch_embedding"]["kernel"].dtype == jnp.float32
    assert params["transformer"]["blocks"]["attn"]["to_q"]["kernel"].dtype == jnp.bfloat16


def test_random_init_draws_each_parameter_as_its_module_would_seeded_by_path():
    """`init_params` fills the networks on the host with NumPy (no compiled init): the modules' tree, shapes and
    dtypes; zeros, ones and the DiT's sin-cos position start exactly as the modules make them; random leaves with
    the modules' standard deviations (checked against flax's own init of SigLIP); the same seed, the same values."""
    import dataclasses

    from flax.core import meta

    from a1_jax.models import dit
    from a1_jax.parity.pipeline import SMALL_DIT
    from a1_jax.weights import checkpoint

    tiny = checkpoint.ModelConfigs.from_folder(checkpoint.model_config_folder("tiny"))
    configs = dataclasses.replace(tiny, transformer=SMALL_DIT)  # learned positions, as the 5B
    networks = checkpoint.build_networks(configs)
    params, again, other = (checkpoint.init_params(networks, seed) for seed in (0, 0, 1))
    abstract = meta.unbox(checkpoint.abstract_params(networks))
    assert jax.tree.structure(params) == jax.tree.structure(abstract)
    for value, shape in zip(jax.tree.leaves(params), jax.tree.leaves(abstract)):
        assert value.shape == shape.shape and value.dtype == shape.dtype
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)))
    kernels = [(a, b) for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(other))
               if "kernel" in jax.tree_util.keystr(path)]
    assert kernels and not any(np.array_equal(a, b) for a, b in kernels)
    table = params["transformer"]["patch_embed"]["pos_embedding"]
    np.testing.assert_array_equal(table, dit.learned_position_start(SMALL_DIT, table.shape[-1]).astype(np.float32))

    siglip = networks.siglip
    pixels = jnp.zeros((1, siglip.config.image_size, siglip.config.image_size, 3))
    flax_init = jax.jit(lambda key: meta.unbox(siglip.init(key, pixels))["params"])(jax.random.key(0))
    for (path, theirs), ours in zip(jax.tree_util.tree_flatten_with_path(flax_init)[0],
                                    jax.tree.leaves(params["siglip"])):
        theirs, ours = np.asarray(theirs), np.asarray(ours)
        if np.ptp(theirs) == 0:  # zeros, ones
            np.testing.assert_array_equal(ours, theirs, err_msg=jax.tree_util.keystr(path))
        else:
            assert abs(ours.std() / theirs.std() - 1) < 0.1, (jax.tree_util.keystr(path), ours.std(), theirs.std())
            assert abs(ours.mean()) < 0.2 * ours.std()
