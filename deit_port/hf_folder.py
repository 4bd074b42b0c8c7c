"""Transformers folders: writing the weights as safetensors shards with the config, reading
a folder back, loading it strictly, and the dtype its weights are written in."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from .arch import ArchSpec
from .errors import BadInputError, KeyMismatchError, first_line
from .hf_config import hf_model_class
from .versions import transformers_major

__all__ = [
    "CONFIG_FILE",
    "DTYPES",
    "dtype_key",
    "float32_kwargs",
    "folder_dtype",
    "hf_folder_size",
    "load_hf_folder",
    "load_hf_state_dict",
    "read_folder_config",
    "read_hf_folder",
    "resolve_dtype",
    "save_hf_folder",
]

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
# The dtypes a folder's weights can be written in (`--dtype`).
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SINGLE, _INDEX = "model.safetensors", "model.safetensors.index.json"


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

    files = _weight_files(folder)
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


def _weight_files(folder: Path) -> list[str]:
    """The safetensors files of a folder: its index's shards, or its one `model.safetensors`."""
    if (folder / _INDEX).is_file():
        try:
            weight_map = json.loads((folder / _INDEX).read_text())["weight_map"]
            return sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise BadInputError(f"{folder / _INDEX} is not a valid index: {first_line(e)}") from e
    if (folder / _SINGLE).is_file():
        return [_SINGLE]
    raise BadInputError(f"{folder} has no {_SINGLE} or {_INDEX}: only safetensors weights are read")


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
