"""deit_port: convert timm DeiT checkpoints to Hugging Face transformers, with proven parity."""

from importlib.metadata import version

from .convert import (
    ArchSpec,
    convert_deit_checkpoint,
    convert_timm_model,
    hf_to_timm,
    merge_qkv,
    split_qkv,
    timm_to_hf,
)

__all__ = [
    "ArchSpec",
    "convert_deit_checkpoint",
    "convert_timm_model",
    "hf_to_timm",
    "merge_qkv",
    "split_qkv",
    "timm_to_hf",
]
__version__ = version("deit-port")  # the one place it is set: pyproject.toml
