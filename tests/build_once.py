"""Build a session's shared artefact once, across xdist workers.

The first process that asks builds it under a `filelock.FileLock` beside it, into a partial
path that it then renames into place; the others wait for the lock and find it done. A build
that fails leaves no artefact (the partial is removed by the next try), so a later case builds
it again rather than reading half of it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

__all__ = ["build_once", "session_root"]


def session_root(tmp_path_factory) -> Path:
    """The folder every worker of this session shares (the basetemp itself without xdist:
    its parent would be shared with other sessions)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def build_once(path: Path, build: Callable[[Path], None]) -> Path:
    """`path` (a file or a folder), made by `build(partial)` if no process of the session made
    it: `build` writes `partial` (absent when called), which is renamed to `path` when `build`
    returns. Returns `path`."""
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path.with_name(path.name + ".lock")):
        if not path.exists():
            partial = path.with_name(path.name + ".partial")
            if partial.is_dir():
                shutil.rmtree(partial)
            partial.unlink(missing_ok=True)
            build(partial)
            os.rename(partial, path)
    return path
