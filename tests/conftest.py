"""Test setup: 8 simulated CPU devices for sharding tests (must precede any jax import), fp32 matmuls, asset paths."""

import os
import pathlib
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One compilation cache per test session (subprocesses inherit it): the CLI runs and Animators the tests build
# compile the same programs again and again.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="a1_jax_xla_cache_"))

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared() -> pathlib.Path:
    """`../shared` beside the checkout: real portraits, driving videos and the MediaPipe model. Read in place."""
    assert SHARED.is_dir(), f"test assets expected at {SHARED}"
    return SHARED


@pytest.fixture(scope="session")
def landmarker_path(shared) -> str:
    return str(shared / "models" / "face_landmarker.task")
