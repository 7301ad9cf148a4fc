"""Writes a random SkyReels-A1 release folder with the real layout, names, shapes and dtypes (15.7 GB at 5B), to
measure what `a1-jax convert`, loading and restoring cost at full size without the real weights.

    python tools/write_release_folder.py --out /work/bigdata/release          # the 5B geometry (configs/5b)
    python tools/write_release_folder.py --out /tmp/r --config tiny            # same layout, tiny sizes

Layout (as `Skywork/SkyReels-A1`): `transformer/` in bf16 safetensors shards of at most 5 GB with
`diffusion_pytorch_model.safetensors.index.json` (diffusers' `CogVideoXTransformer3DModel` names, its persistent
`patch_embed.pos_embedding`, and the face connector `patch_embed.pose_proj.{0,2}.*`: 1029 tensors at 5B); `vae/` and
`pose_guider/` (two full CogVideoX VAEs, bf16); `siglip-so400m-patch14-384/` (the whole fp32 `SiglipModel`, text tower
included, as google/siglip-so400m-patch14-384); `scheduler/`, `model_index.json`, and `text_encoder/` and
`tokenizer/` with their configs only (the pipeline loads T5 but never calls it; the real folder's T5 weights are
never read by a1_jax). Names and shapes come from the reference libraries' own modules built on the meta device.

Values: a block of N(0, 0.02²) draws per dtype, written at a random offset into each tensor (the bytes are random; a
fresh draw per tensor would only make writing slower). Tensors are streamed to disk in chunks: memory stays small.
Needs the test extra (torch, diffusers, transformers) for the names and shapes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import struct
import sys
import time

import ml_dtypes
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from a1_jax.config import DiTConfig, SiglipConfig  # noqa: E402
from a1_jax.weights.checkpoint import FOLDERS, model_config_folder  # noqa: E402

SHARD_BYTES = 5 * 10 ** 9  # diffusers' save_pretrained(max_shard_size="5GB")
BLOCK = 1 << 24  # values in the random block
DTYPES = {"BF16": ml_dtypes.bfloat16, "F32": np.float32}
# google/siglip-so400m-patch14-384's own config (a full SiglipModel; a1_jax reads its vision_config).
SIGLIP_TEXT = {"hidden_size": 1152, "intermediate_size": 4304, "num_attention_heads": 16, "num_hidden_layers": 27,
               "model_type": "siglip_text_model", "bos_token_id": 1, "eos_token_id": 1}
MODEL_INDEX = {"_class_name": "SkyReelsA1ImagePoseToVideoPipeline", "_diffusers_version": "0.32.2",
               "scheduler": ["diffusers", "CogVideoXDDIMScheduler"], "text_encoder": ["transformers", "T5EncoderModel"],
               "tokenizer": ["transformers", "T5Tokenizer"], "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
               "vae": ["diffusers", "AutoencoderKLCogVideoX"]}
T5_CONFIG = {"architectures": ["T5EncoderModel"], "d_ff": 10240, "d_kv": 64, "d_model": 4096, "model_type": "t5",
             "num_heads": 64, "num_layers": 24, "vocab_size": 32128, "feed_forward_proj": "gated-gelu",
             "_comment": "config only: the release's T5 weights are never read by SkyReels-A1 or a1_jax"}


def _shapes(module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(tensor.shape) for name, tensor in module.state_dict().items()}


def release_tensors(config_folder: str) -> tuple[dict[str, dict[str, tuple[int, ...]]], dict]:
    """`({part: {name: shape}}, {part: config dict to write})` from the reference libraries' meta-device modules."""
    import torch
    import diffusers
    import transformers

    from a1_jax.parity.dit import reference_kwargs

    def config(part: str) -> dict:
        with open(os.path.join(config_folder, FOLDERS[part], "config.json"), encoding="utf-8") as f:
            return json.load(f)

    dit = DiTConfig.from_json(os.path.join(config_folder, FOLDERS["transformer"], "config.json"))
    vision = SiglipConfig.from_json(os.path.join(config_folder, FOLDERS["siglip"], "config.json"))
    siglip_config = {"architectures": ["SiglipModel"], "model_type": "siglip", "torch_dtype": "float32",
                     "text_config": {**SIGLIP_TEXT, "hidden_size": vision.hidden_size,
                                     "intermediate_size": vision.intermediate_size,
                                     "num_attention_heads": vision.num_attention_heads,
                                     "num_hidden_layers": vision.num_hidden_layers},
                     "vision_config": {**{k: v for k, v in dataclasses.asdict(vision).items()
                                          if not k.startswith("_")}, "model_type": "siglip_vision_model"}}
    with torch.device("meta"):
        transformer = diffusers.CogVideoXTransformer3DModel(**reference_kwargs(dit))
        connector = torch.nn.Sequential(torch.nn.Linear(dit.face_embed_dim, dit.face_hidden_dim), torch.nn.SiLU(),
                                        torch.nn.Linear(dit.face_hidden_dim, dit.text_embed_dim))
        vae = diffusers.AutoencoderKLCogVideoX.from_config(config("vae"))
        guider = diffusers.AutoencoderKLCogVideoX.from_config(config("pose_guider"))
        siglip = transformers.SiglipModel(transformers.SiglipConfig(**siglip_config))
    transformer_shapes = {**_shapes(transformer),
                          **{f"patch_embed.pose_proj.{k}": v for k, v in _shapes(connector).items()}}
    parts = {"transformer": transformer_shapes, "vae": _shapes(vae), "pose_guider": _shapes(guider),
             "siglip": _shapes(siglip)}
    configs = {"transformer": config("transformer"), "vae": config("vae"), "pose_guider": config("pose_guider"),
               "siglip": siglip_config}
    return parts, configs


class RandomBytes:
    """Each tensor's values: the dtype's random block from a random offset, repeated as needed."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        draws = (0.02 * self.rng.standard_normal(2 * BLOCK, dtype=np.float32))
        self.blocks = {name: draws.astype(dtype).tobytes() for name, dtype in DTYPES.items()}

    def chunks(self, dtype: str, nbytes: int, chunk: int = 64 << 20):
        block = self.blocks[dtype]
        start = int(self.rng.integers(0, BLOCK)) * np.dtype(DTYPES[dtype]).itemsize
        while nbytes > 0:
            take = min(nbytes, chunk, len(block) - start)
            yield block[start:start + take]
            nbytes -= take
            start = 0 if start + take >= len(block) else start + take


def write_safetensors(path: str, shapes: dict[str, tuple[int, ...]], dtype: str, source: RandomBytes) -> int:
    """One safetensors file of `shapes` in `dtype`, streamed; returns its size."""
    itemsize = np.dtype(DTYPES[dtype]).itemsize
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        size = int(np.prod(shape, dtype=np.int64)) * itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the safetensors writer does it
    with open(path + ".tmp", "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape in shapes.items():
            for chunk in source.chunks(dtype, header[name]["data_offsets"][1] - header[name]["data_offsets"][0]):
                f.write(chunk)
    os.replace(path + ".tmp", path)
    return 8 + len(raw) + offset


def shard(shapes: dict[str, tuple[int, ...]], itemsize: int, limit: int) -> list[dict[str, tuple[int, ...]]]:
    """Greedy shards in state-dict order, as huggingface_hub's `split_torch_state_dict_into_shards`."""
    shards, filled = [{}], 0
    for name, shape in shapes.items():
        size = int(np.prod(shape, dtype=np.int64)) * itemsize
        if shards[-1] and filled + size > limit:
            shards.append({})
            filled = 0
        shards[-1][name] = shape
        filled += size
    return shards


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="a new folder")
    parser.add_argument("--config", default="5b", help="a release-layout config folder, or 5b / tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-bytes", type=int, default=SHARD_BYTES, help="largest transformer shard")
    args = parser.parse_args(argv)
    if os.path.exists(args.out) and os.listdir(args.out):
        parser.error(f"{args.out} exists and is not empty")
    start = time.time()
    parts, configs = release_tensors(model_config_folder(args.config))
    source = RandomBytes(args.seed)
    sizes, counts = {}, {}
    dtypes = {"transformer": "BF16", "vae": "BF16", "pose_guider": "BF16", "siglip": "F32"}
    for part, shapes in parts.items():
        folder = os.path.join(args.out, FOLDERS[part])
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
            json.dump(configs[part], f, indent=2)
        itemsize = np.dtype(DTYPES[dtypes[part]]).itemsize
        if part == "transformer":
            pieces = shard(shapes, itemsize, args.shard_bytes)
            names = [f"diffusion_pytorch_model-{i + 1:05d}-of-{len(pieces):05d}.safetensors" for i in range(len(pieces))]
            index = {"metadata": {"total_size": sum(int(np.prod(s, dtype=np.int64)) * itemsize
                                                    for s in shapes.values())},
                     "weight_map": {name: file for file, piece in zip(names, pieces) for name in piece}}
            with open(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)
        else:
            pieces = [shapes]
            names = ["model.safetensors" if part == "siglip" else "diffusion_pytorch_model.safetensors"]
        sizes[part] = sum(write_safetensors(os.path.join(folder, file), piece, dtypes[part], source)
                          for file, piece in zip(names, pieces))
        counts[part] = len(shapes)
        print(f"{part}: {counts[part]} tensors, {sizes[part] / 1e9:.2f} GB in {len(names)} file(s)", file=sys.stderr)
    shutil.copytree(os.path.join(model_config_folder(args.config), FOLDERS["scheduler"]),
                    os.path.join(args.out, FOLDERS["scheduler"]))
    for folder, name, value in (("", "model_index.json", MODEL_INDEX), ("text_encoder", "config.json", T5_CONFIG),
                                ("tokenizer", "tokenizer_config.json", {"tokenizer_class": "T5Tokenizer",
                                                                        "model_max_length": 226})):
        os.makedirs(os.path.join(args.out, folder), exist_ok=True)
        with open(os.path.join(args.out, folder, name), "w", encoding="utf-8") as f:
            json.dump(value, f, indent=2)
    summary = {"out": args.out, "tensors": counts, "bytes": sizes, "total_bytes": sum(sizes.values()),
               "seconds": round(time.time() - start, 1), "ok": True}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
