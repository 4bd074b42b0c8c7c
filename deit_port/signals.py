"""SIGINT and SIGTERM: held while output is published, and turned into exit codes by the
command line."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

__all__ = ["signals_held"]


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then deliver them to their own handlers.

    For the steps that must not stop half-way (moving the output into place, removing the
    work folder): a Ctrl-C there would leave a folder half removed or the earlier output aside.
    A signal that arrives meanwhile is raised again when the block ends, so a handler that
    raises KeyboardInterrupt raises it then, and SIGTERM's default still ends the process.
    Python runs handlers in the main thread only, and only it can change them: elsewhere
    nothing is held. Signals that are ignored, or handled outside Python, are left alone."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def hold(signum, frame) -> None:
        pending.append(signum)

    previous = {}
    for stop in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(stop)
        if handler is not None and handler is not signal.SIG_IGN:
            previous[stop] = signal.signal(stop, hold)
    try:
        yield
    finally:
        for stop, handler in previous.items():
            signal.signal(stop, handler)
        for signum in dict.fromkeys(pending):
            signal.raise_signal(signum)
