"""The whole sampling pipeline against a PyTorch loop built from diffusers / transformers modules (spec §6, §9.1).

`write_release` builds a small random SkyReels-A1 in the release folder layout — diffusers' CogVideoX transformer
plus the torch face connector (`patch_embed.pose_proj.*` in the same safetensors), two diffusers CogVideoX VAEs (video
VAE and pose guider), a transformers SigLIP vision model and a scheduler config — and returns the torch modules.
`reference_window` is the release pipeline's computation for one window, written out with those modules: tiled
image encode and a posterior sample with given noise, pose-guider mode, SigLIP `last_hidden_state`, the `[uncond,
cond]` CFG loop with the scheduler's own `step`, and the long pipeline's latent blending at steps 4–7.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from a1_jax.config import DiTConfig, SiglipConfig, VAEConfig
from a1_jax.parity import import_reference, perturb_plain_tensors, report, to_numpy
from a1_jax.parity.dit import reference_kwargs, reference_rope

# A release-shaped SkyReels-A1 small enough for a CPU test: 49-frame clips, 16 SigLIP face tokens, a 96×80 canvas
# (12×10 latents) that the VAE tiles 3×3 exactly as the release's tiles 480×720: tiles of half the sample size whose
# stride (5/6, 4/5 of a tile) is a whole number of kept latent rows/columns, so tiled latents cover the canvas.
SMALL_VAE = VAEConfig(block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=4,
                      sample_height=96, sample_width=80, scaling_factor=0.7)
SMALL_SIGLIP = SiglipConfig(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                            image_size=56, patch_size=14)
SMALL_DIT = DiTConfig(num_attention_heads=2, attention_head_dim=16, in_channels=12, out_channels=4,
                      time_embed_dim=16, text_embed_dim=24, num_layers=2, sample_width=10, sample_height=12,
                      sample_frames=49, patch_size=2, max_text_seq_length=16, use_rotary_positional_embeddings=True,
                      use_learned_positional_embeddings=True, face_embed_dim=48, face_hidden_dim=20)
RELEASE_SCHEDULER = {"_class_name": "CogVideoXDDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                     "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
                     "set_alpha_to_one": True, "steps_offset": 0, "prediction_type": "v_prediction",
                     "rescale_betas_zero_snr": True, "snr_shift_scale": 1.0, "timestep_spacing": "trailing"}
BLEND_STEPS = (3, 8)  # the release's fusion_interval: blend at the start of steps 3 < i < 8
PIPELINE_TOLERANCE = 1e-4  # final latents after 10 steps of a 2-block DiT, fp32: the DiT's 1e-5 compounded by steps
OVERLAP_FRAMES = 8


@dataclasses.dataclass
class TorchPipeline:
    """The reference modules of a release folder written by `write_release` (fp32, eval mode)."""

    transformer: Any
    pose_proj: Any
    vae: Any
    pose_guider: Any
    siglip: Any
    scheduler: Any
    transformer_config: DiTConfig


def _vae_kwargs(config: VAEConfig) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()}


def write_release(folder: str | os.PathLike, *, seed: int = 0, transformer: DiTConfig = SMALL_DIT,
                  vae: VAEConfig = SMALL_VAE, siglip: SiglipConfig = SMALL_SIGLIP,
                  scheduler: dict[str, Any] | None = None, config_max_text_seq_length: int | None = 226) -> TorchPipeline:
    """Random modules (every norm and bias perturbed, so no mapping is a no-op) saved in the release layout.

    `config_max_text_seq_length`: what the saved transformer config claims (CogVideoX's 226 by default, as a release
    config may say); the weights always hold `transformer.max_text_seq_length` face rows, as the release code makes
    them."""
    torch = import_reference("torch")
    diffusers = import_reference("diffusers")
    transformers = import_reference("transformers")
    from safetensors.torch import load_file, save_file

    folder = os.fspath(folder)
    torch.manual_seed(seed)
    model = diffusers.CogVideoXTransformer3DModel(**reference_kwargs(transformer))
    pose_proj = torch.nn.Sequential(torch.nn.Linear(transformer.face_embed_dim, transformer.face_hidden_dim),
                                    torch.nn.SiLU(), torch.nn.Linear(transformer.face_hidden_dim,
                                                                     transformer.text_embed_dim))
    video_vae = diffusers.AutoencoderKLCogVideoX(**_vae_kwargs(vae))
    guider = diffusers.AutoencoderKLCogVideoX(**_vae_kwargs(vae))
    vision = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**dataclasses.asdict(siglip)))
    for i, module in enumerate((model, pose_proj, video_vae, guider, vision)):
        perturb_plain_tensors(module, seed + i, also=("pos_embedding",))

    path = os.path.join(folder, "transformer")
    model.save_pretrained(path, safe_serialization=True)
    weights = os.path.join(path, "diffusion_pytorch_model.safetensors")
    state = load_file(weights)
    state.update({f"patch_embed.pose_proj.{k}": v.contiguous() for k, v in pose_proj.state_dict().items()})
    save_file(state, weights)
    config_path = os.path.join(path, "config.json")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    config.update(face_embed_dim=transformer.face_embed_dim, face_hidden_dim=transformer.face_hidden_dim)
    if config_max_text_seq_length is not None:
        config["max_text_seq_length"] = config_max_text_seq_length
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)

    video_vae.save_pretrained(os.path.join(folder, "vae"), safe_serialization=True)
    guider.save_pretrained(os.path.join(folder, "pose_guider"), safe_serialization=True)
    vision.save_pretrained(os.path.join(folder, "siglip-so400m-patch14-384"), safe_serialization=True)
    scheduler_config = dict(RELEASE_SCHEDULER if scheduler is None else scheduler)
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w", encoding="utf-8") as f:
        json.dump(scheduler_config, f, indent=2)
    scheduler_class = getattr(diffusers, scheduler_config.pop("_class_name"))
    return TorchPipeline(transformer=model.float().eval(), pose_proj=pose_proj.float().eval(),
                         vae=video_vae.float().eval(), pose_guider=guider.float().eval(),
                         siglip=vision.float().eval(), scheduler=scheduler_class(**scheduler_config),
                         transformer_config=transformer)


def _pixels(frames: np.ndarray) -> Any:
    """uint8 `[T, H, W, 3]` -> torch `[1, 3, T, H, W]` in [-1, 1], as the pipeline's `VideoProcessor.preprocess`."""
    torch = import_reference("torch")
    return (torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2)[None].float() / 255) * 2 - 1


def _weighted_blending(latents: Any, cache: Any, overlap_frames: int) -> Any:
    """The long pipeline's blending, as written there: frame 0 kept, overlap frames faded from the cache."""
    torch = import_reference("torch")
    n = overlap_frames // 4
    first, rest = latents[:, :1], latents[:, 1:]
    fused = [(n - j) / n * cache[:, -n + j] + (1 - (n - j) / n) * rest[:, j] for j in range(n)]
    return torch.cat([first, torch.stack(fused, dim=1), rest[:, n:]], dim=1)


def reference_window(pipe: TorchPipeline, canvas: np.ndarray, control: np.ndarray, face: np.ndarray,
                     image_noise: np.ndarray, noise: np.ndarray, *, steps: int = 10, guidance: float = 3.0,
                     cache: list | None = None) -> tuple[np.ndarray, list]:
    """One window of the release pipeline in fp32: `(final latents [1, F, C, h, w], latents after every step)`.

    `canvas` uint8 `[H, W, 3]`, `control` uint8 `[T, H, W, 3]`, `face` uint8 `[S, S, 3]` (the aligned crop);
    `image_noise` `[1, 1, h, w, C]` draws the image-latent sample and `noise` `[1, F, C, h, w]` is the initial
    latent, both in our layouts; `cache`: the previous window's per-step latents (blended at steps 4–7)."""
    torch = import_reference("torch")
    transformers = import_reference("transformers")
    config = pipe.transformer_config
    with torch.no_grad():
        pipe.vae.enable_tiling()
        posterior = pipe.vae.encode(_pixels(canvas[None])).latent_dist
        sample = posterior.mean + posterior.std * torch.from_numpy(np.asarray(image_noise)).permute(0, 4, 1, 2, 3)
        first = (pipe.vae.config.scaling_factor * sample).permute(0, 2, 1, 3, 4)  # [1, 1, C, h, w]
        pose = pipe.pose_guider.encode(_pixels(control)).latent_dist.mode()
        pose = (pose * pipe.pose_guider.config.scaling_factor).permute(0, 2, 1, 3, 4)  # [1, F, C, h, w]
        image = torch.cat([first, torch.zeros((1, pose.shape[1] - 1, *first.shape[2:]))], dim=1)

        size = pipe.siglip.config.image_size
        processor = transformers.SiglipImageProcessorPil(size={"height": size, "width": size}, resample=3)
        pixel_values = processor(images=[face], return_tensors="pt")["pixel_values"]
        tokens = pipe.siglip(pixel_values=pixel_values).last_hidden_state
        tokens = torch.cat([torch.zeros_like(tokens), tokens])  # [uncond, cond]

        frames, height, width = pose.shape[1], pose.shape[3], pose.shape[4]
        rope = reference_rope(config, frames, height, width)
        pipe.scheduler.set_timesteps(steps)
        latents = torch.from_numpy(np.asarray(noise, np.float32))
        history = []
        for i, t in enumerate(pipe.scheduler.timesteps):
            if cache and BLEND_STEPS[0] < i < BLEND_STEPS[1]:
                latents = _weighted_blending(latents, cache[i], OVERLAP_FRAMES)
            x = torch.cat([torch.cat([latents] * 2), torch.cat([pose] * 2), torch.cat([image] * 2)], dim=2)
            v = pipe.transformer(hidden_states=x, encoder_hidden_states=pipe.pose_proj(tokens),
                                 timestep=t.expand(2), image_rotary_emb=rope, return_dict=False)[0].float()
            v_uncond, v_cond = v.chunk(2)
            v = v_uncond + guidance * (v_cond - v_uncond)
            latents = pipe.scheduler.step(v, t, latents, return_dict=False)[0]
            history.append(latents)
    return to_numpy(latents), history


def window_noises(animator: Any, encoded: Any, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A window's image-latent noise `[1, 1, h, w, C]` and initial latents `[1, F, C, h, w]`, standard normal."""
    configs = animator.configs
    latent_frames = (configs.transformer.sample_frames - 1) // configs.transformer.temporal_compression_ratio + 1
    image_noise = rng.standard_normal(encoded.posterior.mean.shape).astype(np.float32)
    noise = rng.standard_normal((1, latent_frames, configs.vae.latent_channels,
                                 *encoded.posterior.mean.shape[2:4])).astype(np.float32)
    return image_noise, noise


def compare_windows(pipe: TorchPipeline, animator: Any, canvas: np.ndarray, face: np.ndarray,
                    controls: list[np.ndarray], *, seed: int = 0, steps: int = 10,
                    guidance: float = 3.0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """`{window: (our final latents, the reference's)}` for consecutive windows of `controls` (each later one blended
    with the one before, as the long pipeline does), from the same inputs and the same noises (`window_noises` of
    `np.random.default_rng(seed)`, window after window)."""
    from a1_jax.sampling.denoise import Overlap

    rng = np.random.default_rng(seed)
    encoded = animator.encode_reference(canvas, face, tiling=True)  # as the release's enable_tiling()
    outputs, overlap, history = {}, None, None
    for k, control in enumerate(controls):
        image_noise, noise = window_noises(animator, encoded, rng)
        conditions = animator.conditions(encoded, control, image_noise=image_noise)
        ours, tails = animator.denoise(conditions, steps=steps, guidance=guidance, noise=noise, overlap=overlap)
        theirs, history = reference_window(pipe, canvas, control, face, image_noise, noise, steps=steps,
                                           guidance=guidance, cache=history)
        outputs[f"window {k}" + (" (blended)" if k else "")] = (np.asarray(ours), theirs)
        overlap = Overlap.after(tails)
    return outputs


def parity(args: Any) -> dict:
    """`a1-jax parity pipeline`: a random release folder written to a temporary folder, random inputs, two long-video
    windows (the second blended), fp32 on CPU."""
    import tempfile

    from a1_jax.parity import fp32_reference
    from a1_jax.sampling import Animator

    rng = np.random.default_rng(args.seed)
    height, width = SMALL_VAE.sample_height, SMALL_VAE.sample_width
    canvas = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    face = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    controls = [np.where(rng.random((SMALL_DIT.sample_frames, height, width, 1)) < 0.05,
                         rng.integers(0, 256, (SMALL_DIT.sample_frames, height, width, 3)), 0).astype(np.uint8)
                for _ in range(2)]
    with tempfile.TemporaryDirectory() as folder, fp32_reference():
        pipe = write_release(folder, seed=args.seed)
        animator = Animator.from_pretrained(folder, dtype="float32")
        outputs = compare_windows(pipe, animator, canvas, face, controls, seed=args.seed)
    return report("pipeline", "random release folder", controls[0].shape, outputs, tol=PIPELINE_TOLERANCE, steps=10)
