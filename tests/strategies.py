"""Hypothesis strategies: DeiT architectures, their timm state dicts, and tiny timm models.

Keys and shapes of a state dict come from `timm_shapes(spec)`; every value is generated here
(seeded by hypothesis), in float32, float16 or bfloat16, with some tensors non-contiguous
(a transposed transposed tensor, a strided slice of a bigger one) or at a storage offset, and
optionally with NaN, infinities, -0.0 and subnormals, which a bitwise comparison must keep.
"""

from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

from deit_port.arch import ArchSpec
from deit_port.mapping import timm_shapes

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# MLP ratios exactly representable in binary, so `int(embed_dim * ratio)` is exact both ways.
MLP_RATIOS = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0)
PATCH_SIZES = (2, 4, 8, 16)
LAYOUTS = ("contiguous", "transposed", "strided", "offset")


@st.composite
def arch_specs(
    draw,
    *,
    distilled: bool | None = None,
    layer_scale: bool | None = None,
    no_embed_class: bool | None = None,
    num_classes: int | None = None,
    buildable: bool = False,
) -> ArchSpec:
    """A tiny DeiT architecture: embed dim 8..96 (a multiple of 1..4 heads), depth 1..4.

    Args:
        distilled, layer_scale, no_embed_class, num_classes: fix that field instead of drawing it.
        buildable: only architectures timm can build and run (timm's distilled model always
            embeds the prefix tokens' positions, so no `distilled` with `no_embed_class`).
    """
    heads = draw(st.integers(1, 4))
    embed_dim = heads * draw(st.integers(math.ceil(8 / heads), 96 // heads))
    ratio = draw(st.sampled_from([r for r in MLP_RATIOS if (embed_dim * r).is_integer()]))
    patch = draw(st.sampled_from(PATCH_SIZES))
    grid = draw(st.integers(1, 4 if patch <= 4 else 2))
    if distilled is None:
        distilled = draw(st.booleans())
    if no_embed_class is None:
        no_embed_class = False if (buildable and distilled) else draw(st.booleans())
    if layer_scale is None:
        layer_scale = draw(st.booleans())
    if num_classes is None:
        num_classes = draw(st.one_of(st.just(0), st.integers(1, 12)))
    return ArchSpec(
        embed_dim=embed_dim,
        depth=draw(st.integers(1, 4)),
        num_heads=heads,
        mlp_hidden=int(embed_dim * ratio),
        patch_size=patch,
        img_size=patch * grid,
        num_classes=num_classes,
        in_chans=draw(st.sampled_from([3, 1, 4])),
        distilled=distilled,
        layer_scale=layer_scale,
        no_embed_class=no_embed_class,
        qkv_bias=draw(st.booleans()),
        eps=draw(st.sampled_from([1e-6, 1e-5])),
    )


def _special_values(dtype: torch.dtype) -> torch.Tensor:
    info = torch.finfo(dtype)
    values = [math.nan, math.inf, -math.inf, -0.0, info.tiny / 2, info.max, -info.max]
    return torch.tensor(values, dtype=dtype)


def make_tensor(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    layout: str,
    generator: torch.Generator,
    specials: bool = False,
) -> torch.Tensor:
    """A tensor of `shape` with N(0, 1) values (and special values), stored as `layout` says.

    `transposed`: a transposed copy transposed back (non-contiguous when the last two dims
    exceed 1); `strided`: every other element of a tensor twice as long in the last dim;
    `offset`: a view starting a few elements into a bigger storage.
    """
    values = torch.randn(shape, generator=generator).to(dtype)
    if specials and values.numel():
        sv = _special_values(dtype)
        where = torch.randint(values.numel(), (len(sv),), generator=generator)
        values.view(-1)[where] = sv
    if layout == "transposed" and len(shape) >= 2:
        return values.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "strided" and shape:
        big = torch.zeros((*shape[:-1], 2 * shape[-1]), dtype=dtype)
        big[..., ::2] = values
        return big[..., ::2]
    if layout == "offset":
        storage = torch.zeros(values.numel() + 5, dtype=dtype)
        storage[5:] = values.reshape(-1)
        return storage[5:].view(shape)
    return values


@st.composite
def tensors(draw, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> torch.Tensor:
    """One tensor of `shape`: dtype, layout, values and special values drawn."""
    if dtype is None:
        dtype = draw(st.sampled_from(DTYPES))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    return make_tensor(shape, dtype, draw(st.sampled_from(LAYOUTS)), generator, draw(st.booleans()))


@st.composite
def timm_state_dicts(draw, spec: ArchSpec, specials: bool | None = None) -> dict[str, torch.Tensor]:
    """A timm state dict of `spec`: the keys of `timm_shapes(spec)`, values generated here.

    One dtype for the whole dict; each tensor gets its own layout.
    """
    dtype = draw(st.sampled_from(DTYPES))
    if specials is None:
        specials = draw(st.booleans())
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    return {
        key: make_tensor(shape, dtype, draw(st.sampled_from(LAYOUTS)), generator, specials)
        for key, shape in timm_shapes(spec).items()
    }
