"""The latent cache: `a1-jax make-dataset --latents CHECKPOINT` encodes training windows once with the frozen
encoders, so training reads latents instead of running the VAE, the pose guider and SigLIP every step.

    a1-jax make-dataset --videos DIR --out DATA --latents CHECKPOINT --frames 9 --height 96 --width 144
    a1-jax make-dataset --out DATA --latents CHECKPOINT --frames 9 --height 96 --width 144   # add to a dataset

The window is fixed when the cache is made (the VAE and the pose guider are causal over time, so a sub-window's
latents are not a slice of a longer window's): each clip of N frames gives the windows `[0, s, …, s+T−2]` for
s = 1, T, 2T−1, … (non-overlapping, frame 0 = the reference in each, as `pipeline.clip_window` draws them), one record
each, frames resized to H×W as the frame pipeline does. Shards sit in `DATA/a1_clips/latents/1.0.0/`; `index.json`
gains a `latents` block (window, shapes, record count, shards, the checkpoint and a fingerprint of its encoders,
which the trainer checks against the model it trains). The shards are written under a temporary name and renamed,
and the index is written last: an interrupted run leaves nothing a reader sees, and the same command starts over
(on a finished cache it reports the cache). A record (`tf.train.Example`) holds raw little-endian float16 arrays, channels-last
(`conditions.window_conditions`):

    video_latent   [F, h, w, 2C]  posterior moments (mean | logvar) of the window: training samples x₀ from them
    image_latent   [1, h, w, 2C]  posterior moments of the reference frame after pixel noise, drawn once per record
                                  (σ = exp(N(−3, 0.5)), seeded by `--seed` and the record number)
    pose_latents   [F, h, w, C]   pose-guider mode × its scaling factor
    face_tokens    [N, D]         SigLIP tokens of the aligned face
    source, clip_index, clip (record number of the clip), frames (clip frames of the window)

The encoders run in fp32 on one device, one window at a time. `latent_dataset` batches the records like
`pipeline.training_dataset` batches frames (shuffle, repeat, face-dropout flag from the seed and the stream position,
host slicing, batching; the same checkpointable iterator).
"""

from __future__ import annotations

import hashlib
import os
import time

import numpy as np

from a1_jax.errors import UserError
from a1_jax.train.data import records
from a1_jax.train.data.pipeline import FACE_DROPOUT, decode_window, host_batches

CONFIG = "latents"  # the TFDS config name of latent records (shards under DATA/a1_clips/latents/1.0.0/)
DTYPE = np.float16
# A record's arrays and the `conditions.window_conditions` field each holds (the batch field the trainer reads).
FIELDS = {"video_latent": "video", "image_latent": "image", "pose_latents": "pose", "face_tokens": "face"}
ARRAYS = tuple(FIELDS)
PIXEL_NOISE = (-3.0, 0.5)  # log-σ mean and std of the reference frame's pixel noise


def shard_dir(data_dir: str) -> str:
    return os.path.join(data_dir, records.DATASET_NAME, CONFIG, records.VERSION)


def window_starts(num_frames: int, frames: int) -> list[int]:
    """Starts s of the non-overlapping windows `[0, s, …, s+frames−2]` of an N-frame clip."""
    return list(range(1, num_frames - frames + 2, frames - 1))


def encoder_fingerprint(params: dict, mesh=None) -> str:
    """A hash of the VAE's, the pose guider's and SigLIP's params (each leaf's path, shape and first 1024 values as
    fp32): it tells whether a cache was made with the encoders of the model being trained, without reading all of
    them. `mesh`: the one `params` are sharded over (every process gets the same hash). It also names the VAE's
    tiling rule ("auto"): a cache encoded under another rule (older versions tiled every frame larger than a tile)
    holds other latents for the same weights."""
    import jax.numpy as jnp
    from flax import traverse_util

    from a1_jax import parallel

    leaves = {"/".join((name,) + path): leaf for name in ("vae", "pose_guider", "siglip")
              for path, leaf in sorted(traverse_util.flatten_dict(params[name]).items())}
    heads = parallel.gather(lambda tree: {k: v.reshape(-1)[:1024].astype(jnp.float32) for k, v in tree.items()},
                            leaves, mesh)
    digest = hashlib.sha256(b"vae tiling: auto")
    for name in leaves:
        digest.update(name.encode() + str(tuple(leaves[name].shape)).encode() + np.asarray(heads[name]).tobytes())
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------------- records
def serialize(arrays: dict[str, np.ndarray], *, source: str, clip_index: int, clip: int, frames: np.ndarray) -> bytes:
    example = records._example_class()()
    feature = example.features.feature
    for name in ARRAYS:
        feature[name].bytes_list.value.append(np.ascontiguousarray(arrays[name], DTYPE).tobytes())
    feature["source"].bytes_list.value.append(source.encode("utf-8"))
    feature["clip_index"].int64_list.value.append(int(clip_index))
    feature["clip"].int64_list.value.append(int(clip))
    feature["frames"].int64_list.value.extend(int(i) for i in frames)
    return example.SerializeToString(deterministic=True)


def parse(data: bytes, shapes: dict[str, list[int]]) -> dict[str, np.ndarray]:
    """A latent record's arrays (float32, shapes from the index) and its clip number."""
    feature = records._example_class().FromString(data).features.feature
    out = {name: np.frombuffer(feature[name].bytes_list.value[0], DTYPE).reshape(shapes[name]).astype(np.float32)
           for name in ARRAYS}
    out["clip"] = np.int64(feature["clip"].int64_list.value[0])
    out["frames"] = np.array(feature["frames"].int64_list.value, np.int64)
    return out


# -------------------------------------------------------------------------------------------------------- writer
def make_latents(data_dir: str, checkpoint: str, *, frames: int, height: int, width: int, seed: int = 0,
                 progress: bool = False) -> dict:
    """Adds the latent cache of window T×H×W to the dataset folder `data_dir`, encoded by `checkpoint`'s encoders.

    The shards are written under a temporary name and renamed, then the index gains its `latents` block: an
    interrupted run leaves no block, and the same call again starts over. The same call on a folder whose cache
    it made reports that cache; another window or checkpoint is a `UserError`."""
    import jax
    import jax.numpy as jnp

    from a1_jax import conditions
    from a1_jax.train.data.writer import CLIPS_PER_SHARD, ShardWriter
    from a1_jax.weights import checkpoint as ckpt

    start_time = time.perf_counter()
    index = records.read_index(data_dir)
    if (frames - 1) % 4 or frames < 5 or height % 8 or width % 8:
        raise UserError(f"the cached window must have 1 + 4k (k >= 1) frames and a size divisible by 8; got "
                        f"{frames}x{height}x{width}")
    request = {"frames": frames, "height": height, "width": width, "seed": seed,
               "checkpoint": os.path.abspath(checkpoint)}
    block = index.get("latents")
    if block is not None:
        if {key: block.get(key) for key in request} != request:
            raise UserError(f"{data_dir} already has a latent cache of another window, seed or checkpoint "
                            f"({block['frames']}x{block['height']}x{block['width']}, seed {block['seed']}, "
                            f"{block['checkpoint']}): make the dataset again to change it")
        return {**_summary(block, time.perf_counter() - start_time), "existing": True}
    configs = ckpt.ModelConfigs.from_folder(checkpoint)
    networks = ckpt.build_networks(configs, jnp.float32)
    params = ckpt.load_params(checkpoint, networks)
    params.pop("transformer")  # only the encoders are needed
    clips = [(number, entry) for number, entry in enumerate(index["clips"]) if entry["frames"] >= frames]
    if not clips:
        raise UserError(f"no clip in {data_dir} has {frames} frames: cache a shorter window")

    from array_record.python.array_record_data_source import ArrayRecordDataSource

    source = ArrayRecordDataSource(records.shard_paths(data_dir, index))
    writer = ShardWriter(shard_dir(data_dir), CLIPS_PER_SHARD)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(clips), desc="latents", unit="clip", disable=None)
    key, shapes, count = jax.random.key(seed), None, 0
    for number, entry in clips:
        record = records.parse_clip(source[number])
        face = jnp.asarray(conditions.face_pixels(records.decode_image(record.face)[None], configs.siglip.image_size))
        for start in window_starts(record.num_frames, frames):
            picks = np.concatenate([[0], np.arange(start, start + frames - 1)]).astype(np.int64)
            video, control = decode_window(record, picks, height, width)
            encoded = conditions.window_conditions(networks, params, jnp.asarray(video[None]),
                                                   jnp.asarray(control[None]), face,
                                                   jax.random.fold_in(key, count)[None], pixel_noise=PIXEL_NOISE,
                                                   dtype=jnp.float32)
            arrays = {name: np.asarray(encoded[field][0]) for name, field in FIELDS.items()}
            shapes = {name: list(value.shape) for name, value in arrays.items()}
            writer.write(serialize(arrays, source=record.source, clip_index=record.clip_index, clip=number,
                                   frames=picks))
            count += 1
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    index["latents"] = {"config": CONFIG, **request, "dtype": "float16", "records": count, "shapes": shapes,
                        "shards": writer.close(data_dir), "pixel_noise": list(PIXEL_NOISE),
                        "fingerprint": encoder_fingerprint(params)}
    records.write_index(data_dir, index)
    return _summary(index["latents"], time.perf_counter() - start_time)


def _summary(block: dict, seconds: float) -> dict:
    total = sum(shard["bytes"] for shard in block["shards"])
    return {"latent_records": block["records"], "latent_bytes": total,
            "bytes_per_record": round(total / max(block["records"], 1)),
            "window": [block["frames"], block["height"], block["width"]], "latent_seconds": round(seconds, 3)}


def run_make_latents(args) -> dict:
    """`a1-jax make-dataset --latents CHECKPOINT`: frames first when `--videos` is given, then the cache."""
    from a1_jax.train.data.writer import run_make_dataset

    missing = [flag for flag, value in (("--frames", args.frames), ("--height", args.height),
                                        ("--width", args.width)) if value is None]
    if missing:
        raise UserError(f"--latents needs the cached window: give {', '.join(missing)}")
    summary = {"out": args.out, "ok": True}
    if args.videos is not None:
        summary = run_make_dataset(args)
        if not summary["ok"]:
            return summary
    elif not os.path.isfile(os.path.join(args.out, records.INDEX_FILE)):
        raise UserError(f"{args.out} is not a dataset folder: give --videos to make one, then its latent cache")
    summary.update(make_latents(args.out, args.latents, frames=args.frames, height=args.height, width=args.width,
                                seed=args.seed, progress=True))
    return summary


# ------------------------------------------------------------------------------------------------------ pipeline
def latent_window(data_dir: str) -> tuple[int, int, int] | None:
    """(frames, height, width) of the folder's latent cache, or None."""
    block = records.read_index(data_dir).get("latents")
    return None if block is None else (block["frames"], block["height"], block["width"])


class LatentSource:
    """Random access to the latent records: `(record number, bytes)`."""

    def __init__(self, paths: list[str]):
        import grain

        self._records = grain.sources.ArrayRecordDataSource(paths)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, position: int) -> tuple[int, bytes]:
        return position, self._records[position]


def latent_dataset(data_dir: str, *, batch_size: int, seed: int, face_dropout: float = FACE_DROPOUT,
                   shard_index: int | None = None, shard_count: int | None = None, num_epochs: int | None = None,
                   read_threads: int = 4):
    """The batches of this host from the latent cache (a `grain.IterDataset`): `video`, `image`, `pose`, `face`
    (float32, shapes of the index), `drop_face` [B] bool, `clip` [B], `frames` [B, T], `position` [B]. Order as
    `pipeline.training_dataset`."""
    import grain

    index = records.read_index(data_dir)
    block = index.get("latents")
    if block is None:
        raise UserError(f"{data_dir} has no latent cache: make one with `a1-jax make-dataset --latents CHECKPOINT`")
    if not 0.0 <= face_dropout <= 1.0:
        raise UserError(f"face dropout must be a probability in [0, 1], got {face_dropout}")
    paths = [os.path.join(data_dir, shard["path"]) for shard in block["shards"]]
    for path in paths:
        if not os.path.isfile(path):
            raise UserError(f"latent shard missing: {path} (listed in {os.path.join(data_dir, records.INDEX_FILE)})")
    shapes = block["shapes"]

    def example(item, rng):
        number, data = item
        arrays = parse(data, shapes)
        return {**{field: arrays[name] for name, field in FIELDS.items()},
                "drop_face": np.bool_(rng.random() < face_dropout), "clip": arrays["clip"], "frames": arrays["frames"]}

    ds = grain.MapDataset.source(LatentSource(paths)).seed(seed).shuffle().repeat(num_epochs).random_map(example)
    ds = host_batches(ds, batch_size=batch_size, shard_index=shard_index, shard_count=shard_count)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=read_threads))
