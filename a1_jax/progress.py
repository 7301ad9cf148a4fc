"""Progress of a long command: one status line on a terminal from its first second, and the seconds of each stage.

    stages = Stages("animate")                  # shows "animate: starting [00:00]" at once (on a terminal only)
    with stages("landmarks"):                   # the line names the stage; its clock ticks every second
        for i in range(n):
            stages.advance(i + 1, n, "frames")  # "animate: landmarks 12/48 frames [00:03 · total 00:05]"
    stages.seconds                              # {"landmarks": 3.2, ...}: the same clocks the summary reports
    stages.cancel()                             # from another thread: the next `advance` or `note` raises Cancelled

Light on purpose (tqdm only, no JAX): the CLI starts it before the heavy imports, so the user sees it at once.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Callable, Iterator

TICK_SECONDS = 1.0


class Cancelled(Exception):
    """A run stopped on request (`Stages.cancel`) at its next progress point: between two frames, steps or chunks."""


class Stages:
    """Times named stages (a stage entered twice adds up; nested stages are exclusive) and shows the current one, with sub-progress, on stderr."""

    def __init__(self, command: str, *, enabled: bool = True, started: float | None = None,
                 listener: Callable[["Stages"], None] | None = None):
        """`listener`: called with the Stages at each change of stage or sub-progress, in the thread that made it
        (the web app's progress bar)."""
        self.command, self.listener = command, listener
        self.started = time.perf_counter() if started is None else started
        self.seconds: dict[str, float] = {}
        self._stage, self._stage_started, self._detail = "starting", self.started, ""
        self._stack: list[str] = []
        self._count: tuple[int, int, str] | None = None  # the last `advance`: (done, total, unit)
        self._bar = None
        self._stop = threading.Event()
        self._cancel = threading.Event()
        self.cancelled_at: str | None = None  # where a cancel stopped the run ("denoise 3/10 steps")
        if enabled:
            from tqdm import tqdm

            # disable=None: only on a terminal, so redirected stderr keeps just the one-line errors
            self._bar = tqdm(total=0, bar_format="{desc}", leave=False, disable=None)
            if self._bar.disable:
                self._bar = None
        if self._bar is not None:
            self._show()
            threading.Thread(target=self._tick, daemon=True).start()

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        """Times `stage`; a stage entered inside another pauses the outer one's clock (each second counts once)."""
        now = time.perf_counter()
        outer = (self._stage, self._stage_started, self._detail)
        if self._stack:
            self._add(self._stack[-1], now - self._stage_started)
        self._stack.append(stage)
        self._stage, self._stage_started, self._detail, self._count = stage, now, "", None
        self._changed()
        try:
            yield
        finally:
            now = time.perf_counter()
            self._add(self._stack.pop(), now - self._stage_started)
            self._stage, self._detail, self._count = outer[0], outer[2], None
            self._stage_started = now if self._stack else outer[1]
            self._changed()

    def _add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def advance(self, done: int, total: int, unit: str) -> None:
        """Sub-progress of the current stage; raises `Cancelled` once `cancel` was called."""
        self._detail, self._count = f" {done}/{total} {unit}", (done, total, unit)
        self._changed()
        self._stop_if_cancelled()

    def note(self, text: str) -> None:
        """A word on the current stage (e.g. which window) without a count; raises `Cancelled` once `cancel` was
        called."""
        self._detail, self._count = f" {text}", None
        self._changed()
        self._stop_if_cancelled()

    @property
    def status(self) -> str:
        """The current stage and its sub-progress, as the status line shows them: "denoise 3/10 steps"."""
        return f"{self._stage}{self._detail}"

    @property
    def count(self) -> tuple[int, int, str] | None:
        """The current stage's last `advance`: (done, total, unit), or None."""
        return self._count

    def cancel(self) -> None:
        """Asks the run to stop (thread-safe): its next progress point raises `Cancelled`."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def _stop_if_cancelled(self) -> None:
        if self._cancel.is_set():
            self.cancelled_at = self.status
            raise Cancelled(f"cancelled at {self.status}")

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def close(self) -> None:
        self._stop.set()
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _changed(self) -> None:
        self._show()
        if self.listener is not None:
            self.listener(self)

    def _show(self) -> None:
        bar = self._bar
        if bar is None:
            return
        now = time.perf_counter()
        bar.set_description_str(f"{self.command}: {self._stage}{self._detail} [{_clock(now - self._stage_started)}"
                                f" · total {_clock(now - self.started)}]")

    def _tick(self) -> None:
        while not self._stop.wait(TICK_SECONDS):
            self._show()

    def __enter__(self) -> "Stages":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes:02d}:{seconds:02d}"
