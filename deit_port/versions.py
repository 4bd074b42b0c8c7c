"""What this installation runs on: library versions and where pretrained weights are looked up."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

__all__ = ["library_versions", "transformers_major", "weights_lookup"]

_LIBRARIES = ("deit-port", "torch", "timm", "transformers", "huggingface_hub", "safetensors")


def library_versions() -> dict[str, str]:
    """`{"python": ..., "torch": ..., "timm": ..., "transformers": ..., ...}` as installed."""
    out = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def transformers_major() -> int:
    """The installed transformers' major version (4 or 5): where their APIs differ, the one
    place that decides."""
    return int(version("transformers").split(".")[0])


def weights_lookup() -> str:
    """Where `--init pretrained` looks for timm's weights, and whether it may download."""
    from huggingface_hub import constants

    mode = "offline (HF_HUB_OFFLINE)" if constants.HF_HUB_OFFLINE else "online, then the cache"
    return f"hub cache {constants.HF_HUB_CACHE}, {mode}"
