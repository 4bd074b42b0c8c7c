"""The architecture description: what a timm DeiT is, read off the model's own structure.

`ArchSpec.from_timm(model)` never looks at a model's name. Whatever the converter cannot
express in transformers' ViT/DeiT classes is refused with an `UnsupportedModelError` (a
`ValueError` and a `TypeError`) naming the feature.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import BadInputError, UnsupportedModelError

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

__all__ = ["HEADS", "ArchSpec", "with_head"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArchSpec:
    """The shape of a timm DeiT/ViT, everything the key mapping and the HF config need.

    Example:
        >>> spec = ArchSpec.from_timm(timm.create_model("deit_tiny_patch16_224"))
        >>> spec.embed_dim, spec.depth, spec.distilled
        (192, 12, False)
    """

    embed_dim: int
    depth: int
    num_heads: int
    mlp_hidden: int
    patch_size: int
    img_size: int
    num_classes: int
    in_chans: int = 3
    distilled: bool = False
    layer_scale: bool = False
    no_embed_class: bool = False
    qkv_bias: bool = True
    eps: float = 1e-6
    # a distilled model converted with its class-token head only (`--head cls`): not a property
    # of the timm model but of the conversion, set with `dataclasses.replace`
    cls_head_only: bool = False

    def __post_init__(self) -> None:
        if self.cls_head_only and not (self.distilled and self.num_classes):
            raise ValueError(
                "cls_head_only is for distilled models with a classifier: others have one head"
            )
        if self.embed_dim % self.num_heads:
            raise BadInputError(
                f"embed_dim {self.embed_dim} is not a multiple of num_heads {self.num_heads}"
            )
        if self.img_size % self.patch_size:
            raise BadInputError(
                f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}"
            )

    @property
    def num_prefix_tokens(self) -> int:
        """Class token, plus the distillation token for distilled models."""
        return 2 if self.distilled else 1

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def timm_pos_len(self) -> int:
        """Rows of timm's `pos_embed`: DeiT III (`no_embed_class`) has none for the prefix tokens."""
        return self.num_patches + (0 if self.no_embed_class else self.num_prefix_tokens)

    @classmethod
    def from_timm(cls, model: nn.Module) -> ArchSpec:
        """Read the architecture of a timm `VisionTransformer` (or its distilled subclass).

        Args:
            model: a timm model, built with or without weights (meta tensors are fine).

        Returns:
            The `ArchSpec`.

        Raises:
            UnsupportedModelError: not a timm VisionTransformer, or a feature transformers'
                ViT/DeiT cannot express; the message names it.
        """
        from timm.models.vision_transformer import VisionTransformer

        if not isinstance(model, VisionTransformer):
            raise UnsupportedModelError(
                f"{type(model).__name__} is not a timm VisionTransformer; deit_port converts "
                "DeiT and the timm ViTs transformers' ViT can express (`deit-port list --all`)",
                feature=f"model class {type(model).__name__}",
            )
        refuse = functools.partial(_refuse, type(model).__name__)
        _check_tokens_and_pooling(model, refuse)
        patch_size, img_size = _patch_geometry(model.patch_embed, refuse)
        blocks = _read_blocks(model, refuse)
        distilled = getattr(model, "dist_token", None) is not None
        _check_heads(model, distilled, refuse)
        return cls(
            patch_size=patch_size,
            img_size=img_size,
            num_classes=model.num_classes,
            in_chans=model.patch_embed.proj.in_channels,
            distilled=distilled,
            no_embed_class=bool(model.no_embed_class),
            **blocks,
        )

    @classmethod
    def from_hf_config(cls, config, base_model: bool = False) -> ArchSpec:
        """The spec of a transformers `ViTConfig`/`DeiTConfig` (DeiT means distilled).

        A transformers model has no layer scale and embeds the class token's position, so
        the spec is the one of a timm model without those (what `hf_to_timm` produces).
        """
        image_size, patch_size = config.image_size, config.patch_size
        if not isinstance(image_size, int):
            image_size = _square(image_size, "image_size")
        if not isinstance(patch_size, int):
            patch_size = _square(patch_size, "patch_size")
        return cls(
            embed_dim=config.hidden_size,
            depth=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            mlp_hidden=config.intermediate_size,
            patch_size=patch_size,
            img_size=image_size,
            num_classes=0 if base_model else config.num_labels,
            in_chans=config.num_channels,
            distilled=config.model_type == "deit",
            qkv_bias=getattr(config, "qkv_bias", True),
            eps=config.layer_norm_eps,
        )


HEADS = ("teacher", "cls")


def with_head(spec: ArchSpec, head: str | None) -> ArchSpec:
    """`spec` for the head asked (`--head`): `cls` keeps a distilled model's class-token head
    only (`cls_head_only`); `teacher` (or None) both. A model without distillation head has only
    the class-token head: `cls` is that (nothing changes) and `teacher` is an error.

    Raises:
        BadInputError: an unknown head, `teacher` for a model without distillation head, or a
            head for a model without classifier.

    Example:
        >>> with_head(ArchSpec.from_timm(distilled_model), "cls").cls_head_only
        True
    """
    if head is None:
        return spec
    if head not in HEADS:
        raise BadInputError(f"head must be one of {', '.join(HEADS)}, not {head!r}")
    if spec.num_classes == 0:
        raise BadInputError(
            f"--head {head}: the model has no classifier (num_classes=0); drop --head"
        )
    if not spec.distilled:
        if head == "teacher":
            raise BadInputError(
                "--head teacher: the model is not distilled, it has no distillation head; its "
                "one head is the class-token head (drop --head)"
            )
        logger.info("--head cls: the model is not distilled; its one head is the class-token head")
        return spec
    return dataclasses.replace(spec, cls_head_only=head == "cls")


def _refuse(model_type: str, feature: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{model_type}: {feature} is not supported by transformers' ViT/DeiT; "
        "`deit-port list --all` lists the timm ViTs deit_port converts",
        feature=feature.split(": ", 1)[-1] if feature.startswith("block ") else feature,
    )


def _check_tokens_and_pooling(model: VisionTransformer, refuse: Callable[[str], Exception]) -> None:
    """What a transformers ViT/DeiT embeds and pools: one class token (and a distillation
    token), learned position embeddings, the final LayerNorm, class-token pooling."""
    if getattr(model, "cls_token", None) is None:
        raise refuse("a model without class token")
    if getattr(model, "reg_token", None) is not None:
        raise refuse("register tokens")
    if model.global_pool != "token":
        raise refuse(f"global_pool={model.global_pool!r} (only class-token pooling)")
    if getattr(model, "attn_pool", None) is not None:
        raise refuse("attention pooling")
    if not isinstance(getattr(model, "fc_norm", nn.Identity()), nn.Identity):
        raise refuse("fc_norm")
    if not isinstance(model.norm_pre, nn.Identity):
        raise refuse("norm_pre (pre_norm=True)")
    if not _is_layernorm(model.norm):
        raise refuse("a missing or non-LayerNorm final norm")
    if model.pos_embed is None:
        raise refuse("a model without learned position embedding")
    if getattr(model, "dynamic_img_size", False):
        raise refuse("dynamic_img_size")
    if getattr(model, "pool_include_prefix", False):
        raise refuse("pool_include_prefix")


def _patch_geometry(pe: nn.Module, refuse: Callable[[str], Exception]) -> tuple[int, int]:
    """`(patch_size, img_size)` of a plain, square, non-overlapping patch embedding."""
    from timm.layers import PatchEmbed

    if type(pe) is not PatchEmbed or not isinstance(pe.proj, nn.Conv2d):
        raise refuse(f"patch embedding {type(pe).__name__}")
    if not isinstance(pe.norm, nn.Identity):
        raise refuse("a normalised patch embedding")
    if pe.proj.bias is None:
        raise refuse("a patch embedding without bias")
    if getattr(pe, "dynamic_img_pad", False) or not getattr(pe, "flatten", True):
        raise refuse("dynamic patch padding")
    ph, pw = pe.patch_size
    ih, iw = pe.img_size
    if ph != pw or ih != iw:
        raise refuse(f"non-square patches or images ({ph}x{pw}, {ih}x{iw})")
    if tuple(pe.proj.stride) != (ph, pw):
        raise refuse("overlapping patches")
    return ph, ih


def _read_blocks(model: VisionTransformer, refuse: Callable[[str], Exception]) -> dict:
    """The `ArchSpec` fields the blocks fix (widths, depth, heads, biases, layer scale, eps),
    every block checked to be the same pre-norm block transformers' ViT layer computes."""
    from timm.models.vision_transformer import Block

    # timm types its submodules as `nn.Module`: what each holds is checked below, at run time
    blocks: list[Any] = list(model.blocks)
    norm: Any = model.norm
    if not blocks:
        raise refuse("a model without blocks")
    for i, blk in enumerate(blocks):  # the type first: a ParallelThingsBlock has no ls1 to read
        if type(blk) is not Block:
            kind = "parallel blocks" if hasattr(blk, "attns") else "block type"
            raise refuse(f"block {i}: {kind} {type(blk).__name__}")
    first = blocks[0]
    fields = {
        "embed_dim": model.embed_dim,
        "depth": len(blocks),
        "num_heads": first.attn.num_heads,
        "mlp_hidden": first.mlp.fc1.out_features,
        "layer_scale": isinstance(first.ls1, nn.Module) and hasattr(first.ls1, "gamma"),
        "qkv_bias": first.attn.qkv.bias is not None,
    }
    eps = {float(norm.eps)}
    for i, blk in enumerate(blocks):
        eps |= _check_block(blk, fields, f"block {i}: ", refuse)
    if len(eps) != 1:
        raise refuse(f"LayerNorms with different eps {sorted(eps)}")
    return fields | {"eps": eps.pop()}


def _check_block(
    blk: Any, fields: dict, where: str, refuse: Callable[[str], Exception]
) -> set[float]:
    """Refuse a block that is not the first block's kind (`fields`); its norms' eps."""
    from timm.layers import Mlp
    from timm.layers.attention import Attention

    norms: list[Any] = [blk.norm1, blk.norm2]
    if not all(_is_layernorm(n) for n in norms):
        raise refuse(where + "a non-LayerNorm norm")
    attn = blk.attn
    if type(attn) is not Attention or getattr(attn, "gate", None) is not None:
        raise refuse(where + f"attention type {type(attn).__name__}")
    if not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)):
        raise refuse(where + "qk-norm")
    if not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity):
        raise refuse(where + "attention scale norm")
    heads = fields["num_heads"]
    if attn.num_heads != heads or attn.num_heads * attn.head_dim != fields["embed_dim"]:
        raise refuse(where + "attention head sizes other than embed_dim / num_heads")
    if (attn.qkv.bias is not None) != fields["qkv_bias"] or attn.proj.bias is None:
        raise refuse(where + "mixed or missing attention biases")
    for ls in (blk.ls1, blk.ls2):
        if hasattr(ls, "gamma") != fields["layer_scale"] or not (
            isinstance(ls, nn.Identity) or hasattr(ls, "gamma")
        ):
            raise refuse(where + "mixed layer scale")
    mlp = blk.mlp
    if type(mlp) is not Mlp or not isinstance(mlp.fc1, nn.Linear):
        raise refuse(where + f"MLP type {type(mlp).__name__}")
    if not _is_exact_gelu(mlp.act):
        raise refuse(where + f"non-GELU MLP activation {mlp.act!r}")
    if not isinstance(mlp.norm, nn.Identity):
        raise refuse(where + "MLP scale norm")
    widths_differ = mlp.fc1.out_features != fields["mlp_hidden"]
    if widths_differ or mlp.fc1.bias is None or mlp.fc2.bias is None:
        raise refuse(where + "MLP widths differing between blocks or missing MLP biases")
    return {float(n.eps) for n in norms}


def _check_heads(
    model: VisionTransformer, distilled: bool, refuse: Callable[[str], Exception]
) -> None:
    """Linear classifier heads (two for a distilled model), or none with `num_classes=0`."""
    heads = [model.head] + ([model.head_dist] if distilled else [])
    for head in heads:
        if model.num_classes > 0 and not isinstance(head, nn.Linear):
            raise refuse(f"classifier head {type(head).__name__}")
        if model.num_classes == 0 and not isinstance(head, nn.Identity):
            raise refuse(f"classifier head {type(head).__name__} with num_classes=0")


def _is_exact_gelu(module: nn.Module) -> bool:
    """torch's GELU without tanh approximation, or timm's `GELU` (`act_layer="gelu"`): the
    erf GELU that transformers' `hidden_act="gelu"` computes."""
    from timm.layers.activations import GELU as TimmGELU

    if type(module) is nn.GELU:
        return module.approximate == "none"
    return type(module) is TimmGELU


def _is_layernorm(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.LayerNorm)
        and module.elementwise_affine
        and module.bias is not None
        and isinstance(module.weight, torch.Tensor)
    )


def _square(size, what: str) -> int:
    a, b = size
    if a != b:
        raise BadInputError(f"non-square {what} {tuple(size)} is not supported")
    return int(a)
