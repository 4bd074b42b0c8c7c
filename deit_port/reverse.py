"""Reverse conversion: a transformers ViT/DeiT folder back to a timm safetensors checkpoint.

The folder's `config.json` gives the architecture (`ArchSpec.from_hf_config`); its weights are
read from the safetensors files themselves, in the hub key format (transformers 5 renames keys
in memory, so `model.state_dict()` would not do); `hf_to_timm` maps them; the checkpoint is
written beside its final name, loaded back exactly as a user would load it,

    timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": path}, **kwargs)

compared with the transformers model (`check_parity`), and only then moved into place.

A transformers model has no layer scale and always embeds the class token's position, so it
is an exact plain DeiT. Written for a DeiT III name (`--model deit3_...`), the gammas are ones
with the scale kept in the weights, and the class-token rows of the position embedding must be
zero (they are, for a folder `deit-port convert` wrote from a DeiT III).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import mapping
from .arch import ArchSpec
from .errors import BadInputError, KeyMismatchError, ParityError
from .hf_folder import load_hf_folder, read_hf_folder
from .output import check_output_file
from .parity import ParityReport, check_parity, parity_inputs
from .progress import no_progress
from .publish import atomic_file
from .registry import build_on_meta, resolve_model_name, supported_models
from .tolerances import DEFAULT_ATOL

__all__ = [
    "STEPS",
    "ReverseResult",
    "TimmTarget",
    "convert_hf_folder",
    "timm_target",
]

logger = logging.getLogger(__name__)

# The steps `convert_hf_folder` reports to its `progress` callback, in order.
STEPS = ("reading", "writing", "loading in timm", "verifying")
# Settings a timm name's architecture may differ in and still be the model meant:
# a transformers model cannot say whether it was a DeiT III.
_FREE_FIELDS = frozenset({"layer_scale", "no_embed_class"})
# Settings every timm name takes as kwargs without becoming another model.
_KWARG_FIELDS = frozenset({"num_classes", "img_size", "in_chans"})


@dataclass(frozen=True)
class TimmTarget:
    """What the checkpoint is written for: a timm name, the kwargs it is created with, the spec.

    Example:
        >>> target = timm_target(spec)
        >>> target.name, target.kwargs
        ('deit_tiny_patch16_224', {'num_classes': 10})
    """

    name: str
    kwargs: dict
    spec: ArchSpec

    def create(self, file: str | os.PathLike | None = None) -> nn.Module:
        """The timm model in eval mode; with `file`, through timm's pretrained loading of it."""
        import timm

        if file is None:
            return timm.create_model(self.name, pretrained=False, **self.kwargs).eval()
        return timm.create_model(
            self.name, pretrained=True, pretrained_cfg_overlay=self.overlay(file), **self.kwargs
        ).eval()

    def overlay(self, file: str | os.PathLike) -> dict:
        """The `pretrained_cfg_overlay` that loads `file`, with the classifier size when it
        differs from the name's (timm would drop the head otherwise)."""
        overlay = {"file": str(file)}
        if "num_classes" in self.kwargs:
            overlay["num_classes"] = self.kwargs["num_classes"]
        return overlay

    def load_hint(self, file: str | os.PathLike) -> str:
        """The Python line that loads the written checkpoint."""
        args = [
            repr(self.name),
            "pretrained=True",
            f"pretrained_cfg_overlay={self.overlay(file)!r}",
        ]
        args += [f"{k}={_hint_value(v)}" for k, v in self.kwargs.items()]
        return f"timm.create_model({', '.join(args)})"


@dataclass(frozen=True)
class ReverseResult:
    """The outcome of `convert_hf_folder`."""

    output: Path
    target: TimmTarget
    report: ParityReport


def timm_target(spec: ArchSpec, model: str | None = None) -> TimmTarget:
    """The timm model a transformers model of `spec` is written for.

    Args:
        spec: the transformers model's spec (`read_hf_folder`).
        model: a timm name; its architecture must be `spec`'s, up to the classifier size,
            resolution and input channels, which are passed as kwargs (a DeiT III name is
            accepted for a plain spec). Default: the registered DeiT whose architecture is
            `spec` with the fewest kwargs; failing that, DeiT tiny (distilled or not) with
            every setting passed as a kwarg.

    Raises:
        BadInputError: `model` is unknown or has another architecture (the differences named).
    """
    if model is not None:
        name = resolve_model_name(model)
        diff = _differences(_default_spec(name), spec, ignore=_FREE_FIELDS | _KWARG_FIELDS)
        if diff:
            raise BadInputError(f"timm model {name} is another architecture: {diff}")
        return _target_for(name, spec, ignore=_FREE_FIELDS)
    names = [
        n for n in supported_models() if not _differences(_default_spec(n), spec, _KWARG_FIELDS)
    ]
    if names:
        targets = [_target_for(n, spec) for n in names]
        return min(targets, key=lambda t: (len(t.kwargs), t.name))
    name = "deit_tiny_distilled_patch16_224" if spec.distilled else "deit_tiny_patch16_224"
    return _target_for(name, spec, full=True)


@functools.cache
def _default_spec(name: str) -> ArchSpec:
    return ArchSpec.from_timm(build_on_meta(name))


def _target_for(
    name: str, spec: ArchSpec, full: bool = False, ignore: frozenset[str] = frozenset()
) -> TimmTarget:
    """`name` with the kwargs that make it `spec` (with `full`, every architecture setting);
    checked on a meta-device build."""
    default = _default_spec(name)
    kwargs: dict = {}
    if full:
        kwargs = {
            "embed_dim": spec.embed_dim,
            "depth": spec.depth,
            "num_heads": spec.num_heads,
            "mlp_ratio": _mlp_ratio(spec.embed_dim, spec.mlp_hidden),
            "patch_size": spec.patch_size,
            "qkv_bias": spec.qkv_bias,
        }
        if spec.eps != default.eps:
            from timm.layers import LayerNorm

            kwargs["norm_layer"] = functools.partial(LayerNorm, eps=spec.eps)
    for key in sorted(_KWARG_FIELDS):
        if full or getattr(spec, key) != getattr(default, key):
            kwargs[key] = getattr(spec, key)
    own = ArchSpec.from_timm(build_on_meta(name, **kwargs))
    diff = _differences(own, spec, ignore=ignore)
    if diff:
        raise BadInputError(f"timm cannot express this model as {name}: {diff}")
    return TimmTarget(name, kwargs, own)


def _mlp_ratio(embed_dim: int, mlp_hidden: int) -> float:
    """The float timm multiplies back to exactly `mlp_hidden` (`int(embed_dim * ratio)`)."""
    ratio = mlp_hidden / embed_dim
    while int(embed_dim * ratio) < mlp_hidden:
        ratio = math.nextafter(ratio, math.inf)
    return ratio


def _differences(actual: ArchSpec, expected: ArchSpec, ignore: frozenset[str] = frozenset()) -> str:
    return ", ".join(
        f"{f.name} {getattr(actual, f.name)} (the folder has {getattr(expected, f.name)})"
        for f in dataclasses.fields(ArchSpec)
        if f.name not in ignore and getattr(actual, f.name) != getattr(expected, f.name)
    )


def _hint_value(value) -> str:
    if isinstance(value, functools.partial):
        kw = ", ".join(f"{k}={v!r}" for k, v in value.keywords.items())
        return f"functools.partial({value.func.__module__}.{value.func.__qualname__}, {kw})"
    return repr(value)


def convert_hf_folder(
    hf_dir: str | os.PathLike,
    output_file: str | os.PathLike,
    model: str | None = None,
    *,
    overwrite: bool = False,
    atol: float = DEFAULT_ATOL,
    progress: Callable[[str], None] | None = None,
) -> ReverseResult:
    """Write a transformers ViT/DeiT folder as a timm safetensors checkpoint, parity checked.

    The checkpoint is written beside `output_file`, loaded back through
    `timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": ...})`, checked
    to hold exactly the converted tensors, compared with the transformers model loaded from
    `hf_dir`, and only then moved into place.

    Args:
        hf_dir: the transformers folder.
        output_file: the `.safetensors` file to write.
        model: the timm name to write for (see `timm_target`); default: found from the config.
        overwrite: replace an existing `output_file`.
        atol: the parity contract.
        progress: called with the name of each step as it starts (`STEPS`).

    Returns:
        A `ReverseResult`: the output path, the timm target, the parity report.

    Raises:
        ParityError, BadInputError (OutputError, KeyMismatchError, ...): nothing was written.

    Example:
        >>> result = convert_hf_folder("deit-tiny-hf", "deit_tiny.safetensors")
        >>> result.target.load_hint(result.output)
    """
    from safetensors.torch import save_file

    step = progress or no_progress
    out = check_output_file(
        output_file, overwrite, suffix=".safetensors", why="timm loads other names with torch.load"
    )
    step("reading")
    _, hf_state_dict, spec = read_hf_folder(hf_dir)
    target = timm_target(spec, model)
    logger.info("writing for timm %s %s", target.name, target.kwargs)
    state_dict = mapping.hf_to_timm(hf_state_dict, target.spec)
    state_dict = {k: v.contiguous() for k, v in state_dict.items()}  # safetensors needs dense
    nbytes = sum(v.nbytes for v in state_dict.values())
    with atomic_file(out, overwrite, size=nbytes) as tmp:
        step("writing")
        save_file(state_dict, tmp, metadata={"format": "pt"})
        step("loading in timm")
        timm_model = target.create(tmp)
        _check_loaded(timm_model, state_dict)
        step("verifying")
        hf_model = load_hf_folder(hf_dir, spec).float()  # timm computes in float32 too
        report = check_parity(timm_model, hf_model, _inputs(timm_model, spec), atol=atol)
        logger.info(report.summary())
        if not report.passed:
            raise ParityError(report)
    return ReverseResult(out, target, report)


def _inputs(timm_model: nn.Module, spec: ArchSpec) -> torch.Tensor:
    """The parity batch; N(0, 1) tensors for other than 3 channels (timm's transform makes RGB)."""
    if spec.in_chans == 3:
        return parity_inputs(timm_model)
    size = (4, spec.in_chans, spec.img_size, spec.img_size)
    return torch.randn(size, generator=torch.Generator().manual_seed(0))


def _check_loaded(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """timm loads non-strictly in places (a classifier of another size is dropped): make sure
    the model holds exactly the written tensors."""
    loaded = model.state_dict()
    if set(loaded) != set(state_dict):
        raise KeyMismatchError(
            "loaded timm",
            sorted(set(state_dict) - set(loaded)),
            sorted(set(loaded) - set(state_dict)),
        )
    for key, value in state_dict.items():
        if not torch.equal(loaded[key], value.to(loaded[key].dtype)):
            raise BadInputError(f"timm did not load {key} as written (did it resample or drop it?)")
