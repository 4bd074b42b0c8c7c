"""What a checkpoint's tensors fix: its shapes, read off the state dict, and the registered DeiT
they fit.

A fine-tune's class count, resolution, channels and patch size are in its tensors (`head.weight`
rows, `pos_embed` rows, `patch_embed.proj.weight`); so are the widths, the depth, a distillation
token and layer scale. What no tensor holds (the number of heads, the LayerNorm eps) comes from
MODEL, the registered timm name:

    >>> shapes = read_shapes(state_dict)
    >>> shapes.num_classes, shapes.img_size(num_prefix_tokens=1)
    (37, 160)
    >>> fitting_variants(shapes)
    ['deit_tiny_patch16_224']

The registered variants are `timm.list_models("deit*")`, each described by
`ArchSpec.from_timm(build_on_meta(name))` (built once, cached).
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .arch import ArchSpec
from .errors import CheckpointError
from .registry import build_on_meta, supported_models

__all__ = [
    "AUTO",
    "TensorShapes",
    "fits",
    "fitting_variants",
    "model_kwargs_from",
    "pick_variant",
    "read_shapes",
    "registered_specs",
]

logger = logging.getLogger(__name__)

AUTO = "auto"  # the MODEL that means: the registered DeiT the checkpoint's tensors fit

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


@dataclass(frozen=True)
class TensorShapes:
    """The architecture a timm ViT/DeiT state dict's tensors fix.

    Attributes:
        embed_dim: width (`cls_token`'s last dim).
        depth: number of blocks (`blocks.N.` prefixes).
        mlp_hidden: MLP width (`blocks.0.mlp.fc1.weight` rows), None when absent.
        patch_size: `patch_embed.proj.weight`'s kernel (square), None when absent or non-square.
        in_chans: input channels (`patch_embed.proj.weight`'s second dim).
        num_classes: `head.weight` rows; 0 for a state dict without `head.weight` (headless).
        distilled: has a `dist_token`.
        layer_scale: has DeiT III's layer scale (`ls1.gamma`, or the original `gamma_1`).
        pos_rows: `pos_embed` rows.
    """

    embed_dim: int
    depth: int
    mlp_hidden: int | None
    patch_size: int | None
    in_chans: int | None
    num_classes: int
    distilled: bool
    layer_scale: bool
    pos_rows: int

    @property
    def num_prefix_tokens(self) -> int:
        return 2 if self.distilled else 1

    def grid(self, num_prefix_tokens: int) -> int | None:
        """The side of the square patch grid when `num_prefix_tokens` of the position
        embedding's rows are the prefix tokens' (0 for `no_embed_class`); None if no square fits."""
        n = self.pos_rows - num_prefix_tokens
        side = math.isqrt(max(n, 0))
        return side if n > 0 and side * side == n else None

    def img_size(self, num_prefix_tokens: int) -> int | None:
        """The input resolution in pixels (grid side x patch size), or None."""
        grid = self.grid(num_prefix_tokens)
        return None if grid is None or self.patch_size is None else grid * self.patch_size

    def no_embed_class(self) -> bool | None:
        """Whether the position embedding has no rows for the prefix tokens (DeiT III): True when
        its rows are a square grid alone, False when a grid plus the prefix tokens, None when
        neither."""
        if self.grid(0) is not None:
            return True
        return False if self.grid(self.num_prefix_tokens) is not None else None

    def describe(self) -> str:
        """`embed dim 384, depth 12` (+ `, distilled`, `, layer scale`, an unusual MLP width)."""
        return _describe(self)


def read_shapes(state_dict: Mapping[str, torch.Tensor]) -> TensorShapes | None:
    """Read the architecture off a timm ViT/DeiT state dict's tensors (timm key names).

    Args:
        state_dict: a cleaned state dict (`deit_port.checkpoint.read_checkpoint`).

    Returns:
        The `TensorShapes`, or None when the tensors that fix a DeiT's shape (`cls_token`,
        `pos_embed`, `blocks.N.*`) are not there: the key check then names what is missing.

    Example:
        >>> read_shapes(timm.create_model("deit_tiny_patch16_224").state_dict()).embed_dim
        192
    """
    cls, pos = state_dict.get("cls_token"), state_dict.get("pos_embed")
    blocks = {int(m.group(1)) for k in state_dict if (m := _BLOCK.match(k))}
    if cls is None or pos is None or cls.ndim != 3 or pos.ndim != 3 or not blocks:
        return None
    patch = state_dict.get("patch_embed.proj.weight")
    patch_size = in_chans = None
    if patch is not None and patch.ndim == 4:
        in_chans = int(patch.shape[1])
        if patch.shape[2] == patch.shape[3]:
            patch_size = int(patch.shape[2])
    fc1 = state_dict.get("blocks.0.mlp.fc1.weight")
    head = state_dict.get("head.weight")
    return TensorShapes(
        embed_dim=int(cls.shape[-1]),
        depth=max(blocks) + 1,
        mlp_hidden=None if fc1 is None else int(fc1.shape[0]),
        patch_size=patch_size,
        in_chans=in_chans,
        num_classes=0 if head is None else int(head.shape[0]),
        distilled="dist_token" in state_dict,
        layer_scale=any(k.endswith((".ls1.gamma", ".gamma_1")) for k in state_dict),
        pos_rows=int(pos.shape[1]),
    )


def fits(shapes: TensorShapes, spec: ArchSpec) -> bool:
    """Whether the tensors fit the architecture `spec` up to what a fine-tune changes (classes,
    resolution, patch size, channels): widths, depth, distillation, layer scale and position
    embedding layout (with or without rows for the prefix tokens)."""
    prefix = 0 if spec.no_embed_class else spec.num_prefix_tokens
    return (
        shapes.embed_dim == spec.embed_dim
        and shapes.depth == spec.depth
        and shapes.mlp_hidden in (None, spec.mlp_hidden)
        and shapes.distilled == spec.distilled
        and shapes.layer_scale == spec.layer_scale
        and shapes.grid(prefix) is not None
    )


@functools.cache
def registered_specs() -> tuple[tuple[str, ArchSpec], ...]:
    """`(name, ArchSpec)` of every registered DeiT (`timm.list_models("deit*")`), sorted;
    built on the meta device once per process."""
    return tuple((name, ArchSpec.from_timm(build_on_meta(name))) for name in supported_models())


def fitting_variants(shapes: TensorShapes) -> list[str]:
    """The registered DeiTs whose architecture the tensors fit (see `fits`), sorted."""
    return [name for name, spec in registered_specs() if fits(shapes, spec)]


def pick_variant(shapes: TensorShapes | None) -> str:
    """The registered DeiT a checkpoint's tensors fit, for MODEL `auto`.

    Variants of one architecture registered at several resolutions or patch sizes (e.g.
    `deit_base_patch16_224` and `deit_base_patch16_384`, whose eval crops differ) are told
    apart by the checkpoint's own resolution and patch size; if that leaves more than one, or
    none, it is an error naming the candidates.

    Raises:
        CheckpointError: no registered DeiT fits, or more than one does; the message names them.
    """
    if shapes is None:
        raise CheckpointError(
            "auto: the checkpoint has no cls_token, pos_embed or blocks.N tensors, so no DeiT "
            "can be picked from it; give the timm model name"
        )
    names = fitting_variants(shapes)
    if not names:
        raise CheckpointError(
            f"auto: no registered DeiT fits the checkpoint ({shapes.describe()}); give the timm "
            "model name it was trained from (`deit-port list`)"
        )
    specs = dict(registered_specs())
    same_size = [
        n
        for n in names
        if specs[n].patch_size == shapes.patch_size
        and specs[n].img_size == shapes.img_size(_prefix(specs[n]))
    ]
    if len(names) == 1 or len(same_size) == 1:
        return (same_size or names)[0]
    candidates = same_size or names
    raise CheckpointError(
        f"auto: the checkpoint ({shapes.describe()}) fits {', '.join(candidates)}; "
        "give one of them as MODEL"
    )


def _prefix(spec: ArchSpec) -> int:
    return 0 if spec.no_embed_class else spec.num_prefix_tokens


_FLAGS = {"num_classes": "--num-classes", "img_size": "--img-size"}


def model_kwargs_from(
    shapes: TensorShapes | None,
    name: str,
    base: ArchSpec,
    kwargs: dict,
    args: dict | None = None,
) -> tuple[dict, tuple[str, ...]]:
    """The `timm.create_model` keywords for a checkpoint: `kwargs`, plus what its tensors fix.

    Args:
        shapes: `read_shapes` of the checkpoint (None: nothing is read; the key check names
            what is missing).
        name: MODEL, for messages.
        base: the architecture of MODEL built with `kwargs`.
        kwargs: what the user gave (`num_classes`, `img_size`, ...).
        args: the checkpoint's training arguments (`Checkpoint.args`): `nb_classes` /
            `num_classes` and `input_size` / `img_size` there that disagree with the tensors
            are logged as a warning naming both; the tensors win.

    Returns:
        The keywords (`num_classes`, `img_size`, `patch_size`, `in_chans` added where the
        tensors differ from MODEL's), and notes for the model card: what was read, and a
        resampled position embedding when `kwargs["img_size"]` is not the checkpoint's.

    Raises:
        CheckpointError: the tensors are of another architecture (the registered variants
            they fit are named); a keyword other than `img_size` contradicts them (both values
            named).
    """
    if shapes is None:
        return dict(kwargs), ()
    if not fits(shapes, base):
        raise CheckpointError(_wrong_variant(shapes, name, base))
    prefix = 0 if base.no_embed_class else base.num_prefix_tokens
    img_size = shapes.img_size(prefix)
    read = {"num_classes": shapes.num_classes, "img_size": img_size}
    read |= {"patch_size": shapes.patch_size, "in_chans": shapes.in_chans}
    known: dict[str, int] = {k: v for k, v in read.items() if v is not None}
    _check_args(args, shapes.num_classes, img_size)
    out = dict(kwargs)
    for key, value in known.items():
        given = _side(kwargs.get(key))
        if given is None:
            if value != getattr(base, key):
                out[key] = value
        elif key != "img_size" and given != value:
            raise CheckpointError(_contradiction(key, given, value, shapes))
    notes = [f"from the checkpoint: {_what_was_read(shapes, base, img_size)}"]
    logger.info(notes[0])
    size = _side(kwargs.get("img_size"))
    if size is not None and img_size is not None and size != img_size:
        grid = shapes.grid(prefix)
        notes.append(
            f"position embedding resampled from {img_size} px ({grid}x{grid} patches) to "
            f"{size} px by timm's checkpoint_filter_fn (bicubic, antialiased), as "
            f"timm.create_model(..., pretrained=True, img_size={size}) loads it"
        )
        logger.info(notes[-1])
    return out, tuple(notes)


def _what_was_read(shapes: TensorShapes, base: ArchSpec, img_size: int | None) -> str:
    """`37 classes, 160 px`: what the tensors fix, and where they differ from MODEL."""
    what = f"{shapes.num_classes} classes" if shapes.num_classes else "no head (headless)"
    if img_size is not None:
        what += f", {img_size} px"
    if shapes.patch_size not in (None, base.patch_size):
        what += f", patch {shapes.patch_size}"
    if shapes.in_chans not in (None, base.in_chans):
        what += f", {shapes.in_chans} input channels"
    return what


def _describe(arch) -> str:
    text = f"embed dim {arch.embed_dim}, depth {arch.depth}"
    if arch.mlp_hidden is not None and arch.mlp_hidden != 4 * arch.embed_dim:
        text += f", MLP width {arch.mlp_hidden}"
    if arch.distilled:
        text += ", distilled"
    if arch.layer_scale:
        text += ", layer scale"
    return text


def _wrong_variant(shapes: TensorShapes, name: str, base: ArchSpec) -> str:
    fit = fitting_variants(shapes)
    if fit:
        where = (
            f"which fit{'s' if len(fit) == 1 else ''} {', '.join(fit)}; give that as MODEL, or auto"
        )
    else:
        where = "which fits no registered DeiT (`deit-port list`); is it a DeiT checkpoint?"
    ours, theirs = _describe(base), shapes.describe()
    if base.distilled and not shapes.distilled:
        theirs += ", no distillation token"
    if base.layer_scale and not shapes.layer_scale:
        theirs += ", no layer scale"
    if ours == theirs:  # the same widths: the position embedding's layout differs
        prefix = 0 if base.no_embed_class else base.num_prefix_tokens
        ours += f", position embedding of a square grid plus {prefix} prefix rows"
        theirs += f", a position embedding of {shapes.pos_rows} rows"
    return f"the checkpoint does not fit {name} ({ours}): its tensors have {theirs}, {where}"


def _contradiction(key: str, given: int, value: int, shapes: TensorShapes) -> str:
    flag = _FLAGS.get(key)
    what = {
        "num_classes": f"its head has {value} classes" if value else "it has no head (headless)",
        "in_chans": f"its patch embedding takes {value} input channels",
        "patch_size": f"its patch embedding has {value} px patches",
    }[key]
    given_text = f"{flag} {given}" if flag else f"{key}={given}"
    drop = f"drop {flag}" if flag else f"drop {key}"
    return (
        f"{given_text} contradicts the checkpoint: {what}; {drop} (it is read from the checkpoint)"
    )


def _check_args(args: dict | None, num_classes: int, img_size: int | None) -> None:
    """Warn where the saved training arguments disagree with the tensors (the tensors win)."""
    if not args:
        return
    for key in ("nb_classes", "num_classes"):
        value = args.get(key)
        if _is_int(value) and value != num_classes:
            logger.warning(
                "the checkpoint's args say %s=%s, its tensors have %s classes; using the tensors",
                key,
                value,
                num_classes,
            )
    for key in ("input_size", "img_size"):
        value = _side(args.get(key))
        if img_size is not None and _is_int(value) and value != img_size:
            logger.warning(
                "the checkpoint's args say %s=%s, its tensors are for %s px; using the tensors",
                key,
                args.get(key),
                img_size,
            )


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _side(value):
    """An image size as one int: `160`, `(160, 160)` and timm's `input_size` `(3, 160, 160)`
    are 160; anything else is returned as it is."""
    if isinstance(value, (list, tuple)) and len(value) in (2, 3) and value[-1] == value[-2]:
        return value[-1]
    return value
