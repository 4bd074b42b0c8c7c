"""Reporting the steps of a long command as they start, and timing them for the log."""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["Steps", "no_progress"]


def no_progress(step: str) -> None:
    """A `progress` callback that reports nothing."""


class Steps:
    """Calls `progress` with each step's name as it starts, and times the steps.

    Example:
        >>> step = Steps(print)
        >>> step("loading")
        loading
        >>> step.summary()
        'loading 0.00 s'
    """

    def __init__(self, progress: Callable[[str], None] | None = None) -> None:
        self._progress = progress or no_progress
        self.seconds: dict[str, float] = {}
        self._current: str | None = None
        self._start = 0.0

    def __call__(self, name: str) -> None:
        self._stop()
        self._progress(name)
        self._current, self._start = name, time.perf_counter()

    def _stop(self) -> None:
        if self._current is not None:
            self.seconds[self._current] = time.perf_counter() - self._start
            self._current = None

    def summary(self) -> str:
        """`loading 0.41 s, writing 1.20 s, ...` (the step running now ends here)."""
        self._stop()
        return ", ".join(f"{name} {t:.2f} s" for name, t in self.seconds.items())
