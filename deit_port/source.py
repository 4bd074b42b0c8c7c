"""Where the timm model comes from: timm's pretrained weights, seeded random weights, or a
user's checkpoint file; one entry point, `timm_source`, for all three.

    >>> source = timm_source("deit_tiny_patch16_224", WeightSource(checkpoint="best.safetensors"))
    >>> source.model, source.weights
    (VisionTransformer(...), "entry 'model' of best.safetensors (safetensors)")

A checkpoint is read by `deit_port.checkpoint`; the model it fixes (classes, resolution,
channels, patch size: `deit_port.shapes`) is built on the meta device and handed the state dict
through timm's own checkpoint filter (`timm.models.vision_transformer.checkpoint_filter_fn`, as
`timm.models.deit` binds it): original DeiT III `gamma_1`/`gamma_2` become `ls1.gamma`/
`ls2.gamma`, and for another `img_size` the position embedding is resampled exactly as
`timm.create_model(..., pretrained=True)` does.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from .arch import ArchSpec
from .checkpoint import Checkpoint, read_checkpoint, remap_state_dict
from .errors import BadInputError, CheckpointError, WeightsUnavailableError, first_line
from .mapping import check_state_dict, timm_shapes
from .registry import build_on_meta, create_without_weights, resolve_model_name
from .shapes import AUTO, model_kwargs_from, pick_variant, read_shapes

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

__all__ = [
    "INITS",
    "TimmSource",
    "WeightSource",
    "create_timm_model",
    "load_timm_model",
    "randomize_",
    "timm_source",
    "weight_source",
]

logger = logging.getLogger(__name__)

# Where weights come from without a checkpoint (`--init`): timm's own, or seeded random ones.
INITS = ("pretrained", "random")


@dataclass(frozen=True)
class WeightSource:
    """Where the timm model's weights come from, as one value (timm's `PretrainedCfg` is the
    model): built once by the command line from `--checkpoint`, `--init`, `--seed`, `--ema`,
    `--num-classes` and `--img-size`, and handed to the pipeline, verify and the ONNX export.

    Attributes:
        init: `pretrained` (timm's weights) or `random` (seeded, see `randomize_`); not used
            with `checkpoint`.
        seed: seed for `random`.
        checkpoint: a checkpoint file (see `load_timm_model`), or None.
        ema: with `checkpoint`: its EMA weights (True), the plain ones (False), or whichever it
            has (None; an error if both).
        model_kwargs: passed to `timm.create_model` (e.g. `num_classes`, `img_size`).

    Example:
        >>> WeightSource(checkpoint="best.pth", ema=True, model_kwargs={"num_classes": 10})
    """

    init: str = "pretrained"
    seed: int = 0
    checkpoint: str | os.PathLike | None = None
    ema: bool | None = None
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def chosen(self) -> bool:
        """Anything but the default (timm's pretrained weights, as registered) was asked."""
        return self != WeightSource()


# The keyword arguments a `WeightSource` replaces, still accepted where it is taken.
WEIGHT_KEYWORDS = tuple(f.name for f in dataclasses.fields(WeightSource))


def weight_source(weights: WeightSource | None = None, **loose: Any) -> WeightSource:
    """`weights` (default: timm's pretrained weights) with the loose keywords `WEIGHT_KEYWORDS`
    of the calls before `WeightSource` applied: `init`, `seed`, `checkpoint`, `ema`,
    `model_kwargs` (None is an empty one).

    Raises:
        TypeError: a keyword that is not one of them.

    Example:
        >>> weight_source(init="random", seed=1) == WeightSource(init="random", seed=1)
        True
    """
    unknown = sorted(set(loose) - set(WEIGHT_KEYWORDS))
    if unknown:
        raise TypeError(f"unexpected keyword argument {unknown[0]!r}")
    if loose.get("model_kwargs", {}) is None:
        loose["model_kwargs"] = {}
    return dataclasses.replace(weights or WeightSource(), **loose)


@dataclass(frozen=True)
class TimmSource:
    """The timm model to convert, and where its weights came from.

    Attributes:
        model: the timm model, in eval mode.
        name: its timm name (resolved: tags kept, legacy names renamed, `auto` picked).
        weights: where the weights came from, in words (for logs and the model card).
        notes: what was read from or done to the checkpoint (shapes, a resampled position
            embedding), one phrase each, for the model card.
        checkpoint: the `Checkpoint` read, or None for pretrained or random weights.
    """

    model: nn.Module
    name: str
    weights: str
    notes: tuple[str, ...] = ()
    checkpoint: Checkpoint | None = field(default=None, repr=False)

    def mapped_again(self) -> dict[str, torch.Tensor] | None:
        """The checkpoint's tensors through a fresh map of its file, for writing them
        (`checkpoint.remap_state_dict`); None without a checkpoint or where it is not mapped."""
        return None if self.checkpoint is None else remap_state_dict(self.checkpoint)


def timm_source(name: str, weights: WeightSource | None = None, **loose: Any) -> TimmSource:
    """The timm model `name` with its weights: from `weights.checkpoint` when given, else
    `weights.init`.

    Args:
        name: a timm model name (tags and legacy `vit_deit_*` names accepted); `auto` with a
            checkpoint: the registered DeiT its tensors fit.
        weights: where the weights come from (default: timm's pretrained weights).
        **loose: keyword-only compatibility: `init`, `seed`, `model_kwargs`, `checkpoint`,
            `ema`, applied to `weights` (`weight_source`).

    Raises:
        BadInputError: `auto` or `ema` without a checkpoint, and everything `load_timm_model`
            and `create_timm_model` raise.
    """
    w = weight_source(weights, **loose)
    init, seed, checkpoint, ema, kwargs = w.init, w.seed, w.checkpoint, w.ema, dict(w.model_kwargs)
    if checkpoint is not None:
        model, ckpt = load_timm_model(name, checkpoint, ema=ema, **kwargs)
        picked = (
            (getattr(model, "pretrained_cfg", None) or {})["architecture"] if name == AUTO else name
        )
        return TimmSource(model, resolve_model_name(picked), ckpt.describe(), ckpt.notes, ckpt)
    if name == AUTO:
        raise BadInputError(
            "MODEL auto picks the DeiT a checkpoint's tensors fit: give --checkpoint PATH, or "
            "a timm model name"
        )
    if ema is not None:
        raise BadInputError("--ema/--no-ema choose weights inside a --checkpoint; give one")
    model = create_timm_model(name, init=init, seed=seed, **kwargs)
    name = resolve_model_name(name)
    if init == "random":
        return TimmSource(model, name, f"seeded random weights (seed {seed}), not a trained model")
    cfg = getattr(model, "pretrained_cfg", None) or {}
    where = cfg.get("hf_hub_id") or cfg.get("url") or name
    return TimmSource(model, name, f"timm's pretrained weights ({where})")


def load_timm_model(
    name: str, checkpoint: str | os.PathLike, *, ema: bool | None = None, **kwargs
) -> tuple[nn.Module, Checkpoint]:
    """Build the timm model `name` with a checkpoint's weights, without a throwaway random init.

    What the checkpoint's tensors fix and `kwargs` do not give (classes, resolution, channels,
    patch size) is read from them (`deit_port.shapes`, logged as `from the checkpoint: ...`);
    a keyword that contradicts them is an error, except `img_size`, for which timm resamples the
    position embedding. Tensors of another registered variant are refused, naming it. The model
    is created on the meta device (no memory, no init), its architecture checked
    (`ArchSpec.from_timm` refuses what transformers cannot express), the state dict passed
    through timm's checkpoint filter (`checkpoint_filter_fn`: DeiT III's `gamma_N` renames, the
    position-embedding resampling), its keys and shapes checked against the model, and the
    tensors assigned with `load_state_dict(strict=True, assign=True)`. Floating-point weights
    are computed in float32.

    Args:
        name: a timm model name (tags and legacy `vit_deit_*` names accepted), or `auto`: the
            registered DeiT the checkpoint's tensors fit (`deit_port.shapes.pick_variant`).
        checkpoint: the checkpoint file (see `read_checkpoint`).
        ema: which weights (see `read_checkpoint`).
        **kwargs: passed to `timm.create_model` (e.g. `num_classes`, `img_size`).

    Returns:
        The model in eval mode (its `pretrained_cfg["architecture"]` names the variant), and
        the `Checkpoint` read, with `notes` on what was read from it or resampled.

    Raises:
        CheckpointError: a bad file; tensors of another variant (the fitting ones named); a
            keyword contradicting the tensors (both values named); keys or shapes that are not
            the model's (missing and unexpected keys listed sorted; the first mismatching
            shape named with both shapes).
        TypeError, ValueError: not a timm VisionTransformer, an unsupported feature, a name
            timm does not know.

    Example:
        >>> model, ckpt = load_timm_model("deit3_small_patch16_224", "deit_3_small_224_1k.pth")
    """

    auto = name == AUTO
    if not auto:
        name = resolve_model_name(name)
        base = ArchSpec.from_timm(build_on_meta(name, **kwargs))  # refused before reading the file
    ckpt = read_checkpoint(checkpoint, ema=ema)
    shapes = read_shapes(ckpt.state_dict)
    if auto:
        name = pick_variant(shapes)
        logger.info("auto: the checkpoint's tensors fit %s", name)
        base = ArchSpec.from_timm(build_on_meta(name, **kwargs))
    kwargs, notes = model_kwargs_from(shapes, name, base, kwargs, ckpt.args)
    model = build_on_meta(name, **kwargs)
    spec = ArchSpec.from_timm(model)
    state_dict = _timm_filter(ckpt.state_dict, model)
    state_dict = _check_against(state_dict, timm_shapes(spec), name)
    model.load_state_dict(state_dict, strict=True, assign=True)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{name}: {left[0]} was not set by the checkpoint")
    return model.eval(), dataclasses.replace(ckpt, notes=notes)


def _timm_filter(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """timm's own checkpoint filter, as `timm.models.deit` binds it for pretrained weights
    (`adapt_layer_scale=True`): `gamma_N` -> `lsN.gamma`, the position embedding resampled to
    the model's grid (`resample_abs_pos_embed`, bicubic, antialiased)."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    return checkpoint_filter_fn(
        dict(state_dict), cast("VisionTransformer", model), adapt_layer_scale=True
    )


def _check_against(
    state_dict: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], name: str
) -> dict[str, torch.Tensor]:
    """Keys and shapes as `shapes` (timm's key order) says, or a one-line error; float32 values."""
    # classes and resolution were read from the tensors: a wrong shape is another variant
    check_state_dict(state_dict, shapes, f"the checkpoint for {name}")
    for key, value in state_dict.items():
        if not value.is_floating_point():
            raise CheckpointError(
                f"the checkpoint's {key!r} holds {str(value.dtype).removeprefix('torch.')} "
                f"values, {name} has floating-point weights: is the file damaged? get or save "
                "it again"
            )
    out = {}
    for key, value in state_dict.items():
        if value.dtype != torch.float32:
            value = value.float()
        out[key] = value
    dtypes = sorted({str(v.dtype) for v in state_dict.values() if v.is_floating_point()})
    if dtypes != ["torch.float32"]:
        logger.info("checkpoint holds %s weights; computing in float32", ", ".join(dtypes))
    return out


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
            model = create_without_weights(name, **kwargs)
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
        raise BadInputError(f"init must be one of {', '.join(INITS)}, not {init!r}")
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
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            # each draw goes straight into the parameter: no temporary of its size
            if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
                mean, std = (1.0, 0.1) if name == "weight" else (0.0, 0.05)
                p.normal_(mean, std, generator=g)
            elif name == "gamma":
                p.uniform_(0.1, 1.0, generator=g)
            elif name == "bias":
                p.normal_(0.0, 0.05, generator=g)
            elif p.ndim >= 2 and name == "weight":
                p.normal_(0.0, math.prod(p.shape[1:]) ** -0.5, generator=g)
            else:  # tokens, position embeddings
                p.normal_(0.0, 0.02, generator=g)
    return model
