"""Convert timm DeiT models to transformers: the importable API, in one place.

What a user calls is here (`__all__`, which `deit_port` exports too); each name lives in the
module of its job: the architecture (`arch`), the key mapping (`mapping`), the config
(`hf_config`), where the weights come from (`source`), the pipeline that writes a checked
folder and its options (`pipeline`), parity (`parity`), tolerances (`tolerances`), errors
(`errors`).

    >>> from deit_port.convert import ArchSpec, timm_to_hf, convert_timm_model
    >>> hf_model = convert_timm_model(timm.create_model("deit_tiny_patch16_224"))

Run as `python -m deit_port.convert --deit_name NAME --pytorch_dump_folder_path DIR`, the
interface of transformers' `convert_deit_timm_to_pytorch.py` (its parser is `cli.seed_parser`).
"""

from __future__ import annotations

from .arch import ArchSpec, with_head
from .errors import (
    BadInputError,
    CheckpointError,
    DeitPortError,
    ImageLoadError,
    KeyMismatchError,
    MissingExtraError,
    OutputError,
    ParityError,
    ParityFailure,
    PreprocessingError,
    UnsupportedModelError,
    WeightsUnavailableError,
)
from .hf_config import build_config
from .mapping import (
    create_rename_keys,
    hf_to_timm,
    merge_qkv,
    qkv_pairs,
    read_in_q_k_v,
    rename_key,
    rename_pairs,
    split_qkv,
    timm_to_hf,
)
from .parity import check_parity
from .pipeline import (
    CheckOptions,
    FolderOptions,
    convert_deit_checkpoint,
    convert_timm_model,
    verify_hf_folder,
)
from .source import WeightSource
from .tolerances import DTYPE_ATOL

__all__ = [
    "DTYPE_ATOL",
    "ArchSpec",
    "BadInputError",
    "CheckOptions",
    "CheckpointError",
    "DeitPortError",
    "FolderOptions",
    "ImageLoadError",
    "KeyMismatchError",
    "MissingExtraError",
    "OutputError",
    "ParityError",
    "ParityFailure",
    "PreprocessingError",
    "UnsupportedModelError",
    "WeightSource",
    "WeightsUnavailableError",
    "build_config",
    "check_parity",
    "convert_deit_checkpoint",
    "convert_timm_model",
    "create_rename_keys",
    "hf_to_timm",
    "merge_qkv",
    "qkv_pairs",
    "read_in_q_k_v",
    "rename_key",
    "rename_pairs",
    "split_qkv",
    "timm_to_hf",
    "verify_hf_folder",
    "with_head",
]

if __name__ == "__main__":  # `python -m deit_port.convert`: the seed script's interface
    from .cli import seed_main

    raise SystemExit(seed_main())
