"""Generative parity: for architectures hypothesis draws, timm and the converted model agree.

Not only the 16 named DeiTs: any embed dim, depth, head count, MLP ratio, patch and image size,
channel count, classifier size (0 = headless), with or without distillation token, layer scale,
`no_embed_class`, qkv bias, and LayerNorm eps. timm's own classes are built directly with those
settings, every parameter is drawn at a realistic scale (`randomize_`), the model is converted,
and logits (final hidden states of every token when headless) must agree to the suite's
measured bound. Structures transformers cannot express are drawn on purpose and must be
refused with the documented `ValueError` that names the feature.
"""

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from deit_port.arch import ArchSpec
from deit_port.convert import convert_timm_model

from .strategies import arch_specs
from .util import ATOL_MEASURED, build_timm_model, model_output, random_timm_model


def _expected_class(spec: ArchSpec) -> type:
    """Written out from the README's table, not taken from `hf_model_class`."""
    if spec.num_classes == 0:
        return transformers.DeiTModel if spec.distilled else transformers.ViTModel
    if spec.distilled:
        return transformers.DeiTForImageClassificationWithTeacher
    return transformers.ViTForImageClassification


@given(arch_specs(buildable=True), st.integers(0, 2**32 - 1))
def test_drawn_architectures_convert_with_parity(spec, seed):
    timm_model = random_timm_model(spec, seed)
    assert ArchSpec.from_timm(timm_model) == spec
    hf_model = convert_timm_model(timm_model)
    assert type(hf_model) is _expected_class(spec)
    assert hf_model.config.layer_norm_eps == spec.eps

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, spec.in_chans, spec.img_size, spec.img_size, generator=g)
    expected = model_output(timm_model, x)
    actual = model_output(hf_model, x)
    tokens = spec.num_patches + spec.num_prefix_tokens
    assert expected.shape == (
        (3, spec.num_classes) if spec.num_classes else (3, tokens, spec.embed_dim)
    )
    torch.testing.assert_close(
        actual,
        expected,
        atol=ATOL_MEASURED,
        rtol=0,
        msg=lambda m: f"{spec}: beyond the measured bound {ATOL_MEASURED}: {m}",
    )


# (kwargs strategy, the words the error must contain, whether timm's distilled class takes it)
UNSUPPORTED = {
    "reg_tokens": (
        st.builds(lambda n: {"reg_tokens": n}, st.integers(1, 4)),
        "register tokens",
        False,
    ),
    "global_pool": (
        st.builds(
            lambda p: {"global_pool": p}, st.sampled_from(["avg", "max", "avgmax", "map", ""])
        ),
        "global_pool",
        False,
    ),
    "no_class_token": (st.just({"class_token": False, "global_pool": "avg"}), "class token", False),
    "fc_norm": (st.just({"fc_norm": True}), "fc_norm", True),
    "qk_norm": (st.just({"qk_norm": True}), "qk-norm", True),
    "pre_norm": (st.just({"pre_norm": True}), "norm_pre", True),
    "final_norm": (st.just({"final_norm": False}), "final norm", True),
    "act_layer": (
        st.builds(
            lambda a: {"act_layer": a}, st.sampled_from(["relu", "silu", "gelu_tanh", "quick_gelu"])
        ),
        "non-GELU",
        True,
    ),
    "scale_mlp_norm": (st.just({"scale_mlp_norm": True}), "MLP scale norm", True),
    "scale_attn_norm": (st.just({"scale_attn_norm": True}), "attention scale norm", True),
    "proj_bias": (st.just({"proj_bias": False}), "missing attention biases", True),
    "dynamic_img_size": (st.just({"dynamic_img_size": True}), "dynamic_img_size", True),
    "pos_embed": (st.just({"pos_embed": "none"}), "position embedding", False),
    "pool_include_prefix": (st.just({"pool_include_prefix": True}), "pool_include_prefix", True),
}


@pytest.mark.parametrize("feature", sorted(UNSUPPORTED))
@settings(max_examples=max(5, settings.default.max_examples // 4))  # x 14 features
@given(data=st.data())
def test_drawn_unsupported_structures_are_refused_by_name(feature, data):
    """Each feature on drawn architectures (a quarter of the profile's examples each)."""
    kwargs_strategy, words, distilled_ok = UNSUPPORTED[feature]
    spec = data.draw(arch_specs(buildable=True, distilled=None if distilled_ok else False), "spec")
    kwargs = data.draw(kwargs_strategy, "kwargs")
    with torch.device("meta"):
        model = build_timm_model(spec, **kwargs)
    with pytest.raises(ValueError, match=words):
        convert_timm_model(model)
