"""Writing and reading transformers folders: atomic output, safetensors shards, strict loading."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from .arch import ArchSpec
from .hf_config import hf_model_class
from .mapping import KeyMismatchError

__all__ = ["OutputError", "atomic_folder", "load_hf_folder", "load_hf_state_dict", "save_hf_folder"]

logger = logging.getLogger(__name__)


class OutputError(ValueError):
    """The output folder cannot be written as asked."""


@contextlib.contextmanager
def atomic_folder(output_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `output_dir`; move it into place on success.

    On any exception (including a parity failure raised inside the block, or KeyboardInterrupt)
    the temporary folder is removed and `output_dir` is left as it was. With `overwrite`, an
    existing `output_dir` is replaced as a whole, so no stale shard or index survives.

    Raises:
        OutputError: `output_dir` is a file, or a non-empty folder without `overwrite`.
    """
    out = Path(output_dir).absolute()
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} is an existing file; give a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"output folder {out} is not empty; pass --overwrite to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    except OSError as e:
        raise OutputError(f"cannot write beside {out}: {e.strerror or e}") from e
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.rename(out, old / "x")  # move aside; restored if the next rename fails
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(old / "x", out)
                raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_hf_folder(
    folder: str | os.PathLike,
    state_dict: dict[str, torch.Tensor],
    config,
    max_shard_size: int | str = "5GB",
) -> None:
    """Write `config.json` and the weights as safetensors shards (with an index past one shard).

    Uses `huggingface_hub.save_torch_state_dict`, the writer transformers uses itself. It
    refuses tensors that are views of part of a storage (the split query/key/value), so those
    are copied here, one at a time as they are written.
    """
    from huggingface_hub import save_torch_state_dict

    state_dict = {k: v if _owns_storage(v) else v.clone() for k, v in state_dict.items()}
    save_torch_state_dict(state_dict, folder, max_shard_size=max_shard_size)
    config.save_pretrained(folder)


def _owns_storage(t: torch.Tensor) -> bool:
    storage = t.untyped_storage()
    return t.data_ptr() == storage.data_ptr() and t.numel() * t.element_size() == storage.nbytes()


def load_hf_folder(folder: str | os.PathLike, spec: ArchSpec, **kwargs) -> torch.nn.Module:
    """Load a converted folder into the transformers class of `spec`, strictly, in eval mode.

    Raises:
        KeyMismatchError: transformers reported missing, unexpected or mismatched keys.
    """
    cls = hf_model_class(spec)
    if spec.num_classes == 0:
        kwargs.setdefault("add_pooling_layer", False)
    model, info = cls.from_pretrained(folder, output_loading_info=True, **kwargs)
    _raise_on_loading_info(info, "transformers")
    return model.eval()


def load_hf_state_dict(state_dict: dict[str, torch.Tensor], config, spec: ArchSpec):
    """Build the transformers model of `spec` from a hub-format state dict, in memory.

    transformers' own `from_pretrained(None, config=..., state_dict=...)` does the loading, so
    the 4.x hub key format is renamed by whichever transformers is installed.
    """
    cls = hf_model_class(spec)
    kwargs = {"add_pooling_layer": False} if spec.num_classes == 0 else {}
    model, info = cls.from_pretrained(
        None, config=config, state_dict=state_dict, output_loading_info=True, **kwargs
    )
    _raise_on_loading_info(info, "transformers")
    return model.eval()


def _raise_on_loading_info(info: dict, side: str) -> None:
    missing = list(info.get("missing_keys", []))
    unexpected = list(info.get("unexpected_keys", []))
    mismatched = [str(k) for k in info.get("mismatched_keys", [])]
    if missing or unexpected or mismatched:
        raise KeyMismatchError(side, missing + mismatched, unexpected)
