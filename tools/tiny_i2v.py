"""Writes a tiny CogVideoX-I2V-style transformer: diffusers' `CogVideoXTransformer3DModel` of the tiny DiT's geometry
with `[noise | image]` input channels (2 x latent) and no face connector, saved with `save_pretrained` (random,
seeded). `configs/train/tiny_identity.yaml` starts from it (`model.init_transformer`), as the 5B stage 1 starts
from CogVideoX-5B-I2V. Needs the `test` extra (torch, diffusers).

    python tools/tiny_i2v.py /tmp/tiny_i2v [--seed 0]
"""

import argparse
import dataclasses
import json
import os
import pathlib

from a1_jax.config import DiTConfig
from a1_jax.parity.dit import build_reference

TINY = pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny" / "transformer" / "config.json"


def write_tiny_i2v(folder: str | os.PathLike, seed: int = 0) -> None:
    config = DiTConfig.from_json(TINY)
    model, _, _ = build_reference(dataclasses.replace(config, in_channels=2 * config.out_channels), seed)
    model.save_pretrained(os.fspath(folder), safe_serialization=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder to write (config.json + diffusion_pytorch_model.safetensors)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_tiny_i2v(args.out, args.seed)
    print(json.dumps({"out": args.out, "ok": True}))
