"""Where the timm model comes from: model names, timm's pretrained weights, seeded random weights."""

from __future__ import annotations

import difflib
import logging
import math

import torch
from torch import nn

from .errors import BadInputError, WeightsUnavailableError, first_line

__all__ = [
    "build_on_meta",
    "create_timm_model",
    "randomize_",
    "resolve_model_name",
    "supported_models",
]

logger = logging.getLogger(__name__)

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
    """
    import timm

    if name.startswith(_LEGACY_PREFIX):
        name = "deit_" + name[len(_LEGACY_PREFIX) :]
    arch = name.split(".", 1)[0]
    if timm.is_model(arch):
        return name
    close = difflib.get_close_matches(arch, supported_models(), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "run `deit-port list` for the names"
    raise BadInputError(f"unknown timm model {name!r}: {hint}")


def build_on_meta(name: str, **kwargs) -> nn.Module:
    """`timm.create_model(name, **kwargs)` on the meta device (no memory, no values).

    timm's weight init is skipped (`weight_init="skip"`) where timm allows it: on meta tensors
    it computes nothing, but costs up to 0.4 s a model in dispatch. Older timm (1.0.16) cannot
    skip it for distilled models (an assertion), so those are built with it.
    """
    import timm

    with torch.device("meta"):
        try:
            return timm.create_model(name, pretrained=False, weight_init="skip", **kwargs)
        except (AssertionError, TypeError):  # the init cannot be skipped; the same model with it
            return _create(name, **kwargs)


def _create(name: str, **kwargs) -> nn.Module:
    """`timm.create_model(name, pretrained=False, **kwargs)`; settings timm refuses (a
    negative class count, an unknown keyword, ...) are bad input, named."""
    import timm

    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except (AssertionError, TypeError, ValueError, RuntimeError) as e:
        settings = ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "its defaults"
        raise BadInputError(f"timm cannot build {name} with {settings}: {first_line(e)}") from e


def create_timm_model(name: str, init: str = "pretrained", seed: int = 0, **kwargs) -> nn.Module:
    """Create a timm model in eval mode.

    Args:
        name: a timm model name, optionally with a pretrained tag.
        init: `pretrained` (timm's own weights, through timm's loading and hub cache) or
            `random` (seeded, every tensor perturbed: see `randomize_`).
        seed: the seed for `random`.
        **kwargs: passed to `timm.create_model` (e.g. `num_classes`, `img_size`).

    Raises:
        WeightsUnavailableError: `pretrained` weights cannot be had; never falls back to random.
    """
    import timm

    name = resolve_model_name(name)
    if init == "random":
        # built on the meta device: timm's own init would be overwritten anyway
        model = build_on_meta(name, **kwargs)
        if any(True for _ in model.buffers()):  # buffers are not ours to randomize
            model = _create(name, **kwargs)
        else:
            model = model.to_empty(device="cpu")
        randomize_(model, seed)
    elif init == "pretrained":
        try:
            model = timm.create_model(name, pretrained=True, **kwargs)
        except Exception as e:  # offline, not cached, no weights for this tag, ...
            raise WeightsUnavailableError(
                f"pretrained weights for {name} cannot be had ({first_line(e)}); "
                "give --checkpoint PATH for weights you have, or --init random for seeded random ones"
            ) from e
    else:
        raise BadInputError(f"init must be 'pretrained' or 'random', not {init!r}")
    return model.eval()


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Overwrite every parameter of `model` in place with seeded values of a realistic scale.

    timm's default init leaves biases at zero and norms at one, so a swapped or dropped tensor
    would not change the output; here nothing is zero or one:
    - LayerNorm weights ~ 1 + N(0, 0.1), biases ~ N(0, 0.05);
    - layer-scale gammas ~ U(0.1, 1);
    - Linear/Conv weights ~ N(0, 1/fan_in), their biases ~ N(0, 0.05);
    - class/distillation tokens and position embeddings ~ N(0, 0.02).

    Returns:
        `model`, for chaining.
    """
    g = torch.Generator().manual_seed(seed)

    def draw(shape, std=1.0, mean=0.0):
        return torch.randn(shape, generator=g) * std + mean

    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
                value = draw(p.shape, 0.1, 1.0) if name == "weight" else draw(p.shape, 0.05)
            elif name == "gamma":
                value = torch.rand(p.shape, generator=g) * 0.9 + 0.1
            elif name == "bias":
                value = draw(p.shape, 0.05)
            elif p.ndim >= 2 and name == "weight":
                fan_in = math.prod(p.shape[1:])
                value = draw(p.shape, fan_in**-0.5)
            else:  # tokens, position embeddings
                value = draw(p.shape, 0.02)
            p.copy_(value.to(p.dtype))
    return model
