"""Reads `.safetensors` checkpoints with NumPy alone (no torch), lazily, single file or sharded.

The format is an 8-byte little-endian header length, a JSON header `{name: {dtype, shape, data_offsets}}` and one
flat byte buffer. Tensors are memory-mapped, so planning an import (names and shapes) reads no weights, and bf16
tensors come back as `ml_dtypes.bfloat16` arrays (NumPy has no bf16 of its own).
"""

from __future__ import annotations

import glob
import json
import os
import struct
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np

from a1_jax.errors import UserError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def _read_header(path: str) -> tuple[dict, int]:
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("file shorter than its header")
            (length,) = struct.unpack("<Q", raw)
            if length > os.path.getsize(path):
                raise ValueError("header length exceeds file size")
            header = json.loads(f.read(length))
    except (OSError, ValueError) as e:
        raise UserError(f"not a readable safetensors file: {path} ({e})") from None
    header.pop("__metadata__", None)
    return header, 8 + length


class SafetensorsCheckpoint(Mapping[str, np.ndarray]):
    """A read-only `{name: np.ndarray}` view of one or more safetensors files; arrays load on access."""

    def __init__(self, files: list[str]):
        self._entries: dict[str, tuple[str, int, dict]] = {}
        for path in files:
            header, start = _read_header(path)
            for name, info in header.items():
                if name in self._entries:
                    raise UserError(f"tensor {name} appears in two files: {self._entries[name][0]} and {path}")
                if info.get("dtype") not in _DTYPES:
                    raise UserError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')}")
                self._entries[name] = (path, start, info)
        self.files = list(files)

    def __getitem__(self, name: str) -> np.ndarray:
        path, start, info = self._entries[name]
        begin, end = info["data_offsets"]
        dtype = np.dtype(_DTYPES[info["dtype"]])
        shape = tuple(info["shape"])
        if end - begin != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
            raise UserError(f"{path}: tensor {name} has {end - begin} bytes for shape {shape} {info['dtype']}")
        return np.memmap(path, dtype=dtype, mode="r", offset=start + begin, shape=shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(info["shape"]) for name, (_, _, info) in self._entries.items()}


def open_checkpoint(path: str | os.PathLike) -> SafetensorsCheckpoint:
    """Opens a `.safetensors` file, a `.safetensors.index.json`, or a folder holding exactly one of either layout."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UserError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        indexes = sorted(glob.glob(os.path.join(path, "*.safetensors.index.json")))
        singles = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if len(indexes) == 1:
            path = indexes[0]
        elif len(indexes) == 0 and len(singles) == 1:
            path = singles[0]
        else:
            found = [os.path.basename(p) for p in indexes + singles] or ["no .safetensors files"]
            raise UserError(f"expected one .safetensors file or one .safetensors.index.json in {path}, found: "
                            + ", ".join(found))
    if path.endswith(".index.json"):
        try:
            with open(path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"not a valid safetensors index: {path} ({e})") from None
        folder = os.path.dirname(path)
        files = [os.path.join(folder, name) for name in sorted(set(weight_map.values()))]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise UserError(f"{path} names shard files that do not exist: {', '.join(missing)}")
        return SafetensorsCheckpoint(files)
    return SafetensorsCheckpoint([path])
