"""Grain input pipeline over a clip dataset folder: shuffled, windowed, decoded, batched, sharded per host.

    dataset = training_dataset(DATA_DIR, batch_size=2, frames=9, height=64, width=96, seed=0)
    iterator = iter(dataset)
    batch = next(iterator)
    state = iterator.get_state()   # a JSON-able dict: save it with the checkpoint
    iterator.set_state(state)      # on a fresh iterator of the same dataset: the batches go on exactly

Batches are dicts of NumPy arrays:

    video      [B, T, H, W, 3] float32 in [-1, 1]   target frames; frame 0 is the clip's reference frame
    control    [B, T, H, W, 3] float32 in [-1, 1]   control frames; frame 0 is the reference's own landmarks
    face       [B, 512, 512, 3] uint8              aligned face crop of the reference (SigLIP preprocessing is the
                                                   trainer's)
    drop_face  [B] bool                            face-token dropout: the trainer zeros this example's face tokens
    clip       [B] int64                           the clip's record number in the folder (its `index.json` entry)
    frames     [B, T] int64                        the clip frames used: 0, then s, s+1, …, s+T-2
    position   [B] uint32                          the example's position in the global stream (mod 2^32): the
                                                   trainer draws the example's noise from it

Window. Frame 0 (the reference, as at inference) and the T-1 consecutive frames from s ~ U{1, …, N-T+1} of an
N-frame clip; clips shorter than T are left out before shuffling (their lengths are in `index.json`). Frames are
resized to H×W, area for RGB and nearest for control frames, so a control pixel keeps a colour of the spec. Values
are `uint8 / 255 * 2 - 1`, the reference pipeline's `/255` then normalise to [-1, 1].

Order and randomness. One global stream serves all hosts: records shuffled, reshuffled every epoch (grain's
`shuffle` then `repeat`); each element's window and dropout flag drawn from the seed and its position in the stream
(`random_map`), its position recorded; then host i of n takes stream positions i, i+n, i+2n, … (`ds[i::n]`,
i = `jax.process_index()`, n = `jax.process_count()` by default) and batches them. The stream is the same whatever
the number of hosts, hosts see disjoint elements, and together they cover every epoch. Batching happens before the
iterator, so grain's read threads and optional worker processes (`worker_count`) prefetch whole batches: the
batches do not depend on either.
Worker processes need the main script's `if __name__ == "__main__":` guard; the default is none (threads only).

Checkpointing: `get_state()` / `set_state()` on the iterator, or the iterator as an Orbax item through
`grain.checkpoint.CheckpointSave(iterator)` / `CheckpointRestore(iterator)`.
"""

from __future__ import annotations

import numpy as np

from a1_jax.errors import UserError
from a1_jax.train.data import records

FACE_DROPOUT = 0.1  # default face-token dropout probability (the reference trains with one; its rate is unknown)


class ClipSource:
    """Random access to the records of the clips `clip_ids` (record numbers in the folder): `(clip_id, bytes)`."""

    def __init__(self, paths: list[str], clip_ids: np.ndarray):
        import grain

        self._records = grain.sources.ArrayRecordDataSource(paths)
        self.clip_ids = np.asarray(clip_ids, np.int64)

    def __len__(self) -> int:
        return len(self.clip_ids)

    def __getitem__(self, position: int) -> tuple[int, bytes]:
        clip = int(self.clip_ids[position])
        return clip, self._records[clip]


def _resize(image: np.ndarray, height: int, width: int, interpolation: int) -> np.ndarray:
    import cv2

    if image.shape[:2] == (height, width):
        return image
    return cv2.resize(image, (width, height), interpolation=interpolation)


def _to_signed(frames: np.ndarray) -> np.ndarray:
    return frames.astype(np.float32) / 255.0 * 2.0 - 1.0


def clip_window(record: records.ClipRecord, rng: np.random.Generator, frames: int) -> np.ndarray:
    """Clip frames of one training window: `[0, s, s+1, …, s+frames-2]`, s uniform in `[1, N-frames+1]`."""
    start = int(rng.integers(1, record.num_frames - frames + 2))
    return np.concatenate([[0], np.arange(start, start + frames - 1)]).astype(np.int64)


def make_example(item: tuple[int, bytes], rng: np.random.Generator, *, frames: int, height: int, width: int,
                 face_dropout: float) -> dict:
    """One training example (the fields of a batch, without the batch axis) from `(clip_id, record bytes)`."""
    clip, data = item
    record = records.parse_clip(data)
    picks = clip_window(record, rng, frames)
    drop_face = bool(rng.random() < face_dropout)
    video, control = decode_window(record, picks, height, width)
    return {"video": video, "control": control, "face": records.decode_image(record.face),
            "drop_face": np.bool_(drop_face), "clip": np.int64(clip), "frames": picks}


def decode_window(record: records.ClipRecord, picks: np.ndarray, height: int, width: int) -> tuple[np.ndarray,
                                                                                                     np.ndarray]:
    """The clip frames `picks` as float32 `[T, H, W, 3]` in [-1, 1]: video (area resize), control (nearest)."""
    import cv2

    video = np.stack([_resize(records.decode_image(record.video[i]), height, width, cv2.INTER_AREA) for i in picks])
    control = np.stack([_resize(records.decode_image(record.control[i]), height, width, cv2.INTER_NEAREST)
                        for i in picks])
    return _to_signed(video), _to_signed(control)


def host_batches(ds, *, batch_size: int, shard_index: int | None, shard_count: int | None):
    """The stream `ds` (a `MapDataset` of example dicts) with each example's `position`, host `shard_index`'s share
    (positions shard_index, shard_index + shard_count, …; default: this JAX process of all), batched."""
    if shard_index is None or shard_count is None:
        import jax

        shard_index, shard_count = jax.process_index(), jax.process_count()
    if not 0 <= shard_index < shard_count:
        raise UserError(f"shard index {shard_index} is not in [0, {shard_count})")
    ds = ds.map_with_index(lambda position, example: {**example, "position": np.uint32(position % 2 ** 32)})
    return ds[shard_index::shard_count].batch(batch_size, drop_remainder=True)


def training_dataset(data_dir: str, *, batch_size: int, frames: int, height: int, width: int, seed: int,
                     face_dropout: float = FACE_DROPOUT, shard_index: int | None = None,
                     shard_count: int | None = None, num_epochs: int | None = None, read_threads: int = 4,
                     worker_count: int = 0):
    """The batches of this host (a `grain.IterDataset`; `iter()` it for a checkpointable iterator).

    `batch_size`: this host's batch. `frames`/`height`/`width`: the training window T×H×W. `seed`: one integer in
    [0, 2**32) seeds the shuffle, windows and dropout. `num_epochs=None` repeats forever (training); a number
    stops after that many passes over the global stream (the last incomplete batch dropped). `shard_index`/
    `shard_count` default to this JAX process and the number of processes.
    """
    import grain

    index = records.read_index(data_dir)
    if batch_size < 1 or height < 1 or width < 1:
        raise UserError(f"batch size, height and width must be positive, got {batch_size}, {height}, {width}")
    if not 2 <= frames <= index["clip_frames"]:
        raise UserError(f"a training window needs 2 to {index['clip_frames']} frames (the reference and at least "
                        f"one more), got {frames}")
    if not 0.0 <= face_dropout <= 1.0:
        raise UserError(f"face dropout must be a probability in [0, 1], got {face_dropout}")
    lengths = np.array([clip["frames"] for clip in index["clips"]], np.int64)
    eligible = np.flatnonzero(lengths >= frames)
    if not len(eligible):
        raise UserError(f"no clip in {data_dir} has {frames} frames (longest: {lengths.max(initial=0)}): train "
                        "with fewer frames or add longer videos")

    ds = grain.MapDataset.source(ClipSource(records.shard_paths(data_dir, index), eligible)).seed(seed)
    ds = ds.shuffle().repeat(num_epochs)

    def example(item, rng):
        return make_example(item, rng, frames=frames, height=height, width=width, face_dropout=face_dropout)

    ds = host_batches(ds.random_map(example), batch_size=batch_size, shard_index=shard_index, shard_count=shard_count)
    iterable = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=read_threads))
    if worker_count > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; our CLI parses with argparse: defaults
            flags.FLAGS.mark_as_parsed()
        iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iterable
