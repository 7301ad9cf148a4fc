"""Clip records and the dataset folder: one training clip per ArrayRecord record, plus a JSON index.

A dataset folder (written by `a1-jax make-dataset --out DIR`):

    DIR/index.json                                                      what the folder holds (`read_index`)
    DIR/a1_clips/frames/1.0.0/a1_clips-train.array_record-00000-of-000NN  the clips, in index order

The shards sit where TFDS looks for the `a1_clips` builder's `frames` config under `data_dir=DIR`, so
`tfds.data_source("a1_clips", data_dir=DIR)` reads these very files (`tfds_builder.py`).

A record is one clip: N (13 ≤ N ≤ 49) consecutive 12-fps frames of one video on the 480×720 canvas. Its frame 0
is the reference frame, the training mirror of inference, where frame 0 of the control video and of the output is
the reference. Fields of the `tf.train.Example` (the proto TFDS decodes without TensorFlow; protobuf is already
installed with mediapipe, so the message class is built here from its descriptor, in a private pool):

    video          bytes × N   JPEG (quality 95) RGB canvas frames; frame 0 is the reference frame
    control        bytes × N   PNG control frames, lossless so the spec's colours stay exact: frame 0 = the
                               reference's own 2-D landmarks, frame t = frame t's face retargeted onto the reference
    face           bytes       JPEG 512×512 aligned face crop of the reference frame (SigLIP's input)
    source         bytes       UTF-8 path of the video, relative to `--videos`
    clip_index     int64       the clip's number within its video
    frame_indices  int64 × N   source-video frame index of each frame

Later formats add fields (the latent cache: `image_latent`, `pose_latents`, `face_tokens`) under a new TFDS config;
`index.json` names the fields a folder's records carry.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Sequence

import numpy as np

from a1_jax.errors import UserError

DATASET_NAME = "a1_clips"  # the TFDS builder's registered name
CONFIG = "frames"  # the TFDS config of records holding frames (no latents)
VERSION = "1.0.0"  # format version: the TFDS version, and `index.json`'s "version"
SPLIT = "train"
INDEX_FILE = "index.json"
INDEX_FORMAT = "a1_jax.clips"
JPEG_QUALITY = 95
FIELDS = ("video", "control", "face", "source", "clip_index", "frame_indices")


@functools.lru_cache(maxsize=None)
def _example_class():
    """tensorflow.Example's message class (BytesList/FloatList/Int64List, Feature, Features map, Example)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    field = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(name="a1_jax/example.proto", package="tensorflow", syntax="proto3")

    def message(container, name: str, *fields: tuple[str, int, int, str]):
        proto = container.add(name=name)
        for number, (field_name, kind, label, type_name) in enumerate(fields, start=1):
            proto.field.add(name=field_name, number=number, type=kind, label=label, type_name=type_name or None)
        return proto

    optional, repeated = field.LABEL_OPTIONAL, field.LABEL_REPEATED
    message(file.message_type, "BytesList", ("value", field.TYPE_BYTES, repeated, ""))
    message(file.message_type, "FloatList", ("value", field.TYPE_FLOAT, repeated, ""))
    message(file.message_type, "Int64List", ("value", field.TYPE_INT64, repeated, ""))
    feature = message(file.message_type, "Feature",
                      ("bytes_list", field.TYPE_MESSAGE, optional, ".tensorflow.BytesList"),
                      ("float_list", field.TYPE_MESSAGE, optional, ".tensorflow.FloatList"),
                      ("int64_list", field.TYPE_MESSAGE, optional, ".tensorflow.Int64List"))
    feature.oneof_decl.add(name="kind")
    for member in feature.field:
        member.oneof_index = 0
    features = message(file.message_type, "Features",
                       ("feature", field.TYPE_MESSAGE, repeated, ".tensorflow.Features.FeatureEntry"))
    entry = message(features.nested_type, "FeatureEntry", ("key", field.TYPE_STRING, optional, ""),
                    ("value", field.TYPE_MESSAGE, optional, ".tensorflow.Feature"))
    entry.options.map_entry = True
    message(file.message_type, "Example", ("features", field.TYPE_MESSAGE, optional, ".tensorflow.Features"))
    pool = descriptor_pool.DescriptorPool()  # private: never clashes with TFDS's or TensorFlow's own Example
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.Example"))


# ------------------------------------------------------------------------------------------------------ images
def encode_jpeg(image: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    import cv2

    ok, data = cv2.imencode(".jpg", np.ascontiguousarray(image[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok, "OpenCV could not encode a JPEG"
    return data.tobytes()


def encode_png(image: np.ndarray) -> bytes:
    import cv2

    ok, data = cv2.imencode(".png", np.ascontiguousarray(image[..., ::-1]))
    assert ok, "OpenCV could not encode a PNG"
    return data.tobytes()


def decode_image(data: bytes) -> np.ndarray:
    """An encoded JPEG/PNG as RGB uint8 `[H, W, 3]` (OpenCV, as TFDS's NumPy decoder does)."""
    import cv2

    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError("not a decodable image record field")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


# ----------------------------------------------------------------------------------------------------- records
@dataclasses.dataclass(frozen=True)
class ClipRecord:
    """One clip as stored: frames still encoded, so a reader decodes only the frames it picks."""

    video: Sequence[bytes]  # N JPEG canvas frames
    control: Sequence[bytes]  # N PNG control frames
    face: bytes  # JPEG aligned face crop
    source: str
    clip_index: int
    frame_indices: np.ndarray  # [N] int64

    @property
    def num_frames(self) -> int:
        return len(self.video)


def serialize_clip(clip: ClipRecord) -> bytes:
    example = _example_class()()
    feature = example.features.feature
    feature["video"].bytes_list.value.extend(clip.video)
    feature["control"].bytes_list.value.extend(clip.control)
    feature["face"].bytes_list.value.append(clip.face)
    feature["source"].bytes_list.value.append(clip.source.encode("utf-8"))
    feature["clip_index"].int64_list.value.append(int(clip.clip_index))
    feature["frame_indices"].int64_list.value.extend(int(i) for i in clip.frame_indices)
    return example.SerializeToString(deterministic=True)


def parse_clip(data: bytes) -> ClipRecord:
    feature = _example_class().FromString(data).features.feature
    return ClipRecord(video=list(feature["video"].bytes_list.value), control=list(feature["control"].bytes_list.value),
                      face=feature["face"].bytes_list.value[0],
                      source=feature["source"].bytes_list.value[0].decode("utf-8"),
                      clip_index=int(feature["clip_index"].int64_list.value[0]),
                      frame_indices=np.array(feature["frame_indices"].int64_list.value, np.int64))


# ------------------------------------------------------------------------------------------------------- index
def dataset_dir(data_dir: str) -> str:
    """Where the shards live: TFDS's `<data_dir>/<name>/<config>/<version>`."""
    return os.path.join(data_dir, DATASET_NAME, CONFIG, VERSION)


def shard_name(shard: int, num_shards: int) -> str:
    """TFDS's default file template `{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}`."""
    return f"{DATASET_NAME}-{SPLIT}.array_record-{shard:05d}-of-{num_shards:05d}"


def write_index(data_dir: str, index: dict) -> None:
    """Written last and atomically: a folder with an index is a complete dataset."""
    path = os.path.join(data_dir, INDEX_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(index, f, indent=1)
    os.replace(path + ".tmp", path)


def read_index(data_dir: str) -> dict:
    """The index of a dataset folder; UserError if the folder is not a complete dataset of this format."""
    path = os.path.join(data_dir, INDEX_FILE)
    if not os.path.isfile(path):
        raise UserError(f"{data_dir} is not a dataset folder (no {INDEX_FILE}): make one with `a1-jax make-dataset`")
    try:
        with open(path) as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT or index.get("version") != VERSION:
        raise UserError(f"{path} is not an {INDEX_FORMAT} index of version {VERSION}: remake the dataset with "
                        "this version's `a1-jax make-dataset`")
    return index


def shard_paths(data_dir: str, index: dict) -> list[str]:
    """The shard files of an index, in clip order; UserError naming the first one that is missing."""
    paths = [os.path.join(data_dir, shard["path"]) for shard in index["shards"]]
    for path in paths:
        if not os.path.isfile(path):
            raise UserError(f"dataset shard missing: {path} (listed in {os.path.join(data_dir, INDEX_FILE)})")
    return paths
