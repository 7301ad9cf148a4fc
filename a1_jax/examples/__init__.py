"""The example inputs shipped with the package, so a fresh install can animate at once (`a1-jax animate --example`).

Both are public domain (provenance and how they were made: `LICENSES.md` beside this file, `tools/make_examples.py`):

* `portrait_path()`: NASA's portrait of astronaut Eileen Collins (scikit-image's `astronaut.png`), its top 512×341;
* `driving_path()`: a 4-second talking close-up made from the same photograph (24 fps, 288×288, speech audio):
  48 frames at 12 fps, one window of the release's clips.
"""

from __future__ import annotations

import os

_FOLDER = os.path.dirname(os.path.abspath(__file__))


def portrait_path() -> str:
    """The example portrait (PNG)."""
    return os.path.join(_FOLDER, "portrait.png")


def driving_path() -> str:
    """The example driving video (mp4 with an AAC speech track)."""
    return os.path.join(_FOLDER, "driving.mp4")
