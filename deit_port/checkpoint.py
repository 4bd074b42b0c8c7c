"""Reading a user's checkpoint file safely into a timm-named state dict.

A checkpoint's format is read off its first bytes, never its extension (`checkpoint_format`).
Then the weights are unwrapped (`model` as facebookresearch/deit saves them, `state_dict`,
the EMA entries `state_dict_ema`/`model_ema` chosen with `ema`), cleaned of `module.` and
`_orig_mod.` prefixes (timm's `clean_state_dict`), and checked: tensors only, finite values.

    >>> ckpt = read_checkpoint("deit_tiny.pth", ema=False)
    >>> ckpt.describe()
    "entry 'model' of deit_tiny.pth (torch zip)"

Building a timm model from it is `deit_port.source`'s job. Every problem is a
`CheckpointError`, one line that says what is wrong and what to do.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint_format import CheckpointFormat, detect_format, read_file
from .errors import CheckpointError

__all__ = [
    "EMA_ENTRIES",
    "WEIGHT_ENTRIES",
    "Checkpoint",
    "read_checkpoint",
    "remap_state_dict",
]

logger = logging.getLogger(__name__)

# Top-level entries that hold a state dict, in timm's order of preference
# (`timm.models.load_state_dict`).
EMA_ENTRIES = ("state_dict_ema", "model_ema")
WEIGHT_ENTRIES = ("state_dict", "model")


_GAMMA = re.compile(r"^(blocks\.\d+)\.gamma_([12])$")


@dataclass(frozen=True)
class Checkpoint:
    """The weights read from a checkpoint file, and where in the file they came from.

    Attributes:
        path: the file.
        format: its `CheckpointFormat` (from the file's bytes).
        entry: the top-level entry the weights came from (`model`, `state_dict_ema`, ...), or
            None when the file is the state dict itself.
        ema: whether those are EMA weights.
        state_dict: the cleaned state dict (timm key names, tensors only).
        ignored: the other top-level entries (optimizer, epoch, args, ...), not used.
        args: the training arguments saved beside the weights (the `args` entry of
            facebookresearch/deit and timm's train.py, an `argparse.Namespace`), as a dict;
            None without one.
        notes: what loading it into a model did beyond assigning tensors (shapes read from it,
            a resampled position embedding), one phrase each, for the model card.
    """

    path: Path
    format: CheckpointFormat
    entry: str | None
    ema: bool
    state_dict: dict[str, torch.Tensor] = field(repr=False)
    ignored: tuple[str, ...] = ()
    args: dict | None = field(default=None, repr=False)
    notes: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line for logs and the model card, e.g. `entry 'model_ema' (EMA) of x.pth (torch zip)`."""
        what = "the state dict" if self.entry is None else f"entry {self.entry!r}"
        ema = " (EMA)" if self.ema else ""
        return f"{what}{ema} of {self.path.name} ({self.format.words})"


def read_checkpoint(path: str | os.PathLike, ema: bool | None = None) -> Checkpoint:
    """Read a checkpoint file safely into a timm-named state dict.

    Args:
        path: a safetensors file, or a `torch.save` file (zip or legacy pickle), any extension.
        ema: True: take the EMA weights (`state_dict_ema`/`model_ema`); False: the plain ones
            (`state_dict`/`model`); None: whichever the file has, an error if it has both.

    Returns:
        The `Checkpoint`: state dict, format, entry used, whether EMA, ignored entries.

    Raises:
        CheckpointError: anything wrong with the file, one line with what to do.

    Example:
        >>> read_checkpoint("deit_base_patch16_224-b5f2ef4d.pth").entry
        'model'
    """
    path = Path(path)
    fmt = detect_format(path)
    if path.suffix.lower() not in fmt.extensions and path.suffix:
        logger.warning(
            "%s is named %s but holds %s; reading it as %s", path, path.suffix, fmt.words, fmt.words
        )
    logger.info("reading %s (%s)", path, fmt.words)
    obj = read_file(path, fmt)
    entry, is_ema, state_dict, ignored = _unwrap(obj, path, ema)
    state_dict = _clean(state_dict, path, entry)
    args = obj.get("args") if entry is not None else None
    args = vars(args) if isinstance(args, argparse.Namespace) else args
    args = dict(args) if isinstance(args, Mapping) else None
    ckpt = Checkpoint(path, fmt, entry, is_ema, state_dict, ignored, args)
    logger.info("weights: %s", ckpt.describe())
    if ignored:
        logger.info("ignored top-level entries: %s", ", ".join(ignored))
    return ckpt


def remap_state_dict(ckpt: Checkpoint) -> dict[str, torch.Tensor] | None:
    """`ckpt`'s weights again, through a fresh memory map of its file: for writing them.

    Writing from a map that no code has read is several times faster than from pages that the
    NaN/Inf check and the forward pass touched (docs/speed.md); a new map costs nothing until
    written from.

    Args:
        ckpt: a checkpoint `read_checkpoint` read (and checked).

    Returns:
        The same names, shapes and dtypes as `ckpt.state_dict` (compared; the values are the
        file's), or None where the weights are not memory-mapped (a legacy pickle, a torch
        zip named `.safetensors`) or are not all float32 (converted when loaded).

    Raises:
        CheckpointError: the file no longer holds those tensors (changed while converting).
    """
    floats = (v.dtype for v in ckpt.state_dict.values() if v.is_floating_point())
    if not ckpt.format.memory_mapped(ckpt.path) or any(dtype != torch.float32 for dtype in floats):
        return None
    path = ckpt.path
    obj = read_file(path, ckpt.format)
    entry, _, state_dict, _ = _unwrap(obj, path, ckpt.ema)
    again = _renamed(state_dict, path, entry)
    checked = {k: (v.shape, v.dtype) for k, v in ckpt.state_dict.items()}
    if entry != ckpt.entry or {k: (v.shape, v.dtype) for k, v in again.items()} != checked:
        raise CheckpointError(f"{path} changed while it was being converted; convert it again")
    return again


def _unwrap(obj, path: Path, ema: bool | None):
    """`(entry, is_ema, state_dict, ignored)` of a loaded checkpoint."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a dict of weights: save "
            "model.state_dict() (not the model or a list)"
        )
    ema_entries = [k for k in EMA_ENTRIES if isinstance(obj.get(k), Mapping)]
    weight_entries = [k for k in WEIGHT_ENTRIES if isinstance(obj.get(k), Mapping)]
    if not ema_entries and not weight_entries:
        if ema:
            raise CheckpointError(
                f"--ema: {path} has no EMA weights (no {' or '.join(EMA_ENTRIES)} entry); "
                "drop --ema"
            )
        return None, False, obj, ()
    if ema is None:
        if ema_entries and weight_entries:
            raise CheckpointError(
                f"{path} holds both weights ({', '.join(weight_entries)}) and EMA weights "
                f"({', '.join(ema_entries)}): pass --ema or --no-ema to choose"
            )
        use_ema = bool(ema_entries)
    elif ema and not ema_entries:
        raise CheckpointError(
            f"--ema: {path} has no EMA weights, only {', '.join(weight_entries)}; drop --ema"
        )
    elif not ema and not weight_entries:
        raise CheckpointError(
            f"--no-ema: {path} holds only EMA weights ({', '.join(ema_entries)}); pass --ema"
        )
    else:
        use_ema = ema
    entry = (ema_entries if use_ema else weight_entries)[0]
    ignored = tuple(sorted(str(k) for k in obj if k != entry))
    return entry, use_ema, obj[entry], ignored


def _clean(state_dict: Mapping, path: Path, entry: str | None) -> dict[str, torch.Tensor]:
    """Tensors only, prefixes stripped (timm's `clean_state_dict`), every floating-point value
    finite. (DeiT III's `gamma_N` names are left to timm's checkpoint filter.)"""
    out = _renamed(state_dict, path, entry)
    _check_finite(out, path, entry)
    return out


def _renamed(state_dict: Mapping, path: Path, entry: str | None) -> dict[str, torch.Tensor]:
    """Tensors only, prefixes stripped (timm's `clean_state_dict`)."""
    from timm.models import clean_state_dict

    where = f"{path}" if entry is None else f"{path} entry {entry!r}"
    if not state_dict:
        raise CheckpointError(f"{where} holds no weights")
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{where} has a non-string key {key!r}: not a state dict")
        if not isinstance(value, torch.Tensor):
            hint = (
                "; is it a training checkpoint? its weights are usually under 'model' or "
                "'state_dict'"
                if entry is None
                else ""
            )
            raise CheckpointError(
                f"{where}: {key!r} is a {type(value).__name__}, not a tensor; a state dict holds "
                f"only tensors{hint}"
            )
    cleaned = clean_state_dict(dict(state_dict))
    if len(cleaned) != len(state_dict):
        raise CheckpointError(
            f"{where} has keys that differ only by a module./_orig_mod. prefix: save one model's "
            "state dict"
        )
    out: dict[str, torch.Tensor] = cleaned
    for key in out:
        # timm's checkpoint filter renames gamma_N to lsN.gamma; one of each would collide there
        m = _GAMMA.match(key)
        if m and (new := f"{m.group(1)}.ls{m.group(2)}.gamma") in out:
            raise CheckpointError(
                f"{where} has both {key!r} and {new!r}: save one model's state dict"
            )
    return out


def _check_finite(state_dict: dict[str, torch.Tensor], path: Path, entry: str | None) -> None:
    where = f"{path}" if entry is None else f"{path} entry {entry!r}"
    for key, value in state_dict.items():
        if value.is_floating_point() or value.is_complex():
            if value.is_floating_point() and _all_finite(value):
                continue
            bad = int((~torch.isfinite(value)).sum())
            if bad:
                raise CheckpointError(
                    f"{where}: tensor {key!r} holds {bad} NaN/Inf value{'s' if bad > 1 else ''}: "
                    "the weights are broken (diverged training?); convert another checkpoint"
                )


def _all_finite(value: torch.Tensor) -> bool:
    """True when every value is finite (False may also mean: look closer).

    One pass without a temporary: a sum is NaN or infinite when any term is (NaN and infinity
    propagate, +inf + -inf is NaN), so a finite sum means finite terms. A sum of finite terms
    can still overflow (in float32, past 3e38): then this says False and the caller counts
    exactly. Half-precision values are summed in float32, where their sum cannot overflow."""
    if not value.numel():
        return False
    acc = torch.float64 if value.dtype == torch.float64 else torch.float32
    return bool(torch.isfinite(value.sum(dtype=acc)))
