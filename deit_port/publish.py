"""Publishing output atomically: a hidden work folder beside the output, moved into place
on success (never over another run's output without `overwrite`), removed on failure; the
leftovers of killed runs removed by the next run."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from . import output
from .errors import OutputError
from .signals import signals_held

__all__ = ["atomic_file", "atomic_folder", "publish_permissions", "renameat2"]

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_folder(
    output_dir: str | os.PathLike,
    overwrite: bool = False,
    protect: Sequence[str | os.PathLike] = (),
    *,
    size: int | None = None,
    files: int = 1,
) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `output_dir`; publish it there on success.

    On any exception (including a parity failure raised inside the block, or KeyboardInterrupt)
    the temporary folder is removed and `output_dir` is left as it was. With `overwrite`, an
    existing `output_dir` is replaced as a whole, so no stale shard or index survives; without
    it, a folder that another run wrote meanwhile is never replaced (see `_publish`). A process
    killed mid-write leaves only a hidden `.NAME.PID.*.partial` folder, never `output_dir`;
    the next run removes such leftovers of dead processes.

    Given `size` (the bytes the folder will hold, in `files` files), the free space is checked
    first (`check_free_space`), after those leftovers are removed.

    Raises:
        OutputError: as `check_output_dir` and `check_free_space`; `output_dir` was filled
            meanwhile (another run?) and `overwrite` is off; or the folder cannot be written
            (no permission, disk full, ...: `write_error_cause`): the message gives the
            reason, nothing is left behind.
    """
    with contextlib.suppress(OSError):  # before the check: an earlier output may come back
        _remove_stale(Path(output_dir).absolute())
    out = output.check_output_dir(output_dir, overwrite, protect)
    if size is not None:
        output.check_free_space(out, size, files=files, folder=True)
    with _write_beside(out, overwrite, folder=True) as tmp:
        yield tmp


@contextlib.contextmanager
def atomic_file(
    output_file: str | os.PathLike,
    overwrite: bool = False,
    *,
    size: int | None = None,
    files: int = 1,
) -> Iterator[Path]:
    """Yield a temporary path with `output_file`'s name, in a hidden folder beside it; publish
    the file written there on success. The same mechanism as `atomic_folder`: nothing is left
    on failure, a file that appeared meanwhile is replaced only with `overwrite`, leftovers
    of killed runs are removed by the next run; given `size` (bytes, in `files` files: the
    file and any written beside it), the free space is checked first.

    Raises:
        OutputError: as `check_output_file` and `check_free_space`; `output_file` appeared
            meanwhile without `overwrite`; or it cannot be written (the reason given, nothing
            left behind).
    """
    with contextlib.suppress(OSError):
        _remove_stale(Path(output_file).absolute())
    out = output.check_output_file(output_file, overwrite)
    if size is not None:
        output.check_free_space(out, size, files=files)
    with _write_beside(out, overwrite, folder=False) as tmp:
        yield tmp


@contextlib.contextmanager
def _write_beside(out: Path, overwrite: bool, folder: bool) -> Iterator[Path]:
    """The one atomic-publish mechanism. A hidden `.NAME.PID.RANDOM.partial` folder is created
    beside `out` (mkdtemp: a new name, never someone else's); the caller writes the output
    folder as that folder itself, or an output file as the file `NAME` inside it (so the file
    keeps its name and extension while it is checked). On success the work gets the modes a
    plain `mkdir`/`open` gives and is published by `_publish`; on any exception, and after
    publishing, the `.partial` folder is removed. Publishing and removing run to their end
    with SIGINT and SIGTERM held (`signals_held`): a second Ctrl-C cannot cut them short.

    A failed write (an `OSError`, or a library's error that carries the file system's:
    `write_error_cause`) becomes one `OutputError`; any other exception passes unchanged."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = _hidden_folder_beside(out, ".partial")
    except OSError as e:
        raise OutputError(f"cannot write beside {out}: {output.os_error_words(e)}") from e
    work = tmp if folder else tmp / out.name
    try:
        yield work
    except BaseException as e:
        with signals_held():
            shutil.rmtree(tmp, ignore_errors=True)
        cause = output.write_error_cause(e) if isinstance(e, Exception) else None
        if cause is None:
            raise
        raise _write_failed(out, cause) from e
    with signals_held():
        try:
            publish_permissions(work)
            _publish(work, out, overwrite)
        except OSError as e:
            raise _write_failed(out, output.os_error_words(e)) from e
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _write_failed(out: Path, cause: str) -> OutputError:
    return OutputError(
        f"writing {out} failed: {cause}; nothing was written"
        + (", the earlier output is untouched" if os.path.lexists(out) else "")
    )


# What rename(2), link(2) and renameat2(2) answer when the destination is taken.
_TAKEN = {errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR}


def _publish(work: Path, out: Path, overwrite: bool) -> None:
    """Move `work` to `out`; without `overwrite`, never replacing what is there.

    Without `overwrite`, the check before the work is not enough: another run may have
    published `out` since. So the kernel decides, atomically:

    - a folder: `rename(2)`, which moves a folder onto a path only if nothing is there or an
      EMPTY folder is (exactly what `check_output_dir` allows); a non-empty folder or a file
      there makes it fail (ENOTEMPTY/EEXIST, ENOTDIR);
    - a file: `renameat2(RENAME_NOREPLACE)` (Linux >= 3.15, glibc >= 2.28; ext4, xfs, btrfs,
      tmpfs, vfat, ...), which fails with EEXIST when anything is at `out`; where the file
      system or C library lacks it (EINVAL/ENOSYS, e.g. NFS), `link(2)` then `unlink(2)`:
      `link` fails with EEXIST when anything is at `out` (a symlink included). A run killed
      between the two leaves the published file complete and a second name for it in the
      `.partial` folder, which the next run removes.

    With `overwrite`, a file is `os.replace`d; an existing folder is moved aside into a
    `.NAME.PID.*.old` folder, the new one renamed into place, and the old one restored if that
    fails (or by the next run, if this one is killed in between), then removed.

    Raises:
        OutputError: `out` was taken meanwhile and `overwrite` is off.
        OSError: any other failure; `out` is as it was.
    """
    what = "folder" if work.is_dir() else "file"
    try:
        if what == "folder" and not overwrite:
            os.rename(work, out)
        elif not overwrite:
            _rename_noreplace(work, out)
        elif what == "file":
            os.replace(work, out)
        elif out.exists():
            _replace_folder(work, out)
        else:
            os.rename(work, out)
    except OSError as e:
        if overwrite or e.errno not in _TAKEN:
            raise
        if out.is_symlink():
            raise OutputError(
                f"output {out} is a symbolic link, which publishing would replace; give the "
                "real path or pass --overwrite"
            ) from e
        raise OutputError(
            f"output {what} {out} appeared while converting (another run?); nothing was "
            "written; pass --overwrite to replace it"
        ) from e


def _hidden_folder_beside(out: Path, suffix: str) -> Path:
    """A new folder `.NAME.PID.RANDOM{suffix}` beside `out` (the names `_remove_stale` knows)."""
    prefix = f".{out.name}.{os.getpid()}."
    return Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=out.parent))


def _replace_folder(work: Path, out: Path) -> None:
    old = _hidden_folder_beside(out, ".old")
    os.rename(out, old / "x")  # move aside; restored if the next rename fails
    try:
        os.rename(work, out)
    except BaseException:
        os.rename(old / "x", out)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


_AT_FDCWD, _RENAME_NOREPLACE = -100, 1


@functools.cache
def renameat2():
    """glibc's `renameat2`, or None (another C library, or one older than glibc 2.28): then
    files are published by `link(2)` and `unlink(2)` (patch this to None to take that path)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Move the file `src` to `dst` unless something is at `dst` (FileExistsError then)."""
    call = renameat2()
    if call is not None:
        paths = os.fsencode(src), os.fsencode(dst)
        if call(_AT_FDCWD, paths[0], _AT_FDCWD, paths[1], _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), str(dst))
    os.link(src, dst)
    os.unlink(src)


def publish_permissions(path: Path) -> None:
    """mkdtemp makes 0700 folders and safetensors 0600 files: give `path` (and, for a folder,
    everything in it) the modes a plain `mkdir`/`open` would (0777/0666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [path, *(path.rglob("*") if path.is_dir() else ())]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def _remove_stale(out: Path) -> None:
    """Remove `.NAME.PID.*.partial` / `.old` folders beside `out` left by dead processes.

    An `.old` folder holds the previous output while it is being replaced: if the process died
    between the two renames, the previous output is put back."""
    ours = re.compile(rf"\.{re.escape(out.name)}\.(\d+)\.[^.]+\.(partial|old)")
    for p in out.parent.iterdir():
        m = ours.fullmatch(p.name)
        if not m or not p.is_dir() or _alive(int(m.group(1))):
            continue
        if p.name.endswith(".old") and (p / "x").is_dir() and not out.exists():
            logger.warning("restoring %s from an interrupted overwrite", out)
            os.rename(p / "x", out)
        logger.info("removing %s, left by an interrupted run", p)
        shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
