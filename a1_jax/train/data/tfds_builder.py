"""A TFDS builder over `a1-jax make-dataset` folders: the same shards, read with `tfds.data_source`, no TensorFlow.

    import tensorflow_datasets as tfds
    import a1_jax.train.data.tfds_builder  # registers "a1_clips"

    clips = tfds.data_source("a1_clips", data_dir=DIR, split="train")
    clip = clips[0]  # video: N × [480, 720, 3] uint8, control: N × [480, 720, 3], face: [512, 512, 3], source, ...

Nothing is generated or copied. `download_and_prepare` (which `tfds.data_source` calls) writes TFDS's metadata
(`dataset_info.json`, `features.json`) beside the shards the first time, from the folder's `index.json`; every later
call finds it and reads. Pass `download=False` once the metadata exists (e.g. on a read-only copy).

Without TensorFlow, TFDS decodes `tf.train.Example` records with NumPy: `Image` (OpenCV), a `Sequence` of images (a
list of arrays), `Scalar`, `Tensor` and `Text` (bytes) all work. `tfds.features.Video`, `as_dataset()` and
`write_metadata(check_data=True)` need TensorFlow and are not used. TFDS is only needed by users of this module.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from a1_jax.errors import UserError
from a1_jax.motion.draw import CANVAS_HEIGHT, CANVAS_WIDTH
from a1_jax.motion.face_align import FACE_SIZE
from a1_jax.train.data import records


def clip_features() -> tfds.features.FeaturesDict:
    """The record fields of `records` as TFDS features (keys and encodings as the writer stores them)."""
    canvas = (CANVAS_HEIGHT, CANVAS_WIDTH, 3)
    return tfds.features.FeaturesDict({
        "video": tfds.features.Sequence(tfds.features.Image(shape=canvas, encoding_format="jpeg")),
        "control": tfds.features.Sequence(tfds.features.Image(shape=canvas, encoding_format="png")),
        "face": tfds.features.Image(shape=(FACE_SIZE, FACE_SIZE, 3), encoding_format="jpeg"),
        "source": tfds.features.Text(),
        "clip_index": tfds.features.Scalar(np.int64),
        "frame_indices": tfds.features.Tensor(shape=(None,), dtype=np.int64),
    })


class A1Clips(tfds.core.GeneratorBasedBuilder):
    """SkyReels-A1 training clips: canvas frames, control frames and the reference's face crop (see `records`)."""

    VERSION = tfds.core.Version(records.VERSION)
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=records.CONFIG,
                                               description="frames, control frames and the aligned face crop")]

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(features=clip_features(),
                                              description="Clips written by `a1-jax make-dataset` (a1_jax).")

    def download_and_prepare(self, *, download_dir=None, download_config=None, file_format=None) -> None:
        """Adds TFDS's metadata beside the shards `a1-jax make-dataset` wrote (once); nothing is downloaded."""
        if not (self.data_path / "dataset_info.json").exists():
            index = records.read_index(os.fspath(self.data_dir_root))
            records.shard_paths(os.fspath(self.data_dir_root), index)  # all present, or a UserError naming one
            template = tfds.core.ShardedFileTemplate(data_dir=self.data_path, dataset_name=records.DATASET_NAME,
                                                     split=records.SPLIT, filetype_suffix="array_record")
            split = tfds.core.SplitInfo(name=records.SPLIT, shard_lengths=[shard["clips"] for shard in index["shards"]],
                                        num_bytes=sum(shard["bytes"] for shard in index["shards"]),
                                        filename_template=template)
            self.info.set_file_format("array_record", override=True)  # the builder defaults to tfrecord
            self.info.set_splits(tfds.core.SplitDict([split]))
            self.info.write_to_directory(self.data_path)
        self.info.read_from_directory(self.data_path)

    def _split_generators(self, dl_manager):
        raise UserError("a1_clips data are written by `a1-jax make-dataset --videos DIR --out DATA_DIR`")

    def _generate_examples(self):
        raise UserError("a1_clips data are written by `a1-jax make-dataset --videos DIR --out DATA_DIR`")
