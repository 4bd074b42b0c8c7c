"""Writing and reading transformers folders and output files: atomic publishing, output-path
checks, safetensors shards, the folder's config and dtype, strict loading."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .arch import ArchSpec
from .errors import BadInputError, DeitPortError, KeyMismatchError, OutputError, first_line
from .hf_config import hf_model_class
from .versions import transformers_major

__all__ = [
    "CONFIG_FILE",
    "DTYPES",
    "SPACE_MARGIN",
    "atomic_file",
    "atomic_folder",
    "check_free_space",
    "check_output_dir",
    "check_output_file",
    "dtype_key",
    "float32_kwargs",
    "folder_dtype",
    "hf_folder_size",
    "load_hf_folder",
    "load_hf_state_dict",
    "publish_permissions",
    "read_folder_config",
    "read_hf_folder",
    "resolve_dtype",
    "save_hf_folder",
    "write_error_cause",
]

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
# The dtypes a folder's weights can be written in (`--dtype`).
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SINGLE, _INDEX = "model.safetensors", "model.safetensors.index.json"


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
    out = check_output_dir(output_dir, overwrite, protect)
    if size is not None:
        check_free_space(out, size, files=files, folder=True)
    with _write_beside(out, overwrite, folder=True) as tmp:
        yield tmp


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
    out = check_output_file(output_file, overwrite)
    if size is not None:
        check_free_space(out, size, files=files)
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
    with SIGINT and SIGTERM held (`_signals_held`): a second Ctrl-C cannot cut them short.

    A failed write (an `OSError`, or a library's error that carries the file system's:
    `write_error_cause`) becomes one `OutputError`; any other exception passes unchanged."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = _hidden_folder_beside(out, ".partial")
    except OSError as e:
        raise OutputError(f"cannot write beside {out}: {_os_error_words(e)}") from e
    work = tmp if folder else tmp / out.name
    try:
        yield work
    except BaseException as e:
        with _signals_held():
            shutil.rmtree(tmp, ignore_errors=True)
        cause = write_error_cause(e) if isinstance(e, Exception) else None
        if cause is None:
            raise
        raise _write_failed(out, cause) from e
    with _signals_held():
        try:
            publish_permissions(work)
            _publish(work, out, overwrite)
        except OSError as e:
            raise _write_failed(out, _os_error_words(e)) from e
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _write_failed(out: Path, cause: str) -> OutputError:
    return OutputError(
        f"writing {out} failed: {cause}; nothing was written"
        + (", the earlier output is untouched" if os.path.lexists(out) else "")
    )


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
        return _os_error_words(e)
    return _carried_fault(e)


def _os_error_words(e: OSError) -> str:
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


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
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
def _renameat2():
    """glibc's `renameat2`, or None (another C library, or one older than glibc 2.28)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Move the file `src` to `dst` unless something is at `dst` (FileExistsError then)."""
    renameat2 = _renameat2()
    if renameat2 is not None:
        paths = os.fsencode(src), os.fsencode(dst)
        if renameat2(_AT_FDCWD, paths[0], _AT_FDCWD, paths[1], _RENAME_NOREPLACE) == 0:
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


def resolve_dtype(dtype: str | torch.dtype) -> tuple[str, torch.dtype]:
    """`(name, torch dtype)` of a written dtype given by name (`float16`) or as a torch dtype.

    Raises:
        BadInputError: not one of `DTYPES`.
    """
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise BadInputError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    return name, DTYPES[name]


def dtype_key() -> str:
    """The config and `from_pretrained` key of the dtype: transformers 5 calls it `dtype`,
    4.x `torch_dtype`."""
    return "dtype" if transformers_major() >= 5 else "torch_dtype"


def float32_kwargs() -> dict:
    """`from_pretrained` keywords that load in float32 (transformers 5 loads the saved dtype)."""
    return {dtype_key(): torch.float32}


def read_folder_config(folder: str | os.PathLike) -> dict:
    """The `config.json` of a transformers model folder, as a dict.

    Raises:
        BadInputError: `folder` is not a folder, has no `config.json`, or it is not a JSON
            object.
    """
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not path.is_file():
        what = f"no {CONFIG_FILE}" if folder.is_dir() else f"not a folder, no {CONFIG_FILE}"
        raise BadInputError(f"{folder} is not a transformers model folder ({what})")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BadInputError(f"{path} cannot be read: {first_line(e)}") from e
    if not isinstance(config, dict):
        raise BadInputError(f"{path} is not a JSON object: not a transformers config")
    return config


def folder_dtype(config: dict) -> str:
    """The dtype a folder's config records for its weights (`float32` when it records none)."""
    return str(config.get("dtype") or config.get("torch_dtype") or "float32")


def save_hf_folder(
    folder: str | os.PathLike,
    state_dict: dict[str, torch.Tensor],
    config,
    max_shard_size: int | str = "5GB",
) -> None:
    """Write `config.json` and the weights as safetensors shards (with an index past one shard).

    The shards are planned by `huggingface_hub.split_torch_state_dict_into_shards` (the plan
    and index format transformers uses) and written by `safetensors.torch.save_file`, which
    takes the split query/key/value as they are: views into the fused tensor, written without
    a copy (huggingface_hub's `save_torch_state_dict` refuses views of part of a storage).
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    folder = Path(folder)
    split = split_torch_state_dict_into_shards(
        state_dict, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    for filename, keys in split.filename_to_tensors.items():
        shard = {k: state_dict[k].contiguous() for k in keys}  # no copy unless strided
        save_file(shard, folder / filename, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.save_pretrained(folder)


def hf_folder_size(
    state_dict: dict[str, torch.Tensor], max_shard_size: int | str = "5GB"
) -> tuple[int, int]:
    """What `save_hf_folder` will write: the tensor bytes, and the number of files (the shards
    as it plans them, their index past one shard, `config.json`), for `check_free_space`.

    Example:
        >>> nbytes, files = hf_folder_size(state_dict, "2GB")
    """
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(
        state_dict, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    nbytes = sum(v.nbytes for v in state_dict.values())  # split views are written apart
    return nbytes, len(split.filename_to_tensors) + int(split.is_sharded) + 1


def read_hf_folder(folder: str | os.PathLike) -> tuple[object, dict[str, torch.Tensor], ArchSpec]:
    """Read a transformers ViT/DeiT folder: its config, its hub-format weights, its spec.

    Args:
        folder: holds `config.json` and `model.safetensors` (or shards with
            `model.safetensors.index.json`), as `save_pretrained` writes them.

    Returns:
        `(config, state_dict, spec)`; a folder without the `vit.`/`deit.` prefix (a
        `ViTModel`/`DeiTModel`) is a base model, `spec.num_classes == 0`.

    Raises:
        BadInputError: not a folder, no safetensors weights, not a ViT/DeiT, or a setting timm's
            DeiT does not have (non-GELU activation, non-square images).

    Example:
        >>> config, state_dict, spec = read_hf_folder("deit-tiny-hf")
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig

    folder = Path(folder)
    read_folder_config(folder)  # a folder, with a readable config.json
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as e:  # unreadable or invalid config.json
        raise BadInputError(f"{folder}/config.json cannot be read: {first_line(e)}") from e
    if config.model_type not in ("vit", "deit"):
        raise BadInputError(
            f"{folder} holds a {config.model_type!r} model; only ViT and DeiT convert to timm DeiT"
        )
    if config.hidden_act != "gelu":
        raise BadInputError(f"hidden_act {config.hidden_act!r} is not timm DeiT's exact GELU")

    if (folder / _INDEX).is_file():
        try:
            weight_map = json.loads((folder / _INDEX).read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise BadInputError(f"{folder / _INDEX} is not a valid index: {first_line(e)}") from e
    elif (folder / _SINGLE).is_file():
        files = [_SINGLE]
    else:
        raise BadInputError(
            f"{folder} has no {_SINGLE} or {_INDEX}: only safetensors weights are read"
        )
    state_dict: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            state_dict.update(load_file(folder / name))
        except (OSError, SafetensorError) as e:
            raise BadInputError(
                f"{folder / name} cannot be read: {first_line(e)}; get or write the folder again"
            ) from e

    prefix = "deit." if config.model_type == "deit" else "vit."
    base_model = not any(k.startswith(prefix) for k in state_dict)
    spec = ArchSpec.from_hf_config(config, base_model=base_model)
    logger.info("read %s: %d tensors, %s", folder, len(state_dict), spec)
    return config, state_dict, spec


def load_hf_folder(folder: str | os.PathLike, spec: ArchSpec, **kwargs) -> torch.nn.Module:
    """Load a converted folder into the transformers class of `spec`, strictly, in eval mode.

    Raises:
        KeyMismatchError: transformers reported missing, unexpected or mismatched keys.
        BadInputError: transformers cannot load the folder at all (no weights, a corrupt file).
    """
    return _from_pretrained(spec, folder, **kwargs)


def load_hf_state_dict(state_dict: dict[str, torch.Tensor], config, spec: ArchSpec):
    """Build the transformers model of `spec` from a hub-format state dict, in memory.

    transformers' own `from_pretrained(None, config=..., state_dict=...)` does the loading, so
    the 4.x hub key format is renamed by whichever transformers is installed.
    """
    return _from_pretrained(spec, None, config=config, state_dict=state_dict)


def _from_pretrained(spec: ArchSpec, folder, **kwargs) -> torch.nn.Module:
    """`from_pretrained` of `spec`'s class, strict: every key loaded, none left over."""
    cls = hf_model_class(spec)
    if spec.num_classes == 0:
        kwargs.setdefault("add_pooling_layer", False)  # timm has no pooler
    try:
        # with `output_loading_info`, `(model, info)`: not what the return type says
        loaded: Any = cls.from_pretrained(folder, output_loading_info=True, **kwargs)
    except (OSError, ValueError, RuntimeError) as e:  # no weights file, a corrupt one, ...
        raise BadInputError(f"{folder} cannot be loaded as {cls.__name__}: {first_line(e)}") from e
    model, info = loaded
    missing = list(info.get("missing_keys", []))
    unexpected = list(info.get("unexpected_keys", []))
    mismatched = [str(k) for k in info.get("mismatched_keys", [])]
    if missing or unexpected or mismatched:
        raise KeyMismatchError("transformers state dict", missing + mismatched, unexpected)
    return model.eval()
