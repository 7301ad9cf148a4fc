"""The whole sampling pipeline against a PyTorch loop built from diffusers / transformers modules (spec §6, §9.1).

`write_release` builds a small random SkyReels-A1 in the release folder layout — diffusers' CogVideoX transformer
plus the torch face connector (`patch_embed.pose_proj.*` in the same safetensors), two diffusers CogVideoX VAEs (video
VAE and pose guider), a transformers SigLIP vision model and a scheduler config — and returns the torch modules.
`reference_window` is the release pipeline's computation for one window, written out with those modules: tiled
image encode and a posterior sample with given noise, pose-guider mode, SigLIP `last_hidden_state`, the `[uncond,
cond]` CFG loop with the scheduler's own `step` (DDIM, or DPM fed the noise our loop draws), and the long pipeline's
latent blending at steps 4–7; `reference_frames` its decode and `postprocess_video` (uint8 frames, as the release
script saves them). Either runs in fp32 or, on `TorchPipeline.to(torch.bfloat16)`, in the release's bf16 (SigLIP
stays fp32, as in the release).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from typing import Any, Mapping
from unittest import mock

import numpy as np

from a1_jax.config import DiTConfig, SiglipConfig, VAEConfig
from a1_jax.parity import errors, import_reference, perturb_plain_tensors, to_numpy
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
# fp32, final latents after 10 CFG steps of a 2-block DiT: measured 3.7e-6 to 6e-6 (BUILD_NOTES), held to 2e-5.
PIPELINE_TOLERANCE = 2e-5
# Decoded uint8 frames from those latents: an fp32 difference of ~1e-5 moves a value across a rounding boundary
# (x.5 of a level) only where it lies within ~0.003 levels of one, so at most one level, on a small fraction of values.
FRAME_LEVELS, FRAME_FRACTION = 1, 1e-3  # measured: 1 level on 2e-4 of the values
# bf16 on both sides: the two differ by their rounding orders (XLA fuses, torch rounds every op; our scheduler steps
# bf16 latents in fp32 where torch rounds some products to bf16), each as far from the exact result as bf16 allows.
# So ours may be at most BF16_FACTOR times as far from the bf16 reference as that is from the fp32 reference.
BF16_FACTOR = 2.0
OVERLAP_FRAMES = 8
SINGLE_CLIP_DROP = 2  # the release's single-clip script drops the reference frame and the duplicated first frame


class TorchState(Mapping):
    """A torch module's state dict as the importer reads it: `{name: NumPy array}`, each converted when read (a
    5B model on an accelerator never exists twice on the host)."""

    def __init__(self, tensors: Mapping[str, Any]):
        self._tensors = dict(tensors)

    def __getitem__(self, name: str) -> np.ndarray:
        return to_numpy(self._tensors[name])

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(tensor.shape) for name, tensor in self._tensors.items()}


@dataclasses.dataclass
class TorchPipeline:
    """The reference modules of a SkyReels-A1 release (eval mode), as `build_reference` makes them."""

    transformer: Any
    pose_proj: Any
    vae: Any
    pose_guider: Any
    siglip: Any
    scheduler: Any
    transformer_config: DiTConfig

    def to(self, dtype: Any, copy_modules: bool = True) -> "TorchPipeline":
        """The pipeline running in `dtype` (SigLIP stays fp32, as the release runs it; its tokens are cast after):
        a copy, or with `copy_modules=False` these modules cast in place."""
        diffusers = import_reference("diffusers")
        verbosity = diffusers.utils.logging.get_verbosity()
        diffusers.utils.logging.set_verbosity_error()  # a cast with `to()` warns about modules kept in fp32: none here
        try:
            moved = {name: (copy.deepcopy(getattr(self, name)) if copy_modules else getattr(self, name)).to(dtype)
                     for name in ("transformer", "pose_proj", "vae", "pose_guider")}
        finally:
            diffusers.utils.logging.set_verbosity(verbosity)
        return dataclasses.replace(self, **moved, scheduler=copy.deepcopy(self.scheduler))

    @property
    def dtype(self) -> Any:
        return next(self.transformer.parameters()).dtype

    @property
    def device(self) -> Any:
        return next(self.transformer.parameters()).device

    def states(self) -> dict[str, TorchState]:
        """Every network's tensors under the release's names (the connector inside the transformer's, as there)."""
        transformer = {**self.transformer.state_dict(),
                       **{f"patch_embed.pose_proj.{k}": v for k, v in self.pose_proj.state_dict().items()}}
        return {"transformer": TorchState(transformer), "vae": TorchState(self.vae.state_dict()),
                "pose_guider": TorchState(self.pose_guider.state_dict()),
                "siglip": TorchState(self.siglip.state_dict())}


def _vae_kwargs(config: VAEConfig) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()}


def build_reference(*, seed: int = 0, transformer: DiTConfig = SMALL_DIT, vae: VAEConfig = SMALL_VAE,
                    siglip: SiglipConfig = SMALL_SIGLIP, scheduler: dict[str, Any] | None = None,
                    device: str = "cpu") -> TorchPipeline:
    """Random reference modules on `device`, fp32, every norm and bias perturbed (so no mapping is a no-op); the
    pose guider is a second VAE of the same config, as in the release."""
    torch = import_reference("torch")
    diffusers = import_reference("diffusers")
    transformers = import_reference("transformers")
    torch.manual_seed(seed)
    with torch.device(device):
        model = diffusers.CogVideoXTransformer3DModel(**reference_kwargs(transformer))
        pose_proj = torch.nn.Sequential(torch.nn.Linear(transformer.face_embed_dim, transformer.face_hidden_dim),
                                        torch.nn.SiLU(), torch.nn.Linear(transformer.face_hidden_dim,
                                                                         transformer.text_embed_dim))
        video_vae = diffusers.AutoencoderKLCogVideoX(**_vae_kwargs(vae))
        guider = diffusers.AutoencoderKLCogVideoX(**_vae_kwargs(vae))
        vision = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**dataclasses.asdict(siglip)))
    for i, module in enumerate((model, pose_proj, video_vae, guider, vision)):
        perturb_plain_tensors(module, seed + i, also=("pos_embedding",))
    scheduler_config = dict(RELEASE_SCHEDULER if scheduler is None else scheduler)
    scheduler_class = getattr(diffusers, scheduler_config.pop("_class_name"))
    return TorchPipeline(transformer=model.float().eval(), pose_proj=pose_proj.float().eval(),
                         vae=video_vae.float().eval(), pose_guider=guider.float().eval(),
                         siglip=vision.float().eval(), scheduler=scheduler_class(**scheduler_config),
                         transformer_config=transformer)


def write_release(folder: str | os.PathLike, *, seed: int = 0, transformer: DiTConfig = SMALL_DIT,
                  vae: VAEConfig = SMALL_VAE, siglip: SiglipConfig = SMALL_SIGLIP,
                  scheduler: dict[str, Any] | None = None, config_max_text_seq_length: int | None = 226) -> TorchPipeline:
    """`build_reference`'s modules saved in the release layout; returns them.

    `config_max_text_seq_length`: what the saved transformer config claims (CogVideoX's 226 by default, as a release
    config may say); the weights always hold `transformer.max_text_seq_length` face rows, as the release code makes
    them."""
    from safetensors.torch import load_file, save_file

    folder = os.fspath(folder)
    pipe = build_reference(seed=seed, transformer=transformer, vae=vae, siglip=siglip, scheduler=scheduler)
    path = os.path.join(folder, "transformer")
    pipe.transformer.save_pretrained(path, safe_serialization=True)
    weights = os.path.join(path, "diffusion_pytorch_model.safetensors")
    state = load_file(weights)
    state.update({f"patch_embed.pose_proj.{k}": v.contiguous() for k, v in pipe.pose_proj.state_dict().items()})
    save_file(state, weights)
    config_path = os.path.join(path, "config.json")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    config.update(face_embed_dim=transformer.face_embed_dim, face_hidden_dim=transformer.face_hidden_dim)
    if config_max_text_seq_length is not None:
        config["max_text_seq_length"] = config_max_text_seq_length
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)

    pipe.vae.save_pretrained(os.path.join(folder, "vae"), safe_serialization=True)
    pipe.pose_guider.save_pretrained(os.path.join(folder, "pose_guider"), safe_serialization=True)
    pipe.siglip.save_pretrained(os.path.join(folder, "siglip-so400m-patch14-384"), safe_serialization=True)
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w", encoding="utf-8") as f:
        json.dump(RELEASE_SCHEDULER if scheduler is None else scheduler, f, indent=2)
    return pipe


TINY_FRAMES = 9  # the tiny geometry's window: 3 latent frames


def tiny_configs() -> Any:
    """The small release on 9-frame windows, untiled: the CPU-sized geometry of `bench pipeline --geometry tiny` and
    of the bf16 parity rows. Its VAE's sample size is twice the canvas, so one tile covers the canvas (tiles are half
    the sample size) and XLA:CPU compiles one tile shape per chunk program instead of four; the tiled path is the
    fp32 rows'."""
    from a1_jax.diffusion import SchedulerConfig
    from a1_jax.weights import checkpoint

    vae = dataclasses.replace(SMALL_VAE, sample_height=2 * SMALL_VAE.sample_height,
                              sample_width=2 * SMALL_VAE.sample_width)
    configs = checkpoint.ModelConfigs(transformer=dataclasses.replace(SMALL_DIT, sample_frames=TINY_FRAMES), vae=vae,
                                      pose_guider=vae, siglip=SMALL_SIGLIP,
                                      scheduler=SchedulerConfig.from_dict(RELEASE_SCHEDULER))
    configs.validate("the tiny geometry")
    return configs


def reference_for(configs: Any, seed: int = 0, device: str = "cpu") -> TorchPipeline:
    """`build_reference` for `configs` (a `ModelConfigs`), with its scheduler."""
    return build_reference(seed=seed, transformer=configs.transformer, vae=configs.vae, siglip=configs.siglip,
                           device=device, scheduler={"_class_name": "CogVideoXDDIMScheduler",
                                                     **configs.scheduler.diffusers_kwargs()})


def animator_from_reference(pipe: TorchPipeline, configs: Any, dtype: str) -> Any:
    """Our Animator on one device in `dtype`, with the reference modules' weights read through our rule tables
    (no folder written)."""
    import jax
    import jax.numpy as jnp

    from a1_jax import parallel
    from a1_jax.sampling import Animator
    from a1_jax.weights import checkpoint

    preset = parallel.load_preset("single")
    mesh = parallel.make_mesh(preset, jax.devices()[:1])
    networks = checkpoint.build_networks(configs, jnp.dtype(dtype))
    states = pipe.states()
    params = checkpoint.params_from_states(states, checkpoint.plan_states(states, networks, "the reference"),
                                           networks, checkpoint.param_shardings(networks, mesh, preset.rules))
    return Animator(configs, networks, params, mesh=mesh, rules=preset.rules)


def random_inputs(configs: Any, seed: int, windows: int = 1) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """A random canvas, a random 512×512 face crop, and `windows` windows of control frames: sparse coloured strokes
    on black, like the motion branch draws."""
    rng = np.random.default_rng(seed)
    (height, width), frames = configs.canvas, configs.clip_frames
    canvas = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    face = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    controls = [np.where(rng.random((frames, height, width, 1)) < 0.05,
                         rng.integers(0, 256, (frames, height, width, 3)), 0).astype(np.uint8)
                for _ in range(windows)]
    return canvas, face, controls


def _pixels(frames: np.ndarray) -> Any:
    """uint8 `[T, H, W, 3]` -> torch `[1, 3, T, H, W]` in [-1, 1], as the pipeline's `VideoProcessor.preprocess`."""
    torch = import_reference("torch")
    return (torch.from_numpy(np.array(frames)).permute(3, 0, 1, 2)[None].float() / 255) * 2 - 1  # a writable copy


def _weighted_blending(latents: Any, cache: Any, overlap_frames: int) -> Any:
    """The long pipeline's blending, as written there: frame 0 kept, overlap frames faded from the cache."""
    torch = import_reference("torch")
    n = overlap_frames // 4
    first, rest = latents[:, :1], latents[:, 1:]
    fused = [(n - j) / n * cache[:, -n + j] + (1 - (n - j) / n) * rest[:, j] for j in range(n)]
    return torch.cat([first, torch.stack(fused, dim=1), rest[:, n:]], dim=1)


@dataclasses.dataclass
class TorchConditions:
    """One window's conditions as the release pipeline builds them, on the pipeline's device and in its dtype."""

    image: Any  # [1, F, C, h, w]: the reference's latent sample in frame 0, zeros after
    pose: Any  # [1, F, C, h, w]
    tokens: Any  # [2, N, D]: [uncond (zeros), cond] SigLIP tokens


def reference_conditions(pipe: TorchPipeline, canvas: np.ndarray, control: np.ndarray, face: np.ndarray,
                         image_noise: np.ndarray) -> TorchConditions:
    """The release pipeline's conditions: tiled image encode and a posterior sample with `image_noise` (standard
    normal `[1, 1, h, w, C]`, our layout), pose-guider mode of `control` uint8 `[T, H, W, 3]`, SigLIP
    `last_hidden_state` of `face` uint8 `[S, S, 3]` in fp32, cast after."""
    torch = import_reference("torch")
    transformers = import_reference("transformers")
    dtype, device = pipe.dtype, pipe.device
    with torch.no_grad():
        pipe.vae.enable_tiling()
        posterior = pipe.vae.encode(_pixels(canvas[None]).to(device, dtype)).latent_dist
        draw = torch.from_numpy(np.asarray(image_noise)).permute(0, 4, 1, 2, 3).to(device, dtype)
        sample = posterior.mean + posterior.std * draw
        first = (pipe.vae.config.scaling_factor * sample).permute(0, 2, 1, 3, 4)  # [1, 1, C, h, w]
        pose = pipe.pose_guider.encode(_pixels(control).to(device, dtype)).latent_dist.mode()
        pose = (pose * pipe.pose_guider.config.scaling_factor).permute(0, 2, 1, 3, 4)  # [1, F, C, h, w]
        zeros = torch.zeros((1, pose.shape[1] - 1, *first.shape[2:]), dtype=dtype, device=device)
        image = torch.cat([first, zeros], dim=1)

        size = pipe.siglip.config.image_size
        processor = transformers.SiglipImageProcessorPil(size={"height": size, "width": size}, resample=3)
        pixel_values = processor(images=[face], return_tensors="pt")["pixel_values"].to(device)
        tokens = pipe.siglip(pixel_values=pixel_values).last_hidden_state.to(dtype)
    return TorchConditions(image=image, pose=pose, tokens=torch.cat([torch.zeros_like(tokens), tokens]))


def reference_denoise(pipe: TorchPipeline, conditions: TorchConditions, noise: np.ndarray, *, steps: int = 10,
                      guidance: float = 3.0, cache: list | None = None,
                      step_noises: np.ndarray | None = None) -> tuple[Any, list]:
    """The release pipeline's CFG loop from `noise` `[1, F, C, h, w]`: `(final latents, latents after every step)`,
    torch tensors on the pipeline's device. `cache`: the previous window's per-step latents (blended at steps
    4–7); `step_noises` `[steps, 1, F, C, h, w]`: what a DPM scheduler draws at each step (ours, so both agree)."""
    torch = import_reference("torch")
    dpm_module = import_reference("diffusers.schedulers.scheduling_dpm_cogvideox")
    config, dtype, device = pipe.transformer_config, pipe.dtype, pipe.device
    dpm = isinstance(pipe.scheduler, dpm_module.CogVideoXDPMScheduler)
    pose, image, tokens = conditions.pose, conditions.image, conditions.tokens
    with torch.no_grad():
        rope = reference_rope(config, pose.shape[1], pose.shape[3], pose.shape[4], device=device)
        pipe.scheduler.set_timesteps(steps, device=device)
        timesteps = pipe.scheduler.timesteps
        latents = torch.from_numpy(np.asarray(noise, np.float32)).to(device, dtype)
        face = pipe.pose_proj(tokens)
        history, x0 = [], None
        for i, t in enumerate(timesteps):
            if cache and BLEND_STEPS[0] < i < BLEND_STEPS[1]:
                latents = _weighted_blending(latents, cache[i], OVERLAP_FRAMES)
            x = torch.cat([torch.cat([latents] * 2), torch.cat([pose] * 2), torch.cat([image] * 2)], dim=2)
            v = pipe.transformer(hidden_states=x, encoder_hidden_states=face, timestep=t.expand(2),
                                 image_rotary_emb=rope, return_dict=False)[0].float()
            v_uncond, v_cond = v.chunk(2)
            v = v_uncond + guidance * (v_cond - v_uncond)
            if dpm:
                drawn = torch.from_numpy(np.asarray(step_noises[i], np.float32)).to(device)
                with mock.patch.object(dpm_module, "randn_tensor", lambda *a, **k: drawn):
                    latents, x0 = pipe.scheduler.step(v, x0, t, timesteps[i - 1] if i > 0 else None, latents,
                                                      return_dict=False)
            else:
                latents = pipe.scheduler.step(v, t, latents, return_dict=False)[0]
            latents = latents.to(dtype)
            history.append(latents)
    return latents, history


def reference_window(pipe: TorchPipeline, canvas: np.ndarray, control: np.ndarray, face: np.ndarray,
                     image_noise: np.ndarray, noise: np.ndarray, *, steps: int = 10, guidance: float = 3.0,
                     cache: list | None = None, step_noises: np.ndarray | None = None) -> tuple[np.ndarray, list]:
    """One window of the release pipeline in `pipe.dtype`: `(final latents [1, F, C, h, w] as NumPy, latents after
    every step)`; the arguments as `reference_conditions` and `reference_denoise` take them."""
    conditions = reference_conditions(pipe, canvas, control, face, image_noise)
    latents, history = reference_denoise(pipe, conditions, noise, steps=steps, guidance=guidance, cache=cache,
                                         step_noises=step_noises)
    return to_numpy(latents), history


def reference_frames(pipe: TorchPipeline, latents: Any) -> np.ndarray:
    """The release pipeline's `decode_latents` (tiled) and `postprocess_video(output_type="pil")` of latents
    `[1, F, C, h, w]` (NumPy or torch), as the uint8 frames `[T, H, W, 3]` its script writes (before it drops
    any)."""
    torch = import_reference("torch")
    processing = import_reference("diffusers.video_processor")
    with torch.no_grad():
        z = latents if isinstance(latents, torch.Tensor) else torch.from_numpy(np.asarray(latents, np.float32))
        z = z.to(pipe.device, pipe.dtype).permute(0, 2, 1, 3, 4)
        pipe.vae.enable_tiling()
        video = pipe.vae.decode(1 / pipe.vae.config.scaling_factor * z).sample
    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    frames = processing.VideoProcessor(vae_scale_factor=scale).postprocess_video(video, output_type="pil")[0]
    return np.stack([np.asarray(frame) for frame in frames])


def window_noises(configs: Any, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A window's image-latent noise `[1, 1, h, w, C]` (the reference posterior's shape) and initial latents
    `[1, F, C, h, w]`, standard normal, for `configs` (a `ModelConfigs`)."""
    s, channels = configs.vae.spatial_compression, configs.vae.latent_channels
    h, w = configs.canvas[0] // s, configs.canvas[1] // s
    latent_frames = (configs.clip_frames - 1) // configs.transformer.temporal_compression_ratio + 1
    image_noise = rng.standard_normal((1, 1, h, w, channels)).astype(np.float32)
    return image_noise, rng.standard_normal((1, latent_frames, channels, h, w)).astype(np.float32)


def scheduler_noises(key: Any, steps: int, shape: tuple[int, ...]) -> np.ndarray:
    """What our loop draws for a noise-injecting scheduler, step by step, when `Animator.denoise` gets `key` (it
    splits it, the second half feeding the scheduler)."""
    import jax

    from a1_jax.sampling.denoise import scheduler_noise

    scheduler_key = jax.random.split(key)[1]
    return np.stack([np.asarray(scheduler_noise(scheduler_key, i, shape)) for i in range(steps)])


def compare_windows(pipe: TorchPipeline, animator: Any, canvas: np.ndarray, face: np.ndarray,
                    controls: list[np.ndarray], *, seed: int = 0, steps: int = 10, guidance: float = 3.0,
                    frames: bool = False, frame_latents: int | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """`{window: (our final latents, the reference's)}` for consecutive windows of `controls` (each later one blended
    with the one before, as the long pipeline does), from the same inputs and the same noises (`window_noises` of
    `np.random.default_rng(seed)`, window after window; a DPM scheduler's draws from `jax.random.key(seed + k)`).
    `frames`: also `"window 0 frames"`, both sides' uint8 frames of the first window as the single-clip script
    writes them (decoded, postprocessed, the first two dropped); `frame_latents`: only the frames of that many leading
    latents on both sides (a chunk boundary of the whole decode: the first frames it writes, `vae.decoding_prefix`)."""
    import jax

    from a1_jax.sampling.denoise import Overlap

    rng = np.random.default_rng(seed)
    encoded = animator.encode_reference(canvas, face, tiling=True)  # as the release's enable_tiling()
    outputs, overlap, history = {}, None, None
    for k, control in enumerate(controls):
        image_noise, noise = window_noises(animator.configs, rng)
        key = jax.random.key(seed + k)
        conditions = animator.conditions(encoded, control, image_noise=image_noise)
        ours, tails = animator.denoise(conditions, steps=steps, guidance=guidance, noise=noise, key=key,
                                       overlap=overlap)
        theirs, history = reference_window(pipe, canvas, control, face, image_noise, noise, steps=steps,
                                           guidance=guidance, cache=history,
                                           step_noises=scheduler_noises(key, steps, noise.shape))
        outputs[f"window {k}" + (" (blended)" if k else "")] = (np.asarray(ours, np.float32), theirs)
        if frames and k == 0:
            kept = slice(0, frame_latents)
            outputs["window 0 frames"] = (animator.decode(ours[:, kept], tiling=True)[SINGLE_CLIP_DROP:],
                                          reference_frames(pipe, theirs[:, kept])[SINGLE_CLIP_DROP:])
        overlap = Overlap.after(tails)
    return outputs


def frame_errors(ours: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """uint8 frames: the largest difference in levels and the fraction of values that differ at all."""
    delta = np.abs(ours.astype(np.int32) - reference.astype(np.int32))
    return {"max_abs_err": float(delta.max()), "differing_fraction": float(np.mean(delta > 0))}


def frames_ok(row: dict[str, float]) -> bool:
    return row["max_abs_err"] <= FRAME_LEVELS and row["differing_fraction"] <= FRAME_FRACTION


def with_scheduler(pipe: TorchPipeline, animator: Any, kind: str) -> tuple[TorchPipeline, Any]:
    """Both sides with the folder's scheduler config run as `kind` ("ddim" or "dpm"), same modules and params."""
    diffusers = import_reference("diffusers")
    from a1_jax.sampling import Animator

    scheduler = dataclasses.replace(animator.configs.scheduler, kind=kind)
    cls = diffusers.CogVideoXDPMScheduler if kind == "dpm" else diffusers.CogVideoXDDIMScheduler
    ours = Animator(dataclasses.replace(animator.configs, scheduler=scheduler), animator.networks, animator.params,
                    mesh=animator.mesh, rules=animator.rules)
    return dataclasses.replace(pipe, scheduler=cls(**scheduler.diffusers_kwargs())), ours


def _latent_row(ours: np.ndarray, ref: np.ndarray, tol: float, **extra: Any) -> dict[str, Any]:
    row = errors({"x": (ours, ref)})["x"]
    return {**row, **extra, "tol": tol, "ok": bool(row["max_rel_err"] <= tol)}


def fp32_rows(pipe: TorchPipeline, animator: Any, canvas: np.ndarray, face: np.ndarray, controls: list[np.ndarray],
              seed: int, frame_latents: int | None = None) -> dict[str, dict[str, Any]]:
    """fp32 parity rows, each with its tolerance and verdict: DDIM over two windows (the second blended), the 47
    frames the single-clip script writes from the first (or those of its first `frame_latents` latents), and DPM
    (one window)."""
    rows = {}
    ddim = compare_windows(pipe, animator, canvas, face, controls, seed=seed, frames=True,
                           frame_latents=frame_latents)
    for name in ("window 0", "window 1 (blended)"):
        rows[f"ddim fp32 {name}"] = _latent_row(*ddim[name], PIPELINE_TOLERANCE)
    frames = ddim["window 0 frames"]
    row = frame_errors(*frames)
    rows["ddim fp32 window 0 frames"] = {**row, "frames": len(frames[0]), "tol": FRAME_LEVELS,
                                         "tol_fraction": FRAME_FRACTION, "ok": frames_ok(row)}
    dpm_pipe, dpm_animator = with_scheduler(pipe, animator, "dpm")
    dpm = compare_windows(dpm_pipe, dpm_animator, canvas, face, controls[:1], seed=seed)
    rows["dpm fp32 window 0"] = _latent_row(*dpm["window 0"], PIPELINE_TOLERANCE)
    return rows


def bf16_rows(seed: int) -> dict[str, dict[str, Any]]:
    """bf16 parity rows on the tiny geometry: our pipeline in bf16 against the reference in bf16, latents and
    written frames, each held to `BF16_FACTOR` times the bf16 reference's own distance from the fp32 reference."""
    torch = import_reference("torch")
    configs = tiny_configs()
    canvas, face, controls = random_inputs(configs, seed)
    pipe = reference_for(configs, seed)
    animator = animator_from_reference(pipe, configs, "bfloat16")
    ours = compare_windows(pipe.to(torch.bfloat16), animator, canvas, face, controls, seed=seed, frames=True)
    (ours_latents, ref_latents), (ours_frames, ref_frames) = ours["window 0"], ours["window 0 frames"]
    # The fp32 reference from the same inputs and noises (the first draws of the same generator).
    image_noise, noise = window_noises(configs, np.random.default_rng(seed))
    exact, _ = reference_window(pipe, canvas, controls[0], face, image_noise, noise)
    exact_frames = reference_frames(pipe, exact)[SINGLE_CLIP_DROP:]
    yardstick = errors({"x": (ref_latents, exact)})["x"]["max_rel_err"]
    rows = {"ddim bf16 window 0": _latent_row(ours_latents, ref_latents, BF16_FACTOR * yardstick,
                                              reference_bf16_vs_fp32=yardstick),
            "ddim bf16 window 0 vs reference fp32": _latent_row(ours_latents, exact, BF16_FACTOR * yardstick)}
    frame_yardstick = frame_errors(ref_frames, exact_frames)["max_abs_err"]
    row = frame_errors(ours_frames, ref_frames)
    tol = BF16_FACTOR * max(frame_yardstick, FRAME_LEVELS)
    rows["ddim bf16 window 0 frames"] = {**row, "reference_bf16_vs_fp32": frame_yardstick, "frames": len(ours_frames),
                                         "tol": tol, "ok": row["max_abs_err"] <= tol}
    return rows


def bench(args: Any) -> dict:
    """`a1-jax bench pipeline`: `a1_jax.parity.bench_pipeline`."""
    from a1_jax.parity.bench_pipeline import bench as run

    return run(args)


def parity(args: Any) -> dict:
    """`a1-jax parity pipeline`: a random release folder written to a temporary folder, random inputs; fp32 DDIM
    over two long-video windows (the second blended) and the frames the first one writes, fp32 DPM; bf16 DDIM
    (latents and frames) on the tiny geometry; on CPU."""
    import tempfile

    from a1_jax.parity import fp32_reference
    from a1_jax.sampling import Animator

    with tempfile.TemporaryDirectory() as folder, fp32_reference():
        pipe = write_release(folder, seed=args.seed)
        animator = Animator.from_pretrained(folder, dtype="float32")
        canvas, face, controls = random_inputs(animator.configs, args.seed, windows=2)
        rows = {**fp32_rows(pipe, animator, canvas, face, controls, args.seed), **bf16_rows(args.seed)}
    fp32 = [row for name, row in rows.items() if "fp32" in name and "frames" not in name and "bf16" not in name]
    return {"component": "pipeline", "config": "random release folder", "input_shape": list(controls[0].shape),
            "steps": 10, "max_abs_err": max(row["max_abs_err"] for row in fp32),
            "max_rel_err": max(row["max_rel_err"] for row in fp32), "tol": PIPELINE_TOLERANCE,
            "outputs": rows, "ok": all(row["ok"] for row in rows.values())}
