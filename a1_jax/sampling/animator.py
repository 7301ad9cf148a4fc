"""The Animator: a portrait and a driving video in, the portrait performing the driver's motion out (spec §1, §6, §9).

```python
from a1_jax.sampling import Animator

animator = Animator.from_pretrained("SkyReels-A1-5B", dtype="bfloat16", mesh="fsdp")   # or our converted checkpoint
frames = animator("portrait.png", "driving.mp4", steps=10, guidance=3.0, seed=0)    # uint8 [N, 480, 720, 3], 12 fps
```

The stages are callable on their own, for scripts that bring their own control video or latents:

* `plan_video(configs, image, driving)`: the canvas, aligned face and landmarks of a video (or
  `prepare_reference(image)`: canvas and face only, for a control video of your own);
* `encode_reference(canvas, face)` once, then `conditions(reference, control, key)` per window: image latent (a
  fresh posterior sample per window, as the reference re-encodes per window), pose latents, face tokens;
* `denoise(conditions, ...)`: the whole CFG + scheduler loop, one compiled step program run once per step, compiled
  once per geometry (every step and every window of a long video reuse it; a later run reads it from JAX's cache);
* `decode(latents)`: the VAE decoder (tiled where its memory budget needs it, as the 5B's is), through its
  frame-chunk driver (memory is one chunk's).

Whole videos go through `frames(...)`, a generator that streams `(output, control)` frame pairs window by window
(memory does not grow with the video), or `__call__`, which collects them. Parameters and activations are sharded by
their logical axes on any mesh preset (`mesh=`); the VAE and SigLIP run outside the loop's jit.

`offload=True` keeps only the running stage's network on the device: every network's parameters live in host memory
(pinned where the backend has it) and are placed on the device when their stage starts and freed when it ends
(SigLIP and the VAE for the reference, then per window the pose guider, the DiT, the VAE). Same outputs, bit for bit;
each placement copies that network over (the DiT's 11.3 GB once per window). `"auto"` (the default) turns it on
where all parameters and the largest stage would not fit the device's memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import TYPE_CHECKING, Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from a1_jax import conditions as cond
from a1_jax import diffusion, parallel
from a1_jax.errors import UserError
from a1_jax.interpolate import Interpolator
from a1_jax.io.video import read_image
from a1_jax.models import vae
from a1_jax.motion.track import MotionTrack
from a1_jax.progress import Stages
from a1_jax.sampling import denoise as loop
from a1_jax.sampling.windows import WindowPlan, stitch
from a1_jax.weights import checkpoint

# The motion branch (OpenCV, MediaPipe) is imported where it runs: the stages from `encode_reference` on need neither
# (`a1-jax bench pipeline` runs them on a machine without either).
if TYPE_CHECKING:
    from a1_jax.motion.pipeline import MotionPlan

SINGLE_CLIP_DROP = 2  # the reference's single-clip script drops the reference frame and the duplicated first frame


def default_dtype() -> str:
    """bf16 on accelerators (as the reference runs); fp32 on CPU, where XLA emulates bf16 matmuls slowly."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


@dataclasses.dataclass(frozen=True)
class Reference:
    """The reference portrait prepared for the model: its canvas and aligned face crop (uint8 RGB)."""

    canvas: np.ndarray  # [H, W, 3]
    face: np.ndarray  # [512, 512, 3]


@dataclasses.dataclass(frozen=True)
class EncodedReference:
    """What every window shares: the reference latent's posterior and the face tokens."""

    posterior: vae.DiagonalGaussian  # over [1, 1, h, w, C]
    face_tokens: jax.Array  # [1, N, D], compute dtype


@dataclasses.dataclass
class Report:
    """What `frames` did: filled in while it runs, complete when the generator is exhausted."""

    frames: int = 0  # written so far
    expected_frames: int = 0  # one per 12-fps driving frame used (47 for a single clip), known once planned
    windows: int = 0
    faces_found: int = 0
    missing_face: str = "drop"
    frames_without_face: tuple[int, ...] = ()  # 12-fps driving frames without a face (dropped or filled)
    reference: Reference | None = None
    motion: MotionPlan | None = None
    sample_times: np.ndarray | None = None  # per output frame: the source second it shows (where its audio is)
    stage_seconds: dict[str, float] = dataclasses.field(default_factory=dict)


class NonFiniteLatents(RuntimeError):
    """The denoising loop produced NaN or Inf: the weights or the inputs are broken; nothing is decoded."""


class Animator:
    """SkyReels-A1 inference. Build with `from_pretrained` (a checkpoint) or `from_config` (seeded random weights)."""

    def __init__(self, configs: checkpoint.ModelConfigs, networks: checkpoint.Networks, params: dict[str, Any], *,
                 mesh: jax.sharding.Mesh | None = None, rules: parallel.Rules = (),
                 weights: dict[str, str] | None = None, offload: bool = False):
        self.configs, self.networks = configs, networks
        self.mesh, self.rules = mesh, rules
        self.offload = offload
        # Where each network runs; with `offload` its parameters are kept in host memory between its stages.
        self._device_shardings = {name: jax.tree_util.tree_map(lambda x: x.sharding, tree)
                                  for name, tree in params.items()}
        self.params = {name: _to_host(tree) for name, tree in params.items()} if offload else params
        # Where each network's weights come from (`checkpoint.weight_sources`), e.g. a trained DiT beside a random VAE.
        self.weights = dict(weights or {name: "given" for name in checkpoint.NETWORKS})
        self.dtype = jnp.dtype(networks.transformer.dtype)
        self._step_listener: Callable[[int], None] | None = None
        self._step = jax.jit(self._traced_step, static_argnames=("use_cfg",))
        self.traces = 0  # how many times the denoising step was traced: once per geometry and step count

    @property
    def random_networks(self) -> list[str]:
        """The networks running on random weights (their output shows the pipeline, not a likeness)."""
        return [name for name, source in self.weights.items() if checkpoint.is_random(source)]

    @property
    def random_weights(self) -> bool:
        """True when any network is random: then the picture is not a likeness, whatever else was trained."""
        return bool(self.random_networks)

    def _traced_step(self, *args: Any, **kwargs: Any) -> tuple[jax.Array, diffusion.State, jax.Array]:
        self.traces += 1  # runs only while tracing
        return loop.step(self.networks.transformer, *args, **kwargs)

    # --- construction ------------------------------------------------------------------------------------------------

    @classmethod
    def _build(cls, folder: str, dtype: str | None, mesh: str | None, attention_kernel: str, offload: bool | str,
               load: Callable[[checkpoint.Networks, Any], dict], weights: dict[str, str]) -> "Animator":
        configs = checkpoint.ModelConfigs.from_folder(folder)
        networks = checkpoint.build_networks(configs, jnp.dtype(dtype or default_dtype()),
                                             attention_kernel=attention_kernel)
        mesh, rules = _mesh(mesh)
        shardings = checkpoint.param_shardings(networks, mesh, rules)
        offload = wants_offload(offload, checkpoint.bytes_per_device(networks, shardings))
        return cls(configs, networks, load(networks, shardings), mesh=mesh, rules=rules, weights=weights,
                   offload=offload)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: str | None = None, mesh: str | None = None,
                        attention_kernel: str = "auto", offload: bool | str = "auto") -> "Animator":
        """From a release folder (`Skywork/SkyReels-A1` layout) or our converted checkpoint (`a1-jax convert`).

        `dtype`: compute and parameter dtype of the DiT, VAE and pose guider (SigLIP runs in fp32); default bf16 on
        accelerators, fp32 on CPU. `mesh`: a preset name (`single`, `fsdp`, `fsdp_tensor`, ...) or a preset
        JSON path; default one device. `offload`: only the running stage's network on the device (`wants_offload`)."""
        path = os.fspath(path)
        return cls._build(path, dtype, mesh, attention_kernel, offload,
                          lambda networks, shardings: checkpoint.load_params(path, networks, shardings),
                          checkpoint.weight_sources(path))

    @classmethod
    def from_config(cls, config: str = "tiny", *, seed: int = 0, dtype: str | None = None,
                    mesh: str | None = None, attention_kernel: str = "auto",
                    offload: bool | str = "auto") -> "Animator":
        """Seeded random weights for the configs of `config` (`tiny`, or a folder of release-layout configs)."""
        return cls._build(checkpoint.model_config_folder(config), dtype, mesh, attention_kernel, offload,
                          lambda networks, shardings: checkpoint.init_params(networks, seed, shardings),
                          {name: checkpoint.random_source(seed) for name in checkpoint.NETWORKS})

    @contextlib.contextmanager
    def _on_mesh(self):
        with parallel.activate(self.mesh, self.rules):
            yield

    @contextlib.contextmanager
    def _placed(self, name: str) -> Iterator[Any]:
        """`name`'s parameters on the device for one stage: where they stay, or with `offload` copied from host
        memory now and freed when the stage ends (a computation still reading them keeps them until it is done)."""
        if not self.offload:
            yield self.params[name]
            return
        placed = jax.device_put(self.params[name], self._device_shardings[name])
        try:
            yield placed
        finally:
            for leaf in jax.tree_util.tree_leaves(placed):
                leaf.delete()

    # --- stages ------------------------------------------------------------------------------------------------------

    def prepare_reference(self, image: np.ndarray | str, *, landmarker: str | None = None) -> Reference:
        """The canvas (the reference's crop-and-resize to the model's size) and the aligned 512×512 face crop."""
        from a1_jax.motion.reference import crop_and_resize

        name, pixels = _image(image)
        return _aligned(crop_and_resize(pixels, *self.configs.canvas), name, landmarker)

    def encode_reference(self, canvas: np.ndarray, face: np.ndarray, *,
                         tiling: bool | str = "auto") -> EncodedReference:
        """The reference latent's posterior (VAE encode; `tiling` as `vae.encode`) and the SigLIP face tokens: once per
        video."""
        with self._on_mesh():
            with self._placed("vae") as params:
                posterior = cond.reference_posterior(self.networks.vae, params, np.asarray(canvas)[None], tiling)
            with self._placed("siglip") as params:
                tokens = cond.face_tokens(self.networks.siglip, params, np.asarray(face)[None], self.dtype)
        return EncodedReference(posterior=posterior, face_tokens=tokens)

    def conditions(self, reference: EncodedReference, control: np.ndarray, key: jax.Array | None = None, *,
                   image_noise: jax.Array | None = None) -> loop.Conditions:
        """One window's conditions from its control video uint8 `[T, H, W, 3]` (T = 49 for the release).

        The image latent is a fresh posterior sample drawn with `key`, or with `image_noise` (standard normal, the
        posterior's shape `[1, 1, h, w, C]`) when given."""
        control = np.asarray(control)
        canvas = tuple(n * self.configs.vae.spatial_compression for n in reference.posterior.mean.shape[2:4])
        if control.shape[1:3] != canvas:
            raise ValueError(f"control frames are {control.shape[1:3]}, the reference canvas {canvas}")
        with self._on_mesh():
            with self._placed("pose_guider") as params:
                pose = cond.pose_latents(self.networks.pose_guider, params, control[None], self.dtype)
            if image_noise is None:
                image_noise = jax.random.normal(key, reference.posterior.mean.shape, jnp.float32)
            image = cond.image_latents(reference.posterior, image_noise, self.configs.vae.scaling_factor, pose.shape[1],
                                       self.dtype)
        return loop.Conditions(image=image, pose=pose, face=reference.face_tokens)

    def schedule(self, steps: int) -> diffusion.Schedule:
        if steps < 1:
            raise UserError(f"--steps must be at least 1, got {steps}")
        return diffusion.make_schedule(self.configs.scheduler, steps)

    def denoise(self, conditions: loop.Conditions, *, steps: int = 10, guidance: float = 3.0,
                key: jax.Array | None = None, noise: jax.Array | None = None,
                overlap: loop.Overlap | None = None) -> tuple[jax.Array, jax.Array]:
        """The denoising loop for one window: `(latents [1, F, C, h, w], overlap tails for the next window)`.

        `noise`: the initial latents (default: standard normal from `key`, in the compute dtype)."""
        key = jax.random.key(0) if key is None else key
        noise_key, scheduler_key = jax.random.split(key)
        shape = conditions.pose.shape
        if noise is None:
            noise = jax.random.normal(noise_key, shape, jnp.float32)
        noise = jnp.asarray(noise).astype(self.dtype)
        schedule = self.schedule(steps)
        if overlap is None:
            overlap = loop.Overlap.none(steps, noise, loop.overlap_latent_frames())
        # Every input replicated on the mesh: a fresh array and one a previous step or window returned then have the
        # same type, so every step and window reuse the compiled step.
        schedule, conditions, overlap, scheduler_key, scale, noise, state = jax.device_put(
            (schedule, conditions, overlap, scheduler_key, jnp.float32(guidance), noise, diffusion.init_state(noise)),
            jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec()))
        use_cfg = guidance > 1
        with self._on_mesh(), self._placed("transformer") as params:
            def run_step(latents: jax.Array, state: diffusion.State, index: jax.Array) -> tuple:
                return self._step(params, schedule, conditions, scale, overlap, scheduler_key, latents, state, index,
                                  use_cfg=use_cfg)

            return loop.denoise(run_step, noise, state, steps, on_step=self._step_listener)

    def decode(self, latents: jax.Array, progress: Callable[[int, int], None] | None = None, *,
               tiling: bool | str = "auto", frames: int | None = None) -> np.ndarray:
        """Latents `[1, F, C, h, w]` -> uint8 frames `[T, H, W, 3]` (VAE decode, `tiling` as `vae.decode`; diffusers'
        postprocessing), or only the first `frames` of them (fewer chunks decoded, the same numbers).
        `progress(done, total)` after each of the decoder's chunk calls (tiles × frame chunks)."""
        # In the reference's dtype and order (`1 / scaling_factor * latents`; then `cond.to_pixels`): in bf16 each
        # step rounds, and a level of output can depend on it.
        with self._on_mesh(), self._placed("vae") as params:
            z = cond.from_dit_layout((1 / self.configs.vae.scaling_factor) * latents.astype(self.dtype))
            video = vae.decode(self.networks.vae, params, z.astype(self.dtype), tiling=tiling, progress=progress,
                               frames=frames)
        return np.asarray(cond.to_pixels(video))[0]

    # --- whole videos -------------------------------------------------------------------------------------------------

    def frames(self, image: np.ndarray | str, driving: str | MotionTrack, *, steps: int = 10, guidance: float = 3.0,
               seed: int = 0, single_clip: bool = False, max_frames: int | None = None, landmarker: str | None = None,
               missing_face: str = "drop", report: Report | None = None, progress: bool = False,
               plan: "VideoPlan | None" = None, stages: Stages | None = None,
               seam: Interpolator | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """`(output frame, control frame)` pairs, one per 12-fps driving frame (47 with `single_clip`, as the
        reference's single-clip script), streamed window by window; `driving`: a video path or a `MotionTrack`.
        `report` is filled in as it goes. `plan`: from
        `plan_video` (then `image`, `driving`, `single_clip`, `max_frames`, `landmarker` and `missing_face` are not
        used). `stages` times the stages and shows them (default: a status line of its own when `progress`). `seam`:
        how windows join (`windows.stitch`; default: `flow` interpolation).

        Raises `NonFiniteLatents` (before decoding) when a window's latents hold NaN or Inf."""
        report = report if report is not None else Report()
        self.schedule(steps)  # a bad step count fails before any work
        own_stages = stages is None
        stages = Stages("animate", enabled=progress) if own_stages else stages
        report.stage_seconds = stages.seconds
        try:
            if plan is None:
                with stages("landmarks"):
                    plan = plan_video(self.configs, image, driving, single_clip=single_clip, max_frames=max_frames,
                                      landmarker=landmarker, missing_face=missing_face,
                                      progress=lambda done, total: stages.advance(done, total, "frames"))
            reference, motion = plan.reference, plan.motion
            report.reference, report.motion = reference, motion
            report.faces_found, report.missing_face = motion.faces_found, motion.missing_face
            report.frames_without_face = motion.frames_without_face

            window = self.configs.clip_frames - 1
            windows = (WindowPlan(num_driving=window, window=window, overlap=0) if plan.single_clip else
                       WindowPlan(num_driving=len(motion.order), window=window, overlap=loop.OVERLAP_FRAMES))
            report.windows = len(windows.starts)
            report.expected_frames = window + 1 - SINGLE_CLIP_DROP if plan.single_clip else len(motion.order)
            # Output frame j shows control frame j + SINGLE_CLIP_DROP of the clip (driving frame order[j + 1]), or j.
            shown = (motion.order[SINGLE_CLIP_DROP - 1:][:report.expected_frames] if plan.single_clip
                     else motion.order)
            report.sample_times = motion.sample_times[shown]
            pairs = self._windows(reference, motion, windows, steps, guidance, seed, stages)
            if plan.single_clip:
                decoded, control = next(pairs)
                pairs = zip(decoded[SINGLE_CLIP_DROP:], control[SINGLE_CLIP_DROP:])
            else:
                pairs = stitch(windows, pairs, seam=seam)
            for pair in pairs:
                report.frames += 1
                yield pair
        finally:
            self._step_listener = None
            if own_stages:
                stages.close()

    def _windows(self, reference: Reference, motion: MotionPlan, plan: WindowPlan, steps: int, guidance: float,
                 seed: int, stages: Stages) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Each window's decoded frames and control frames, both `[1 + window, H, W, 3]`."""
        from a1_jax.motion.pipeline import render_control

        count = len(plan.starts)
        with stages("conditions"):
            encoded = self.encode_reference(reference.canvas, reference.face)
        control = render_control(motion)
        first = next(control)  # the reference's own landmarks: frame 0 of every window
        driving: list[np.ndarray] = []  # rendered driving control frames from `base` on
        base, tails, key = 0, None, jax.random.key(seed)
        for k, start in enumerate(plan.starts):
            where = f"window {k + 1}/{count}: " if count > 1 else ""
            indices = plan.indices(start)
            with stages("conditions"):
                stages.note(where.rstrip(": "))
                while base + len(driving) <= indices[-1]:
                    driving.append(next(control))
                frames = np.stack([first] + [driving[i - base] for i in indices])
                window_key, image_key = jax.random.split(jax.random.fold_in(key, k))
                conditions = self.conditions(encoded, frames, image_key)
                jax.block_until_ready(conditions)
            with stages("denoise"):
                self._step_listener = lambda i: stages.advance(i + 1, steps, f"{where}steps".replace(": ", " · "))
                overlap = None if tails is None else loop.Overlap.after(tails)
                latents, tails = self.denoise(conditions, steps=steps, guidance=guidance, key=window_key,
                                              overlap=overlap)
                if not bool(jnp.isfinite(latents).all()):
                    raise NonFiniteLatents(f"the denoised latents of window {k + 1} of {count} hold NaN or Inf: the "
                                           "weights or the inputs are broken; nothing was decoded")
            with stages("decode"):
                # A short clip's or the last window's padding is never shown: its chunks are not decoded.
                decoded = self.decode(latents, progress=lambda done, total: stages.advance(
                    done, total, f"{where}chunks".replace(": ", " · ")), frames=plan.frames_shown(k))
            yield decoded, frames
            drop = max(0, min(plan.stride, len(driving)))  # the next window starts `stride` frames later
            driving, base = driving[drop:], base + drop

    def __call__(self, image: np.ndarray | str, driving: str | MotionTrack, *, steps: int = 10, guidance: float = 3.0,
                 seed: int = 0, single_clip: bool = False, max_frames: int | None = None,
                 landmarker: str | None = None, missing_face: str = "drop") -> np.ndarray:
        """The animated frames, uint8 `[N, H, W, 3]` at 12 fps (one per 12-fps driving frame with a face; 47 with
        `single_clip`)."""
        return np.stack([frame for frame, _ in self.frames(image, driving, steps=steps, guidance=guidance, seed=seed,
                                                           single_clip=single_clip, max_frames=max_frames,
                                                           landmarker=landmarker, missing_face=missing_face)])


@dataclasses.dataclass(frozen=True)
class VideoPlan:
    """The reference prepared and the driver's landmarks found: what the model needs before any network runs."""

    reference: Reference
    motion: MotionPlan
    single_clip: bool


def plan_video(configs: checkpoint.ModelConfigs, image: np.ndarray | str, driving: str | MotionTrack, *,
               single_clip: bool = False, max_frames: int | None = None, landmarker: str | None = None,
               missing_face: str = "drop", progress: bool | Callable[[int, int], None] = False) -> VideoPlan:
    """The canvas, the aligned face and the motion plan of a video or a motion track (it needs the configs only, so
    a bad portrait or driving video fails before any weights are loaded). The one place a motion source becomes a
    plan.

    `missing_face`: `drop` the driving frames without a face (the reference's long-video script) or `fill` them from
    their neighbours. `progress`: a bar on the terminal, or `progress(done, total)` per driving frame."""
    from a1_jax.motion.draw import CANVAS_HEIGHT, CANVAS_WIDTH
    from a1_jax.motion.pipeline import plan_driver

    if configs.canvas != (CANVAS_HEIGHT, CANVAS_WIDTH):
        raise UserError(f"this checkpoint's transformer expects {configs.canvas[0]}x{configs.canvas[1]} frames; the "
                        f"motion branch draws {CANVAS_HEIGHT}x{CANVAS_WIDTH} control frames")
    name, pixels = _image(image)
    driving = driving if isinstance(driving, MotionTrack) else os.fspath(driving)
    motion = plan_driver(pixels, driving, landmarker_path=landmarker,
                         max_frames=configs.clip_frames if single_clip else None, progress=progress,
                         reference_name=name, max_driving_frames=max_frames, missing_face=missing_face)
    return VideoPlan(reference=_aligned(motion.reference.canvas, name, landmarker), motion=motion,
                     single_clip=single_clip)


def _aligned(canvas: np.ndarray, name: str, landmarker: str | None) -> Reference:
    """The canvas with its aligned 512×512 face crop (the reference's 5-point similarity fit)."""
    from a1_jax.motion import face_align

    return Reference(canvas=canvas, face=face_align.align_face(canvas, name, landmarker)[0])


def _image(image: np.ndarray | str | os.PathLike) -> tuple[str, np.ndarray]:
    """(name for messages, RGB uint8 pixels) of an image path or array."""
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image), read_image(os.fspath(image))
    return "the reference image", np.asarray(image)


# At the release geometry the compiled estimates put a stage's own memory (at most ~8.5 GB: the pose guider's chunks)
# under all the parameters (13.6 GB in bf16); counting a stage as large as the parameters leaves room for what an
# estimate does not model (allocator, workspaces).
def wants_offload(offload: bool | str, params_per_device: dict[Any, int]) -> bool:
    """`offload` itself (True/False, or `--offload`'s words "on"/"off"), or for "auto": on where a device's parameters
    plus the largest stage, taken as large as the parameters, exceed its memory (`memory_stats()["bytes_limit"]`); off
    where the backend has no limit (CPU)."""
    if isinstance(offload, bool) or offload in ("on", "off"):
        return offload in (True, "on")
    if offload != "auto":
        raise UserError(f"--offload must be on, off or auto; got {offload!r}")
    for device, held in params_per_device.items():
        stats = device.memory_stats() if device.platform != "cpu" else None
        if stats and "bytes_limit" in stats and 2 * held > stats["bytes_limit"]:
            return True
    return False


def _to_host(tree: Any) -> Any:
    """`tree` in host memory: pinned host memory of its own devices where the backend has it, else NumPy."""
    def one(x: jax.Array) -> Any:
        if all("pinned_host" in {m.kind for m in d.addressable_memories()} for d in x.sharding.device_set):
            return jax.device_put(x, x.sharding.with_memory_kind("pinned_host"))
        return np.asarray(x)

    return jax.tree_util.tree_map(one, tree)


def _mesh(mesh: str | None) -> tuple[jax.sharding.Mesh, parallel.Rules]:
    """A preset name or path (None: one device) -> (Mesh, logical rules)."""
    preset = parallel.load_preset(mesh or "single")
    devices = jax.devices()[:1] if mesh in (None, "single") else None
    return parallel.make_mesh(preset, devices), preset.rules
