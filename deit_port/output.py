"""Checking where output goes, before any work: the output path, the free space and inodes
it needs, and a failed write told by its cause (disk full, read-only, ...)."""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Sequence
from pathlib import Path

from .errors import DeitPortError, OutputError, first_line

__all__ = [
    "SPACE_MARGIN",
    "check_free_space",
    "check_output_dir",
    "check_output_file",
    "os_error_words",
    "write_error_cause",
]


def check_output_dir(
    output_dir: str | os.PathLike,
    overwrite: bool = False,
    protect: Sequence[str | os.PathLike] = (),
) -> Path:
    """Check that `output_dir` can be (re)written as a whole, before any work is done.

    Args:
        output_dir: the folder to write.
        overwrite: an existing non-empty folder may be replaced.
        protect: files that must survive (the checkpoint being converted): the output may be
            neither one of them nor a folder holding one.

    Returns:
        The absolute output path.

    Raises:
        OutputError: `output_dir` is a file, is or holds a protected file, a non-empty folder
            without `overwrite`, or lies under a file.
    """
    out = Path(output_dir).absolute()
    real = out.resolve()
    for keep in protect:
        keep = Path(keep).resolve()
        if keep == real:
            raise OutputError(f"output {out} is the checkpoint itself; give another output folder")
        if real in keep.parents:
            raise OutputError(
                f"output folder {out} holds the checkpoint {keep}, which writing it would "
                "delete; give another output folder"
            )
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} is an existing file; give a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"output folder {out} is not empty; pass --overwrite to replace it")
    _check_parent(out)
    return out


def _check_parent(out: Path) -> None:
    """The nearest existing folder above `out` (where the hidden work folder goes) is a
    writable folder on a writable file system."""
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"cannot write {out}: {parent} is a file, not a folder")
            if os.statvfs(parent).f_flag & os.ST_RDONLY:  # access() would say EROFS as EACCES
                raise OutputError(
                    f"cannot write {out}: {parent} is on a read-only file system; give an output "
                    "on a writable disk"
                )
            if not os.access(parent, os.W_OK | os.X_OK):  # root passes; mkdtemp then fails
                raise OutputError(f"cannot write {out}: no permission to write in {parent}")
            return


def check_output_file(
    output: str | os.PathLike, overwrite: bool = False, suffix: str | None = None, why: str = ""
) -> Path:
    """Check that the file `output` can be (re)written, before any work is done.

    Args:
        output: the file to write.
        overwrite: an existing file may be replaced.
        suffix: the extension the file must have (e.g. `.onnx`), if any.
        why: why that extension, said in the error.

    Returns:
        The absolute output path.

    Raises:
        OutputError: not named `*suffix`, a folder, or an existing file without `overwrite`.
    """
    out = Path(output).absolute()
    if suffix is not None and out.suffix != suffix:
        reason = f" ({why})" if why else ""
        raise OutputError(
            f"output {out.name} must end in {suffix}{reason}; give a file name like model{suffix}"
        )
    if out.is_dir():
        raise OutputError(f"output {out} is a folder; give a file path")
    if os.path.lexists(out) and not overwrite:
        raise OutputError(f"output file {out} exists; pass --overwrite to replace it")
    _check_parent(out)
    return out


# The file system's own refusals of a write, in words. Any other OSError is told by its
# strerror; a library's error counts as a failed write only with one of these in it.
_WRITE_FAULTS = {
    errno.ENOSPC: "no space left on device (disk full)",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EIO: "input/output error (a failing disk or a lost network file system?)",
    errno.EFBIG: "file too large for its file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}
# How a library's message carries an OS error: Rust's io::Error ("... (os error 28)", as
# safetensors' SafetensorError says it) and Python's OSError ("[Errno 28] ...").
_OS_ERROR_NUMBER = re.compile(r"\(os error (\d+)\)|\[Errno (\d+)\]")


def write_error_cause(e: BaseException) -> str | None:
    """What made a write fail, in words, when it was the file system; None for anything else.

    An `OSError` is the file system's by its type ("no space left on device (disk full)" for
    ENOSPC, else its strerror). Another library's error (safetensors' `SafetensorError`, an
    exporter's `RuntimeError`, ...) counts only when it carries one of the file system's
    refusals (`_WRITE_FAULTS`: ENOSPC, EDQUOT, EROFS, EIO, EFBIG, EACCES, EPERM): in its
    message, as an OS error number or its strerror text, or as the `OSError` it was raised
    from. Any other error is a bug, not a full disk.

    Example:
        >>> write_error_cause(SafetensorError("I/O error: No space left on device (os error 28)"))
        'no space left on device (disk full)'
    """
    if isinstance(e, DeitPortError):
        return None
    if isinstance(e, OSError):
        return os_error_words(e)
    return _carried_fault(e)


def os_error_words(e: OSError) -> str:
    """An `OSError` in words: `_WRITE_FAULTS`' words for its errno, else its first line."""
    return (_WRITE_FAULTS.get(e.errno) if e.errno is not None else None) or first_line(e)


def _carried_fault(error: BaseException) -> str | None:
    """The `_WRITE_FAULTS` entry that `error`'s message, or an error it was raised from, names."""
    seen = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError):
            if e.errno is not None and e.errno in _WRITE_FAULTS:
                return _WRITE_FAULTS[e.errno]
        else:
            text = str(e)
            for m in _OS_ERROR_NUMBER.finditer(text):
                number = int(m.group(1) or m.group(2))
                if number in _WRITE_FAULTS:
                    return _WRITE_FAULTS[number]
            for number, words in _WRITE_FAULTS.items():
                if os.strerror(number) in text:
                    return words
        e = e.__cause__  # `raise LibraryError(...) from os_error`
    return None


# What is written besides the tensors (a folder's config, image processor, model card, index
# and safetensors headers: 0.1 MiB for DeiT tiny with 1000 labels; an ONNX file's graph: 1.1
# MiB for DeiT tiny), and a little room, so that a write that passes `check_free_space` does
# not fill the disk to its last block. Where it falls short, the writer's own ENOSPC is the
# same one-line error.
SPACE_MARGIN = 2 << 20


def check_free_space(
    output: str | os.PathLike, nbytes: int, files: int = 1, folder: bool = False
) -> None:
    """Check that the file system `output` goes on has room for `nbytes` in `files` files.

    Needed: `nbytes`, a block per file (a file's last block is partly empty) and
    `SPACE_MARGIN`; and `files` inodes, plus the hidden work folder (and, for a `folder`
    replacing another, the one the old output is moved aside into). Free: what the file
    system gives this user (`statvfs`: f_bavail, or f_bfree for root, which may use the
    reserved blocks). A file system that counts no inodes (btrfs, ...) is not checked for them.

    Args:
        output: the file or folder to be written (it need not exist, nor its parents).
        nbytes: the bytes of the data to write (tensor bytes in the written dtype).
        files: how many files will be written.
        folder: `output` is a folder.

    Raises:
        OutputError: too little space or too few inodes: one line with what is needed, what
            is free and where.

    Example:
        >>> check_free_space("/small/out", 23_000_000, files=4, folder=True)
        OutputError: not enough space for /small/out: needs 24.0 MiB, 20.0 MiB free on /small; ...
    """
    out = Path(output).absolute()
    where = next(p for p in out.parents if p.exists())
    st = os.statvfs(where)
    root = os.geteuid() == 0
    free = (st.f_bfree if root else st.f_bavail) * st.f_frsize
    need = nbytes + files * st.f_frsize + SPACE_MARGIN
    if need > free:
        raise OutputError(
            f"not enough space for {out}: needs {_size(need)}, {_size(free)} free on {where}; "
            "free some space or give an output on another disk"
        )
    inodes = files + (2 if folder else 1)
    free_inodes = st.f_ffree if root else st.f_favail
    if st.f_files and inodes > free_inodes:
        raise OutputError(
            f"not enough inodes for {out}: needs {inodes} (files and folders), {free_inodes} "
            f"free on {where}; remove some files or give an output on another disk"
        )


def _size(n: int) -> str:
    """`23.9 MiB`: a byte count in words, one decimal."""
    if n < 1024:
        return f"{n} B"
    value = n / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
