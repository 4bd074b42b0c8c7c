"""A checkpoint file's format, and reading what the file holds, safely.

A checkpoint's format is read off its first bytes, never its extension:

- safetensors: an 8-byte little-endian header length, then a JSON header starting with `{`;
  checked against the file's size, then read by `safetensors.torch.load_file`;
- a `torch.save` zip (`PK\\x03\\x04`) or legacy pickle (`\\x80` protocol byte): read by
  `torch.load(weights_only=True)`, with `argparse.Namespace` allowed as timm does for the `args`
  of training checkpoints. A pickle that needs any other global is refused, the global named;
  there is no fallback to unsafe loading, so a pickle's code never runs.

Each format is a `CheckpointFormat`; `read_file` reads a file with its format's reader.
Every problem is a `CheckpointError`, one line that says what is wrong and what to do.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import struct
from enum import Enum
from pathlib import Path

import torch

from .errors import CheckpointError, first_line, not_a_regular_file

__all__ = ["CheckpointFormat", "detect_format", "read_file"]

_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


class CheckpointFormat(str, Enum):
    """A checkpoint's format, read off its first bytes (`detect_format`). A next format gets a
    member here, its words and extensions below, and a branch in `detect_format` and `read_file`."""

    SAFETENSORS = "safetensors"
    TORCH_ZIP = "torch-zip"
    TORCH_PICKLE = "torch-pickle"

    @property
    def words(self) -> str:
        """The format in words, for logs and errors (`torch zip`)."""
        return _WORDS[self]

    @property
    def extensions(self) -> set[str]:
        """The extensions such files usually have (another one is read, with a warning)."""
        return _EXTENSIONS[self]

    def memory_mapped(self, path: Path) -> bool:
        """Whether `path`, in this format, is read through a memory map: safetensors, and a
        torch zip unless it is named `.safetensors` (`torch.load` would read such a path as
        safetensors, so it is read from an open file, into memory)."""
        return self is CheckpointFormat.SAFETENSORS or (
            self is CheckpointFormat.TORCH_ZIP and path.suffix != ".safetensors"
        )


_WORDS = {
    CheckpointFormat.SAFETENSORS: "safetensors",
    CheckpointFormat.TORCH_ZIP: "torch zip",
    CheckpointFormat.TORCH_PICKLE: "torch legacy pickle",
}
_EXTENSIONS = {
    CheckpointFormat.SAFETENSORS: {".safetensors"},
    CheckpointFormat.TORCH_ZIP: {".pth", ".pt", ".bin", ".ckpt", ".tar"},
    CheckpointFormat.TORCH_PICKLE: {".pth", ".pt", ".bin", ".ckpt", ".pkl"},
}


def detect_format(path: str | os.PathLike) -> CheckpointFormat:
    """The format of a checkpoint file, from its first bytes (the extension is not looked at).

    Returns:
        `CheckpointFormat.SAFETENSORS`, `TORCH_ZIP` or `TORCH_PICKLE`.

    Raises:
        CheckpointError: missing, not a regular file (a folder, a FIFO, a device, a socket:
            never opened, so never waited on), empty, or none of those formats.

    Example:
        >>> detect_format("model.safetensors")
        <CheckpointFormat.SAFETENSORS: 'safetensors'>
    """
    path = Path(path)
    what = not_a_regular_file(path)
    if what:
        raise CheckpointError(f"checkpoint {path} is {what}: give the path of a checkpoint file")
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(16)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {first_line(e)}") from e
    if size == 0:
        raise CheckpointError(
            f"checkpoint {path} is empty (0 bytes): the save or download did not complete; "
            "get the file again"
        )
    if head.startswith(b"PK\x03\x04"):
        return CheckpointFormat.TORCH_ZIP
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return CheckpointFormat.TORCH_PICKLE
    if len(head) >= 9 and head[8:9] == b"{":
        return CheckpointFormat.SAFETENSORS
    raise CheckpointError(
        f"checkpoint {path} is not safetensors nor a torch.save file (first bytes {head[:8]!r}): "
        "save the weights with safetensors.torch.save_file or torch.save(model.state_dict())"
    )


def _failure(e: BaseException) -> str:
    """`first_line` of a reader's error, after the exception's type where the message alone
    says little (a KeyError's message is the missing key: `KeyError: 6`)."""
    line = first_line(e, sentence=True)
    if isinstance(e, (OSError, RuntimeError, ValueError, pickle.UnpicklingError)):
        return line
    return f"{type(e).__name__}: {line}"


def read_file(path: Path, fmt: CheckpointFormat):
    """What the file holds (a dict, or a state dict), read by the reader of its format."""
    return (
        _read_safetensors(path) if fmt is CheckpointFormat.SAFETENSORS else _read_torch(path, fmt)
    )


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Check the header against the file's size (safetensors' own errors do not tell a
    truncated file from trailing data), then read it with `safetensors.torch.load_file`."""
    from safetensors.torch import load_file

    size = path.stat().st_size
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise CheckpointError(
                f"safetensors file {path} claims a {n}-byte header but holds {size - 8} bytes "
                "after its length field: the file is truncated or corrupt; get it again"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError) as e:
        raise CheckpointError(
            f"safetensors file {path} has a corrupt header ({first_line(e, sentence=True)}): get the file again"
        ) from e
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        raise CheckpointError(
            f"safetensors file {path} is truncated: its header describes {expected} bytes, the "
            f"file has {size}; get the file again"
        )
    if size > expected:
        raise CheckpointError(
            f"safetensors file {path} has {size - expected} bytes of trailing data after its "
            "last tensor: the file is corrupt or was appended to; get or save it again"
        )
    try:
        return load_file(path, device="cpu")
    except MemoryError:
        raise
    except Exception as e:  # SafetensorError, or whatever else damaged bytes make it raise
        raise CheckpointError(f"safetensors file {path} cannot be read: {_failure(e)}") from e


def _read_torch(path: Path, fmt: CheckpointFormat):
    """`torch.load(weights_only=True)`; a blocked global is named, never loaded unsafely."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            if fmt.memory_mapped(path):
                # memory-mapped: tensors are read from the file as they are used, not copied
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            # an open file, not the path: torch.load picks safetensors by a path's extension
            with path.open("rb") as f:
                return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        names = _blocked_globals(path, fmt, e)
        if names:
            raise CheckpointError(
                f"refusing {path}: unpickling it needs {', '.join(names)}, which torch's "
                "weights-only loading does not allow (a pickle can run code) and deit_port never "
                "loads unsafely; if you trust the file, re-save its state dict with "
                "safetensors.torch.save_file and convert that"
            ) from e
        raise CheckpointError(
            f"{path} cannot be unpickled ({first_line(e, sentence=True)}): the file is truncated or corrupt; "
            "get or save it again"
        ) from e
    except EOFError as e:
        raise CheckpointError(
            f"{path} ends too early: the file is truncated; get or save it again"
        ) from e
    except MemoryError:  # not the file's fault (or not knowably): not reported as bad input
        raise
    except Exception as e:
        # torch's readers fail on damaged bytes with whatever the bytes lead them to: KeyError
        # (a memo index), IndexError, struct.error, TypeError, AssertionError, RuntimeError...
        # Only `torch.load` is in this `try`: an error of ours is not caught here.
        raise CheckpointError(
            f"{path} cannot be read as a {fmt.words} file ({_failure(e)}): the file is "
            "truncated or corrupt; get or save it again"
        ) from e


def _blocked_globals(path: Path, fmt: CheckpointFormat, error: Exception) -> list[str]:
    names: list[str] = []
    if fmt is CheckpointFormat.TORCH_ZIP:
        try:
            with path.open("rb") as f:
                names = list(torch.serialization.get_unsafe_globals_in_checkpoint(f))
        except Exception:  # noqa: BLE001 -- a damaged archive: the name in torch's message
            names = []
    names = [n for n in names if n != "argparse.Namespace"]
    return sorted(set(names)) or _GLOBAL.findall(str(error))[:1]
