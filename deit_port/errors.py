"""Every error deit_port raises on purpose, in one tree; each class knows its exit code
(`exit_code`, one of the `EXIT_*` below; what each means to a user: README.md, "Exit codes").

    DeitPortError
    +-- BadInputError (ValueError)  the input cannot be used as given (`EXIT_BAD_INPUT`)
    |   +-- OutputError             the output path cannot be (re)written as asked
    |   +-- CheckpointError         a checkpoint (or labels file) is unreadable or does not fit
    |   +-- LabelsError             a labels file (read as a checkpoint's, so a CheckpointError)
    |   +-- WeightsUnavailableError timm's pretrained weights cannot be had
    |   +-- KeyMismatchError        a state dict's keys are not the architecture's (KeyError too)
    |   +-- ImageLoadError          an image cannot be read, fetched or decoded
    |   +-- UnsupportedModelError   the model cannot be expressed in transformers (TypeError too)
    |   +-- MissingExtraError       an optional stack (ONNX) is not installed
    |   +-- MemoryShortError        the step needs more memory than the process may use
    +-- ParityFailure               the two models (or preprocessings) differ (`EXIT_PARITY`)
        +-- ParityError             logits or hidden states (`deit_port.parity`)
        +-- PreprocessingError      the image processor (`deit_port.preprocess`)

Anything else escaping deit_port is a bug in deit_port: the CLI keeps its traceback and exits
with `EXIT_BUG`.

The message of every error is one line that says what is wrong and what to do
(`first_line` makes one of a library's multi-line message).
"""

from __future__ import annotations

import errno
import os
import stat

__all__ = [  # noqa: RUF022 -- in the order of the docstring's tree, not alphabetical
    "EXIT_OK",
    "EXIT_PARITY",
    "EXIT_BAD_INPUT",
    "EXIT_BUG",
    # the tree, in the docstring's order
    "DeitPortError",
    "BadInputError",
    "OutputError",
    "CheckpointError",
    "LabelsError",
    "WeightsUnavailableError",
    "KeyMismatchError",
    "ImageLoadError",
    "UnsupportedModelError",
    "MissingExtraError",
    "MemoryShortError",
    "ParityFailure",
    "ParityError",
    "PreprocessingError",
    # messages
    "first_line",
    "few",
    "not_a_regular_file",
]

EXIT_OK, EXIT_PARITY, EXIT_BAD_INPUT, EXIT_BUG = 0, 1, 2, 3


def first_line(e: BaseException, sentence: bool = False) -> str:
    """The first line of an exception's message, for a one-line error: its type's name when
    it has none; for an `OSError`, its `strerror` ("No such file or directory", without the
    repeated path), "no space left on device (disk full)" for ENOSPC. With `sentence`, only
    up to the first ". " (libraries' messages go on with advice that is not ours)."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return "no space left on device (disk full)"
    text = getattr(e, "strerror", None) or str(e).strip()
    if isinstance(e, KeyError) and not isinstance(e, DeitPortError) and e.args:
        text = str(e.args[0])  # KeyError's str() is the repr of its key
    line = text.splitlines()[0] if text else type(e).__name__
    return line.split(". ")[0] if sentence else line


def not_a_regular_file(path: str | os.PathLike) -> str | None:
    """What `path` is, in words, when it is not a regular file to read (None when it is): "not
    found", "a folder", "a named pipe (FIFO), not a regular file", "a character device, not a
    regular file", ... From `stat` alone (links followed): a FIFO is never opened, so never
    waited on, and a device such as /dev/zero never read.

    Example:
        >>> not_a_regular_file("/dev/zero")
        'a character device, not a regular file'
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "not found"
    except OSError as e:  # a parent without permission, a link loop, ...
        return f"not readable ({first_line(e)})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a folder"
    kinds = {
        stat.S_ISFIFO: "a named pipe (FIFO)",
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
        stat.S_ISSOCK: "a socket",
    }
    kind = next((words for test, words in kinds.items() if test(mode)), "a special file")
    return f"{kind}, not a regular file"


def few(items: list[str], n: int = 8) -> str:
    """`[a, b, ... 3 more]`: at most `n` names of a sorted list, for one-line messages."""
    shown = ", ".join(items[:n])
    return f"[{shown}{f', ... {len(items) - n} more' if len(items) > n else ''}]"


class DeitPortError(Exception):
    """The root of deit_port's errors; `exit_code` is what the CLI exits with."""

    exit_code = EXIT_BAD_INPUT

    def __str__(self) -> str:  # KeyError subclasses would repr() the message
        return str(self.args[0]) if self.args else type(self).__name__


class BadInputError(DeitPortError, ValueError):
    """The input (a path, a file, a name, an option) cannot be used as given."""

    exit_code = EXIT_BAD_INPUT


class OutputError(BadInputError):
    """The output folder or file cannot be written as asked."""


class CheckpointError(BadInputError):
    """A checkpoint cannot be used as given; the message says what to do."""


class LabelsError(CheckpointError):
    """A labels file cannot be used. A `CheckpointError` too: labels come with a checkpoint,
    and `except CheckpointError` catches a bad one of either."""


class WeightsUnavailableError(BadInputError):
    """timm's pretrained weights for a model could not be had (offline, not cached, ...)."""


class KeyMismatchError(BadInputError, KeyError):
    """A state dict's keys are not the ones the architecture has: lists both sides, sorted."""

    def __init__(
        self, what: str, missing: list[str], unexpected: list[str], hint: str = ""
    ) -> None:
        """`what`: the state dict, e.g. "transformers state dict" or "the checkpoint for X"."""
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        parts = []
        for word, keys in (("missing", self.missing), ("unexpected", self.unexpected)):
            if keys:
                parts.append(f"{word} {len(keys)} key{'s' if len(keys) > 1 else ''} {few(keys)}")
        hint = f"; {hint}" if hint else ""
        super().__init__(f"{what} does not match the architecture: {'; '.join(parts)}{hint}")


class ImageLoadError(BadInputError):
    """An image could not be read, fetched or decoded."""


class UnsupportedModelError(BadInputError, TypeError):
    """The timm model has a structure transformers' ViT/DeiT cannot express, or is no ViT;
    `feature` names what (e.g. "register tokens"), for grouping refusals (`deit-port list
    --refused`)."""

    def __init__(self, message: str, feature: str | None = None) -> None:
        super().__init__(message)
        self.feature = feature or message


class MissingExtraError(BadInputError):
    """An optional dependency (an extra such as `deit-port[onnx]`) is not installed."""


class MemoryShortError(BadInputError, MemoryError):
    """The step needs more memory than this process may use (checked first, or an allocation
    that failed anyway); the message gives both figures and what to do."""


class ParityFailure(DeitPortError):
    """The converted model (or its preprocessing) does not compute what timm computes."""

    exit_code = EXIT_PARITY

    def __init__(self, report) -> None:
        self.report = report
        super().__init__(report.summary())


class ParityError(ParityFailure, RuntimeError):
    """The converted model's logits (or hidden states) differ from timm's; `report` says how."""


class PreprocessingError(ParityFailure, RuntimeError):
    """A folder's image processor does not reproduce timm's eval transform."""
