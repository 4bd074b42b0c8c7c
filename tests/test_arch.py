"""ArchSpec is read off the timm model's structure, and refuses what transformers cannot express."""

import functools

import pytest
import timm
import torch

from deit_port.arch import ArchSpec
from deit_port.mapping import hf_shapes, timm_shapes
from deit_port.registry import build_on_meta

from .util import DEIT_VARIANTS, FAST_VARIANTS, TINY, TINY_DISTILLED

# (embed_dim, depth, heads, patch, img) from the DeiT and DeiT III papers, by size name.
PUBLISHED = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "medium": (512, 12, 8),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}


def _meta_model(name, **kwargs):
    """timm's own model (its init included) on the meta device; read only."""
    if not kwargs:
        return _registered_meta_model(name)
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **kwargs)


@functools.cache
def _registered_meta_model(name):
    """Each variant is built once (several tests read the same one)."""
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False)


def _parametrized_ids(test, argname: str) -> list[str]:
    """The ids of a test's `@pytest.mark.parametrize(argname, ...)` cases."""
    (mark,) = [m for m in test.pytestmark if m.name == "parametrize" and m.args[0] == argname]
    return [p.id for p in mark.args[1]]


def test_every_deit_timm_registers_has_a_parity_case():
    """The variants are whatever the installed timm registers (no count pinned to a release):
    each has a case in the parity suite, and the fast ones are among them."""
    from . import test_parity

    registered = sorted(timm.list_models("deit*"))
    assert registered, "timm registers no DeiT model"
    ids = _parametrized_ids(test_parity.test_variant_parity, "variant")
    assert sorted(set(registered) - set(ids)) == [], "DeiTs without a parity case"
    assert FAST_VARIANTS <= set(ids), sorted(FAST_VARIANTS - set(ids))


@pytest.mark.parametrize("variant", DEIT_VARIANTS)
def test_spec_matches_the_papers(variant):
    spec = ArchSpec.from_timm(_meta_model(variant))
    size = next(s for s in PUBLISHED if f"_{s}_" in variant)
    assert (spec.embed_dim, spec.depth, spec.num_heads) == PUBLISHED[size]
    assert spec.mlp_hidden == 4 * spec.embed_dim
    assert spec.patch_size == (14 if "patch14" in variant else 16)
    assert spec.img_size == (384 if variant.endswith("384") else 224)
    assert spec.num_classes == 1000
    assert spec.distilled == ("distilled" in variant)
    # DeiT III: layer scale, position embedding without class-token row
    assert spec.layer_scale == spec.no_embed_class == variant.startswith("deit3")
    assert spec.eps == 1e-6 and spec.qkv_bias


@pytest.mark.parametrize("variant", DEIT_VARIANTS)
def test_every_timm_key_and_shape_is_planned(variant):
    """The mapping's view of the timm state dict is exactly timm's own, key for key, shape for shape."""
    model = _meta_model(variant)
    spec = ArchSpec.from_timm(model)
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert timm_shapes(spec) == actual


def test_spec_follows_custom_settings():
    spec = ArchSpec.from_timm(_meta_model("deit_small_patch16_224", num_classes=37, img_size=160))
    assert (spec.num_classes, spec.img_size, spec.num_patches) == (37, 160, 100)
    spec = ArchSpec.from_timm(_meta_model(TINY_DISTILLED, num_classes=0))
    assert spec.num_classes == 0 and spec.distilled
    # the HF side always has a position row per prefix token
    assert hf_shapes(spec)["embeddings.position_embeddings"] == (1, 196 + 2, 192)


@pytest.mark.parametrize(
    "kwargs, feature",
    [
        ({"reg_tokens": 4}, "register tokens"),
        ({"class_token": False, "global_pool": "avg"}, "class token"),
        ({"global_pool": "avg"}, "global_pool"),
        ({"fc_norm": True}, "fc_norm"),
        ({"qk_norm": True}, "qk-norm"),
        ({"pre_norm": True}, "norm_pre"),
        ({"act_layer": "relu"}, "non-GELU"),
        ({"scale_mlp_norm": True}, "MLP scale norm"),
        ({"scale_attn_norm": True}, "attention scale norm"),
        ({"dynamic_img_size": True}, "dynamic_img_size"),
        ({"global_pool": "map"}, "global_pool"),
        ({"final_norm": False}, "final norm"),
    ],
)
def test_unsupported_structures_are_refused_by_name(kwargs, feature):
    model = _meta_model(TINY, **kwargs)
    with pytest.raises(ValueError, match=feature):
        ArchSpec.from_timm(model)


def test_non_vit_model_is_refused():
    with pytest.raises(TypeError, match="not a timm VisionTransformer"):
        ArchSpec.from_timm(_meta_model("resnet18"))


def test_spec_is_frozen():
    spec = ArchSpec.from_timm(_meta_model(TINY))
    with pytest.raises(AttributeError):
        spec.depth = 3


@pytest.mark.parametrize("act_layer", ["gelu", torch.nn.GELU])
def test_exact_gelu_by_any_name_is_accepted(act_layer):
    """timm's `act_layer="gelu"` is its own GELU class; it computes the same erf GELU."""
    spec = ArchSpec.from_timm(_meta_model(TINY, act_layer=act_layer))
    assert spec.embed_dim == 192


def _structure(model: torch.nn.Module) -> dict:
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("variant", DEIT_VARIANTS)
def test_build_on_meta_is_timms_model_without_the_init(variant):
    """Skipping timm's init (`weight_init="skip"`) changes no tensor, module or setting."""
    skipped, built = build_on_meta(variant), _meta_model(variant)
    assert type(skipped) is type(built)
    assert ArchSpec.from_timm(skipped) == ArchSpec.from_timm(built)
    assert _structure(skipped) == _structure(built)
    assert all(t.is_meta for t in skipped.state_dict().values())


def test_build_on_meta_builds_with_the_init_where_timm_cannot_skip_it(monkeypatch):
    """As timm 1.0.16 does for distilled models: an assertion on `weight_init="skip"`."""
    calls = []

    def create_model(name, **kwargs):
        calls.append(kwargs.get("weight_init"))
        assert kwargs.get("weight_init") != "skip", "mode in ('jax', 'jax_nlhb', 'moco', '')"
        return real(name, **kwargs)

    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", create_model)
    model = build_on_meta(TINY_DISTILLED, num_classes=7)
    assert calls == ["skip", None]
    assert model.num_classes == 7 and model.head_dist.weight.is_meta
