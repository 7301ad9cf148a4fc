"""`a1-jax` with its stage clocks in process CPU seconds (all threads) instead of wall seconds.

    python tools/cpu_stages.py animate --example --out /tmp/ex.mp4

On a shared machine the wall clock measures the neighbours; CPU time is the comparable figure (`stage_seconds` and
`seconds` in the summary are then CPU seconds).
"""

import sys
import time
import types

import a1_jax.progress as progress

clock = types.SimpleNamespace(**{name: getattr(time, name) for name in dir(time) if not name.startswith("_")})
clock.perf_counter = time.process_time
progress.time = clock

from a1_jax.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
