"""Reporting the steps of a long command as they start, timing them for the log, and the
command line's progress bar over them."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence

__all__ = ["Steps", "no_progress", "progress_bar"]


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


@contextlib.contextmanager
def progress_bar(quiet: bool, steps: Sequence[str] = ()) -> Iterator[Callable[[str], None] | None]:
    """A tqdm bar over the long `steps` when stderr is a terminal and not `quiet`; else nothing.

    Without the bar, transformers' and huggingface_hub's own progress bars are off too, and
    with `quiet` their warnings.

    Example:
        >>> with progress_bar(False, ("loading", "writing")) as progress:
        ...     convert_deit_checkpoint(name, out, progress=progress)
    """
    import huggingface_hub.utils
    import transformers

    show = not quiet and sys.stderr.isatty()
    if not show:
        transformers.utils.logging.disable_progress_bar()
        huggingface_hub.utils.disable_progress_bars()
    if quiet:
        transformers.utils.logging.set_verbosity_error()
    if not show:
        yield None
        return
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    # log lines are printed above the bar (tqdm.write), not through it
    with (
        logging_redirect_tqdm(),
        tqdm(total=len(steps), file=sys.stderr, leave=False, unit="step") as bar,
    ):

        def step(name: str) -> None:
            bar.n = steps.index(name) if name in steps else bar.n
            bar.set_description_str(f"deit-port: {name}")

        yield step
        bar.n = len(steps)
        bar.refresh()
