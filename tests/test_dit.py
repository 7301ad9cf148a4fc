"""The DiT against diffusers' CogVideoX transformer (fp32, CPU): tiny geometries, one full-width block, the 5B
importer on shapes alone, scan/remat layouts, the FLOP count, errors and the CLI."""

import argparse
import json
import pathlib
import subprocess
import sys

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax.core import meta
from safetensors.numpy import save_file

from a1_jax.config import DiTConfig, from_mapping
from a1_jax.errors import UserError
from a1_jax.models import dit, layers
from a1_jax.parity import FP32_TOLERANCE, fp32_reference, perturb_plain_tensors, to_numpy
from a1_jax.parity import dit as dit_parity
from a1_jax.weights import import_params, open_checkpoint, plan_import
from a1_jax.weights.dit import DIT_RULES, import_dit

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "dit_tiny.json"
FIVE_B = REPO / "configs" / "dit_5b.json"


def tiny(**overrides) -> DiTConfig:
    with open(TINY) as f:
        return from_mapping(DiTConfig, {**json.load(f), **overrides}, "tiny test config")


PARITY_CASES = {
    "learned+rope": (dict(), {}),
    "rope only": (dict(use_learned_positional_embeddings=False), {}),
    "sincos, no rope": (dict(use_learned_positional_embeddings=False, use_rotary_positional_embeddings=False), {}),
    # 5 latent frames != the table's 3: diffusers swaps the learned table for a computed sin-cos one.
    "learned, 5 frames": (dict(), dict(frames=5)),
    "rope, 1 frame, off-base grid": (dict(use_learned_positional_embeddings=False), dict(frames=1, height=8, width=4)),
    "4 heads x 16": (dict(num_attention_heads=4, attention_head_dim=16), {}),
    "3 heads x 16, sincos": (dict(num_attention_heads=3, attention_head_dim=16, use_rotary_positional_embeddings=False,
                                  use_learned_positional_embeddings=False), dict(frames=3)),
    "blockwise attention kernel": (dict(), dict(attention_kernel="blockwise")),
}


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_parity_tiny(case):
    overrides, geometry = PARITY_CASES[case]
    result = dit_parity.check(tiny(**overrides), seed=1, name=case, **geometry)
    assert result["max_rel_err"] <= FP32_TOLERANCE, result


def test_blockwise_attention_equals_one_shot_attention():
    """Uneven query blocks (2050 rows -> 3 blocks of 684, 2 padded) give the one-shot result; `auto` picks it."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(2 * rng.standard_normal((1, 2050, 2, 16), dtype=np.float32)) for _ in range(3))
    expected = layers.attention(q, k, v, kernel="xla")
    for kernel in ("blockwise", "auto"):
        got = layers.attention(q, k, v, kernel=kernel)
        assert float(jnp.max(jnp.abs(got - expected)) / jnp.max(jnp.abs(expected))) <= FP32_TOLERANCE


def _block_state(block, prefix="transformer_blocks.0."):
    return {prefix + k: to_numpy(v) for k, v in block.state_dict().items()}


def test_full_width_block_matches_diffusers():
    """One block at the release width (3072 = 48 heads x 64) on 5 face + 12 video tokens, with RoPE."""
    from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock

    config = DiTConfig.from_json(FIVE_B)
    frames, grid_h, grid_w, face_tokens, batch = 2, 2, 3, 5, 2
    torch.manual_seed(0)
    with fp32_reference():
        ref_block = CogVideoXBlock(config.inner_dim, config.num_attention_heads, config.attention_head_dim,
                                   config.time_embed_dim, attention_bias=True, norm_eps=config.norm_eps).eval()
        perturb_plain_tensors(ref_block, seed=1)
        rng = np.random.default_rng(0)
        video = rng.standard_normal((batch, frames * grid_h * grid_w, config.inner_dim), dtype=np.float32)
        face = rng.standard_normal((batch, face_tokens, config.inner_dim), dtype=np.float32)
        temb = rng.standard_normal((batch, config.time_embed_dim), dtype=np.float32)
        rope = dit_parity.reference_rope(config, frames, grid_h * config.patch_size, grid_w * config.patch_size)
        with torch.no_grad():
            ref_video, ref_face = ref_block(torch.from_numpy(video), torch.from_numpy(face), torch.from_numpy(temb),
                                            image_rotary_emb=rope)

        block = dit.DiTBlock(config, face_tokens)
        joint = np.concatenate([face, video], axis=1)
        ours_rope = tuple(jnp.asarray(t) for t in dit.joint_rope_tables(config, face_tokens, frames, grid_h, grid_w))
        abstract = jax.eval_shape(block.init, jax.random.key(0), joint, temb, ours_rope)["params"]
        stacked = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct((1, *s.shape), s.dtype), meta.unbox(abstract))
        block_rules = [r for r in DIT_RULES if r.pattern.startswith("transformer_blocks")]
        params = import_params(_block_state(ref_block), block_rules, {"blocks": stacked})
        params = jax.tree_util.tree_map(lambda x: jnp.asarray(x[0]), params["blocks"])
        out, _ = jax.jit(block.apply)({"params": params}, joint, temb, ours_rope)
    out = np.asarray(out)
    for ours, ref in ((out[:, face_tokens:], ref_video), (out[:, :face_tokens], ref_face)):
        ref = to_numpy(ref)
        assert np.max(np.abs(ours - ref)) / np.max(np.abs(ref)) <= FP32_TOLERANCE


def test_5b_importer_covers_every_tensor_in_stacked_layout():
    """Shapes only: the diffusers 5B model on the meta device plus the connector vs `jax.eval_shape` of ours."""
    from diffusers import CogVideoXTransformer3DModel

    config = DiTConfig.from_json(FIVE_B)
    with torch.device("meta"):
        model = CogVideoXTransformer3DModel(**dit_parity.reference_kwargs(config))
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    shapes.update({"patch_embed.pose_proj.0.weight": (config.face_hidden_dim, config.face_embed_dim),
                   "patch_embed.pose_proj.0.bias": (config.face_hidden_dim,),
                   "patch_embed.pose_proj.2.weight": (config.text_embed_dim, config.face_hidden_dim),
                   "patch_embed.pose_proj.2.bias": (config.text_embed_dim,)})
    assert len(shapes) == 1029
    assert shapes["patch_embed.pos_embedding"] == (1, 729 + 13 * 30 * 45, 3072)
    target = dit.abstract_params(dit.DiT(config), dit.example_inputs(config))
    plan = plan_import(shapes, DIT_RULES, target)
    names, _, stacked = plan.sources[("blocks", "attn", "to_q", "kernel")]
    assert stacked and names == [f"transformer_blocks.{i}.attn1.to_q.weight" for i in range(42)]
    leaves = jax.tree_util.tree_leaves(target)
    assert sum(int(np.prod(leaf.shape)) for leaf in leaves) == 5_588_820_928 + 18279 * 3072
    with pytest.raises(UserError, match=r"1 missing \(norm_final/bias\)"):
        plan_import({k: v for k, v in shapes.items() if k != "norm_final.bias"}, DIT_RULES, target)


def _tiny_model_and_inputs(config, batch=2, seed=0, **model_kw):
    inputs = dit_parity.random_inputs(config, batch, seed)
    model = dit.DiT(config, **model_kw)
    params = meta.unbox(jax.jit(model.init)(jax.random.key(seed), *inputs)["params"])
    return model, params, inputs


def test_scan_and_unrolled_layers_agree():
    config = tiny()
    scanned, params, inputs = _tiny_model_and_inputs(config)
    unrolled = dit.DiT(config, scan_layers=False)
    expected = jax.jit(scanned.apply)({"params": params}, *inputs)
    got = jax.jit(unrolled.apply)({"params": dit.unstack_layers(params, config.num_layers)}, *inputs)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6 * float(jnp.max(jnp.abs(expected))))
    init_unrolled = jax.eval_shape(unrolled.init, jax.random.key(0), *inputs)["params"]
    assert set(init_unrolled) == set(dit.unstack_layers(params, config.num_layers))


def test_remat_keeps_values_and_gradients():
    config = tiny()
    plain, params, inputs = _tiny_model_and_inputs(config)
    remat = dit.DiT(config, remat="full")
    loss = lambda model: lambda p: jnp.sum(model.apply({"params": p}, *inputs) ** 2)
    value, grads = jax.jit(jax.value_and_grad(loss(plain)))(params)
    value_r, grads_r = jax.jit(jax.value_and_grad(loss(remat)))(params)
    np.testing.assert_allclose(value_r, value, rtol=1e-6)
    for g, g_r in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_r)):
        np.testing.assert_allclose(g_r, g, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(g))) + 1e-12)


def _dot_flops(jaxpr) -> int:
    """FLOPs of every dot_general in a jaxpr (recursing into scan/pjit/remat bodies, × scan length)."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lc, rc), (lb, _) = eqn.params["dimension_numbers"]
            lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
            contract = int(np.prod([lhs[i] for i in lc]))
            out = int(np.prod(eqn.outvars[0].aval.shape))
            total += 2 * out * contract
        repeat = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if isinstance(sub, jax.extend.core.Jaxpr):
                    total += repeat * _dot_flops(sub)
    return total


def test_forward_flops_counts_every_matmul():
    config = tiny(num_layers=3)
    model, params, inputs = _tiny_model_and_inputs(config)
    jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, *inputs))(params)
    _, frames, _, height, width = inputs[0].shape
    assert dit.forward_flops(config, 2, frames, height, width, inputs[1].shape[1]) == _dot_flops(jaxpr.jaxpr)
    five_b = DiTConfig.from_json(FIVE_B)
    flops = dit.forward_flops(five_b, 2, 13, 60, 90, 729)
    assert abs(flops / 7.4e14 - 1) < 0.1, flops  # the estimate, ≈7.4e14 at batch 2


def test_bad_configs_and_sizes_are_user_errors():
    with pytest.raises(UserError, match="patch_size_t"):
        tiny(patch_size_t=2)
    with pytest.raises(UserError, match="needs use_rotary_positional_embeddings"):
        tiny(use_rotary_positional_embeddings=False)
    with pytest.raises(UserError, match="attention_head_dim divisible by 16"):
        tiny(attention_head_dim=24)
    config = tiny()
    model, params, (latents, face, t) = _tiny_model_and_inputs(config)
    wider = np.zeros(latents.shape[:3] + (latents.shape[3], latents.shape[4] + 2), np.float32)
    with pytest.raises(UserError, match="learned position table for 6x8 latents only"):
        model.apply({"params": params}, wider, face, t)
    with pytest.raises(UserError, match="face-token rows"):
        model.apply({"params": params}, latents, face[:, :3], t)
    with pytest.raises(UserError, match="not divisible by the patch size"):
        dit.DiT(tiny(use_learned_positional_embeddings=False)).init(
            jax.random.key(0), latents[..., :5, :], face, t)


def test_sharded_checkpoint_with_index_loads_on_both_sides(tmp_path):
    """A two-shard safetensors folder (index json + config.json) read by diffusers and by our importer."""
    config = tiny()
    ref, _, state = dit_parity.build_reference(config, seed=3)
    names = sorted(state)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": names[::2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: np.ascontiguousarray(state[k]) for k in keys}, str(tmp_path / file))
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    ref.save_config(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**json.loads((tmp_path / "config.json").read_text()),
                                                      "face_embed_dim": 24, "face_hidden_dim": 40}))

    target = dit.abstract_params(dit.DiT(config), dit.example_inputs(config))
    from_files = import_dit(open_checkpoint(tmp_path), target)
    from_memory = import_dit(state, target)
    jax.tree_util.tree_map(np.testing.assert_array_equal, from_files, from_memory)
    result = dit_parity.check(config, checkpoint=str(tmp_path))
    assert result["max_rel_err"] <= FP32_TOLERANCE, result


def test_cli_parity_end_to_end():
    proc = subprocess.run([sys.executable, "-m", "a1_jax", "parity", "dit", "--config", str(TINY)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ok"] and result["component"] == "dit" and result["max_rel_err"] <= FP32_TOLERANCE


def test_bench_reports_timings_flops_and_agreement():
    args = argparse.Namespace(config=str(TINY), checkpoint=None, seed=0, batch=2, repeats=1, dtype="float32")
    result = dit_parity.bench(args)
    assert result["ok"] and result["max_rel_err"] <= FP32_TOLERANCE
    assert result["jax_s"] > 0 and result["torch_s"] > 0 and result["compile_s"] > 0
    assert result["speedup"] == pytest.approx(result["torch_s"] / result["jax_s"])
    config = tiny()
    assert result["flops"] == dit.forward_flops(config, 2, 3, 6, 8, config.max_text_seq_length)
