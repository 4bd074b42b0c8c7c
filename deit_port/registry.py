"""timm's model registry: the DeiT names, resolving a name, building an architecture without
weights (on the meta device)."""

from __future__ import annotations

import difflib

import torch
from torch import nn

from .errors import BadInputError, first_line

__all__ = ["build_on_meta", "create_without_weights", "resolve_model_name", "supported_models"]

# transformers' script used these timm names, long gone from timm.
_LEGACY_PREFIX = "vit_deit_"


def supported_models() -> list[str]:
    """The timm DeiT architectures, sorted (`timm.list_models("deit*")`)."""
    import timm

    return sorted(timm.list_models("deit*"))


def resolve_model_name(name: str) -> str:
    """Return the timm name for `name`, accepting pretrained tags and the legacy `vit_deit_*`.

    Raises:
        BadInputError: an unknown name, with the closest supported names as suggestions.

    Example:
        >>> resolve_model_name("vit_deit_tiny_patch16_224")
        'deit_tiny_patch16_224'
    """
    import timm

    if name.startswith(_LEGACY_PREFIX):
        name = "deit_" + name[len(_LEGACY_PREFIX) :]
    arch = name.split(".", 1)[0]
    if timm.is_model(arch):
        return name
    # issue 27: the ViTs too (`deit-port list --all`)
    known = supported_models() + timm.list_models("vit_*")
    close = difflib.get_close_matches(arch, known, n=3, cutoff=0.6)
    hint = (
        f"did you mean {', '.join(close)}?" if close else "run `deit-port list --all` for the names"
    )
    raise BadInputError(f"unknown timm model {name!r}: {hint}")


def build_on_meta(name: str, **kwargs) -> nn.Module:
    """`timm.create_model(name, **kwargs)` on the meta device (no memory, no values).

    timm's weight init is skipped (`weight_init="skip"`) where timm allows it: on meta tensors
    it computes nothing, but every init call still goes through torch's dispatch. Older timm (1.0.16) cannot
    skip it for distilled models (an assertion), so those are built with it.
    """
    import timm

    with torch.device("meta"):
        try:
            return timm.create_model(name, pretrained=False, weight_init="skip", **kwargs)
        except (AssertionError, TypeError):  # the init cannot be skipped; the same model with it
            return create_without_weights(name, **kwargs)


def create_without_weights(name: str, **kwargs) -> nn.Module:
    """`timm.create_model(name, pretrained=False, **kwargs)` (timm's own init); settings timm
    refuses (a negative class count, an unknown keyword, ...) are bad input, named.

    Raises:
        BadInputError: timm cannot build `name` with `kwargs`.
    """
    import timm

    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except (AssertionError, TypeError, ValueError, RuntimeError) as e:
        settings = ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "its defaults"
        raise BadInputError(f"timm cannot build {name} with {settings}: {first_line(e)}") from e
