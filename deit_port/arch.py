"""The architecture description: what a timm DeiT is, read off the model's own structure.

`ArchSpec.from_timm(model)` never looks at a model's name. Whatever the converter cannot
express in transformers' ViT/DeiT classes is refused with an `UnsupportedModelError` (a
`ValueError` and a `TypeError`) naming the feature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import BadInputError, UnsupportedModelError

__all__ = ["ArchSpec"]


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
        from timm.layers import Mlp, PatchEmbed
        from timm.layers.attention import Attention
        from timm.models.vision_transformer import Block, VisionTransformer

        def refuse(feature: str) -> UnsupportedModelError:
            return UnsupportedModelError(
                f"{type(model).__name__}: {feature} is not supported by transformers' "
                "ViT/DeiT; deit_port converts class-token ViTs with pre-norm blocks only"
            )

        if not isinstance(model, VisionTransformer):
            raise UnsupportedModelError(
                f"{type(model).__name__} is not a timm VisionTransformer; "
                "deit_port converts DeiT, distilled DeiT and DeiT III models"
            )
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

        pe = model.patch_embed
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

        embed_dim = model.embed_dim
        blocks = list(model.blocks)
        if not blocks:
            raise refuse("a model without blocks")
        eps = {float(model.norm.eps)}
        layer_scale = isinstance(blocks[0].ls1, nn.Module) and hasattr(blocks[0].ls1, "gamma")
        mlp_hidden = blocks[0].mlp.fc1.out_features
        num_heads = blocks[0].attn.num_heads
        qkv_bias = blocks[0].attn.qkv.bias is not None
        for i, blk in enumerate(blocks):
            where = f"block {i}: "
            if type(blk) is not Block:
                raise refuse(where + f"block type {type(blk).__name__}")
            if not (_is_layernorm(blk.norm1) and _is_layernorm(blk.norm2)):
                raise refuse(where + "a non-LayerNorm norm")
            eps |= {float(blk.norm1.eps), float(blk.norm2.eps)}
            attn = blk.attn
            if type(attn) is not Attention or getattr(attn, "gate", None) is not None:
                raise refuse(where + f"attention type {type(attn).__name__}")
            if not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)):
                raise refuse(where + "qk-norm")
            if not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity):
                raise refuse(where + "attention scale norm")
            if attn.num_heads != num_heads or attn.num_heads * attn.head_dim != embed_dim:
                raise refuse(where + "attention head sizes other than embed_dim / num_heads")
            if (attn.qkv.bias is not None) != qkv_bias or attn.proj.bias is None:
                raise refuse(where + "mixed or missing attention biases")
            for ls in (blk.ls1, blk.ls2):
                if hasattr(ls, "gamma") != layer_scale or not (
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
            if mlp.fc1.out_features != mlp_hidden or mlp.fc1.bias is None or mlp.fc2.bias is None:
                raise refuse(where + "MLP widths differing between blocks or missing MLP biases")
        if len(eps) != 1:
            raise refuse(f"LayerNorms with different eps {sorted(eps)}")

        distilled = getattr(model, "dist_token", None) is not None
        num_classes = model.num_classes
        heads = [model.head] + ([model.head_dist] if distilled else [])
        for head in heads:
            if num_classes > 0 and not isinstance(head, nn.Linear):
                raise refuse(f"classifier head {type(head).__name__}")
            if num_classes == 0 and not isinstance(head, nn.Identity):
                raise refuse(f"classifier head {type(head).__name__} with num_classes=0")

        return cls(
            embed_dim=embed_dim,
            depth=len(blocks),
            num_heads=num_heads,
            mlp_hidden=mlp_hidden,
            patch_size=ph,
            img_size=ih,
            num_classes=num_classes,
            in_chans=pe.proj.in_channels,
            distilled=distilled,
            layer_scale=layer_scale,
            no_embed_class=bool(model.no_embed_class),
            qkv_bias=qkv_bias,
            eps=eps.pop(),
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
