"""Typed, frozen configs.

Architecture configs are read from a checkpoint's own `config.json` (diffusers / transformers keys). A key that is
absent takes the default the PyTorch library itself would use, so a config that loads in diffusers loads here and
means the same thing. Keys we do not model are ignored (`_class_name`, `_diffusers_version`, ...); values we cannot
serve are a `UserError` naming the key.

Runtime knobs (dtype, mesh, remat, attention kernel) are never part of these: they are arguments.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, TypeVar

from a1_jax.errors import UserError

T = TypeVar("T")


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a JSON object from `path`; a directory means its `config.json`."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"config not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"config is not valid JSON: {path} ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"config must be a JSON object: {path}")
    return data


def from_mapping(cls: type[T], mapping: Mapping[str, Any], source: str = "config") -> T:
    """Builds dataclass `cls` from the keys of `mapping` it knows; lists become tuples; absent keys keep defaults."""
    kwargs = {}
    for field in dataclasses.fields(cls):
        if field.name in mapping:
            value = mapping[field.name]
            kwargs[field.name] = tuple(value) if isinstance(value, list) else value
    try:
        config = cls(**kwargs)
    except TypeError as e:
        raise UserError(f"{source}: {e}") from None
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate(source)
    return config


def require(condition: bool, source: str, message: str) -> None:
    """Raises a UserError `<source>: <message>` unless `condition`."""
    if not condition:
        raise UserError(f"{source}: {message}")


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """`AutoencoderKLCogVideoX` geometry (diffusers keys and defaults). Also the pose guider's architecture."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("CogVideoXDownBlock3D",) * 4
    up_block_types: tuple[str, ...] = ("CogVideoXUpBlock3D",) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 256, 512)
    latent_channels: int = 16
    layers_per_block: int = 3
    act_fn: str = "silu"
    norm_eps: float = 1e-6
    norm_num_groups: int = 32
    temporal_compression_ratio: float = 4
    sample_height: int = 480
    sample_width: int = 720
    scaling_factor: float = 1.15258426
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    invert_scale_latents: bool = False

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "VAEConfig":
        data = read_json(path)
        name = data.get("_class_name", "AutoencoderKLCogVideoX")
        require(name == "AutoencoderKLCogVideoX", str(path), f"expected an AutoencoderKLCogVideoX config, got {name}")
        return from_mapping(cls, data, str(path))

    def validate(self, source: str) -> None:
        n = len(self.block_out_channels)
        require(n >= 1, source, "block_out_channels is empty")
        require(len(self.down_block_types) == n and len(self.up_block_types) == n, source,
                "down_block_types, up_block_types and block_out_channels must have the same length")
        require(all(t == "CogVideoXDownBlock3D" for t in self.down_block_types), source,
                f"unsupported down_block_types {self.down_block_types} (only CogVideoXDownBlock3D)")
        require(all(t == "CogVideoXUpBlock3D" for t in self.up_block_types), source,
                f"unsupported up_block_types {self.up_block_types} (only CogVideoXUpBlock3D)")
        require(self.act_fn == "silu", source, f"unsupported act_fn {self.act_fn!r} (only 'silu')")
        require(not self.use_quant_conv and not self.use_post_quant_conv, source,
                "use_quant_conv / use_post_quant_conv are not supported (CogVideoX VAEs have none)")
        require(all(c % self.norm_num_groups == 0 for c in self.block_out_channels), source,
                f"every block_out_channels entry must be divisible by norm_num_groups={self.norm_num_groups}")
        levels = self.temporal_compress_level
        require(2 ** levels == self.temporal_compression_ratio and levels < n, source,
                f"temporal_compression_ratio {self.temporal_compression_ratio} must be 2**k with k < {n}")

    @property
    def temporal_compress_level(self) -> int:
        """How many down/up blocks also halve/double time (diffusers: int(log2(ratio)))."""
        ratio, level = int(self.temporal_compression_ratio), 0
        while ratio > 1:
            ratio //= 2
            level += 1
        return level

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """`CogVideoXTransformer3DModel` geometry (diffusers keys and defaults) plus the SkyReels face connector."""

    num_attention_heads: int = 30
    attention_head_dim: int = 64
    in_channels: int = 16
    out_channels: int = 16
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    time_embed_dim: int = 512
    ofs_embed_dim: int | None = None
    text_embed_dim: int = 4096
    num_layers: int = 30
    dropout: float = 0.0
    attention_bias: bool = True
    sample_width: int = 90
    sample_height: int = 60
    sample_frames: int = 49
    patch_size: int = 2
    patch_size_t: int | None = None
    temporal_compression_ratio: int = 4
    max_text_seq_length: int = 226
    activation_fn: str = "gelu-approximate"
    timestep_activation_fn: str = "silu"
    norm_elementwise_affine: bool = True
    norm_eps: float = 1e-5
    spatial_interpolation_scale: float = 1.875
    temporal_interpolation_scale: float = 1.0
    use_rotary_positional_embeddings: bool = False
    use_learned_positional_embeddings: bool = False
    patch_bias: bool = True
    # SkyReels face connector `patch_embed.pose_proj`: Linear(face_embed_dim, face_hidden_dim), SiLU,
    # Linear(face_hidden_dim, text_embed_dim). Not in diffusers' config; optional keys with the release's widths.
    face_embed_dim: int = 1152
    face_hidden_dim: int = 3456

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "DiTConfig":
        return from_mapping(cls, read_json(path), str(path))

    def validate(self, source: str) -> None:
        require(self.patch_size_t is None, source, "patch_size_t (CogVideoX 1.5 temporal patches) is not supported; "
                "SkyReels-A1 patches each frame (patch_size_t must be null)")
        require(not self.ofs_embed_dim, source, "ofs_embed_dim (CogVideoX 1.5) is not supported; it must be null")
        require(self.activation_fn == "gelu-approximate", source,
                f"unsupported activation_fn {self.activation_fn!r} (only 'gelu-approximate')")
        require(self.timestep_activation_fn == "silu", source,
                f"unsupported timestep_activation_fn {self.timestep_activation_fn!r} (only 'silu')")
        require(self.dropout == 0.0, source, f"dropout {self.dropout} is not supported (only 0.0)")
        require(min(self.num_attention_heads, self.attention_head_dim, self.num_layers, self.in_channels,
                    self.out_channels, self.patch_size, self.max_text_seq_length, self.face_embed_dim,
                    self.face_hidden_dim, self.text_embed_dim, self.time_embed_dim) > 0, source,
                "every width, count and size must be positive")
        require(not self.use_learned_positional_embeddings or self.use_rotary_positional_embeddings, source,
                "use_learned_positional_embeddings needs use_rotary_positional_embeddings (as in diffusers)")
        require(not self.use_rotary_positional_embeddings or self.attention_head_dim % 16 == 0, source,
                f"3-D RoPE needs attention_head_dim divisible by 16, got {self.attention_head_dim}")
        sincos = self.use_learned_positional_embeddings or not self.use_rotary_positional_embeddings
        require(not sincos or self.inner_dim % 16 == 0, source,
                f"the 3-D sin-cos position table needs a width divisible by 16, got {self.inner_dim}")
        require(self.sample_height % self.patch_size == 0 and self.sample_width % self.patch_size == 0, source,
                f"sample_height/sample_width must be divisible by patch_size {self.patch_size}")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
    """SigLIP vision tower geometry (transformers `SiglipVisionConfig` keys and defaults)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "SiglipConfig":
        data = read_json(path)
        kind = data.get("model_type", "siglip_vision_model")
        require(kind in ("siglip", "siglip_vision_model"), str(path),
                f"expected a SigLIP (siglip / siglip_vision_model) config, got model_type {kind!r}")
        # A full SiglipModel config nests the tower we want; its text tower is ignored.
        if kind == "siglip" or "vision_config" in data:
            data = data.get("vision_config") or {}
        return from_mapping(cls, data, str(path))

    def validate(self, source: str) -> None:
        # Both names are transformers' tanh-approximated GELU; the SigLIP checkpoints use the first.
        require(self.hidden_act in ("gelu_pytorch_tanh", "gelu_new"), source,
                f"unsupported hidden_act {self.hidden_act!r} (only the tanh GELU: 'gelu_pytorch_tanh', 'gelu_new')")
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                    "image_size", "patch_size"):
            value = getattr(self, key)
            require(isinstance(value, int) and value > 0, source, f"{key} must be a positive integer, got {value!r}")
        # Not divisibility: So400m/14 takes 384 px, 27 patches a side, and its valid conv drops the last 6 rows/cols.
        require(self.patch_size <= self.image_size, source,
                f"patch_size {self.patch_size} is larger than image_size {self.image_size}")
        require(self.hidden_size % self.num_attention_heads == 0, source,
                f"hidden_size {self.hidden_size} must be divisible by num_attention_heads {self.num_attention_heads}")
        require(self.layer_norm_eps > 0, source, f"layer_norm_eps must be positive, got {self.layer_norm_eps}")

    @property
    def num_patches(self) -> int:
        """Tokens out of the tower: one per patch, no class token (729 for So400m/14 at 384)."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads
