"""Test setup: 8 simulated CPU devices for sharding tests (must precede any jax import), fp32 matmuls, asset paths."""

import os
import pathlib
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One compilation cache per test run, shared by its xdist workers (started after this import, they inherit it) and
# the subprocesses they start: the CLI runs and Animators the tests build compile the same programs again and again.
# Removed when the run ends (`pytest_sessionfinish`).
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="a1_jax_xla_cache_")
# Every program, not only those that took a second to compile (JAX's default): the tests' small programs, compiled
# again in each worker, subprocess and freshly built Animator or jitted lambda, are most of their compile time.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


# The files that take longest, longest first (seconds in the whole suite, stop 23: train 791, sampling 558, vae 278,
# app 154, dit 120, audio_motion 113, evaluate 73, siglip 61, splash_attention 58, motion 52). xdist's `--dist
# loadfile` hands each worker the next file in this order when it runs short; its default order, by number of tests,
# put test_train.py ninth, and the workers kept 1.85 of the 2 cores busy (23.1 min); in this order 1.95 (22.5 min;
# BUILD_NOTES, stop 23). Files not named here follow, in their usual order.
LONGEST_FIRST = ("test_train.py", "test_sampling.py", "test_vae.py", "test_app.py", "test_dit.py",
                 "test_audio_motion.py", "test_evaluate.py", "test_siglip.py", "test_splash_attention.py",
                 "test_motion.py")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist's scheduler: keep the order below
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order


def pytest_sessionfinish(session):
    if _OWN_CACHE and not hasattr(session.config, "workerinput"):  # a plain run, or xdist's controller after its workers
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def shared() -> pathlib.Path:
    """`../shared` beside the checkout: the project's sample portraits and driving videos, read in place.

    Tests that need more than one face and one clip use them. Without `../shared` (a user's fresh clone) those tests
    are skipped, saying why; in CI (`CI` set), where it is always laid beside the checkout, its absence fails them."""
    if not (SHARED / "data").is_dir():
        reason = (f"needs the project's sample assets at {SHARED}/data (not shipped; README: Test). Tests that need "
                  "one face and one clip use the examples shipped in a1_jax/examples instead")
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return SHARED


@pytest.fixture(scope="session")
def examples() -> dict[str, str]:
    """The example portrait and talking clip shipped in the package (public domain): no ../shared needed."""
    from a1_jax import examples as shipped

    return {"portrait": shipped.portrait_path(), "driving": shipped.driving_path()}


@pytest.fixture(scope="session")
def landmarker_path() -> str:
    """The MediaPipe model shipped in the package."""
    from a1_jax.motion.landmarker import find_landmarker_model

    return find_landmarker_model()
