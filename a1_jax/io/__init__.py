"""Video and image files: decoding, 12 fps resampling, writing."""

from a1_jax.io.video import (TARGET_FPS, VideoInfo, VideoWriter, probe_video, read_frames, read_image,
                             resample_indices, write_png, write_video)

__all__ = ["TARGET_FPS", "VideoInfo", "VideoWriter", "probe_video", "read_frames", "read_image", "resample_indices",
           "write_png", "write_video"]
