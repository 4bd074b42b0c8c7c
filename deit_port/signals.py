"""SIGINT and SIGTERM: held while output is published (`signals_held`), raised as
`Interrupted` where a command is (`interrupt_on_signals`, which the command line turns into
exit codes 130 and 143)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

__all__ = ["STOP_SIGNALS", "Interrupted", "interrupt_on_signals", "signals_held"]

# The signals that stop a command: Ctrl-C and `kill`.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


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
    for stop in STOP_SIGNALS:
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


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised where the command was: the clean-up on the way out removes
    what was half written."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def interrupt_on_signals() -> Callable[[], None]:
    """Make SIGINT and SIGTERM raise `Interrupted` (SIGTERM's default would end the process
    with its partial folder in place); the first one only: later ones are ignored, so that the
    clean-up it starts runs to its end. Returns what restores the handlers before, unless a
    signal came: the process is ending then, and a second Ctrl-C in Python's own shutdown
    would print a traceback after the one line."""
    if threading.current_thread() is not threading.main_thread():  # only it handles signals
        return lambda: None
    came = []

    def interrupt(signum, frame) -> None:
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        came.append(signum)
        raise Interrupted(signum)

    previous = {s: signal.signal(s, interrupt) for s in STOP_SIGNALS}

    def restore() -> None:
        for s, handler in previous.items():  # None: set outside Python, whose default it is
            if not came:
                signal.signal(s, signal.SIG_DFL if handler is None else handler)

    return restore
