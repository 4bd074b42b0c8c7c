"""The parity suite: every variant (tests/util.py VARIANTS), converted, written, loaded back, compared.

The per-variant cases use the session's shared conversion of each variant (tests/variants.py):
a seeded random timm model, saved, converted from that checkpoint, timm's outputs on the
parity inputs computed before it was saved, and the loaded transformers model's one pass over
them. Cases that need another model build their own."""

import pytest
import torch
from safetensors.torch import load_file
from timm.data import create_transform
from transformers import AutoModelForImageClassification, DeiTModel, ViTModel

from deit_port.convert import convert_deit_checkpoint
from deit_port.parity import data_config, parity_inputs

from .util import (
    ATOL_CONTRACT,
    ATOL_MEASURED,
    DEVICE,
    FAST_VARIANTS,
    SEED,
    TINY,
    TINY_DISTILLED,
    assert_state_dicts_equal,
    model_output,
    random_timm_model,
    sample_images,
)
from .variants import variant_params


def _assert_parity(timm_model, hf_model, x, record_property, variant):
    timm_model.to(DEVICE)
    expected = model_output(timm_model, x.to(DEVICE)).float().cpu()
    actual = model_output(hf_model.to(DEVICE).eval(), x.to(DEVICE)).float().cpu()
    _assert_outputs(actual, expected, record_property, variant)


def _assert_outputs(actual, expected, record_property, variant):
    """transformers' outputs `actual` against timm's `expected` on the same batch."""
    assert actual.shape == expected.shape, (
        f"{variant}: shape {actual.shape} != timm {expected.shape}"
    )
    # Parity on outputs that hardly depend on the input would prove little: timm's outputs
    # for the batch's inputs must differ from each other by more than the contract tolerance.
    spread = (expected - expected[:1]).abs().amax()
    assert len(expected) >= 2 and spread > ATOL_CONTRACT, (
        f"{variant}: timm's outputs vary by only {spread:.3g} across the batch"
    )
    diff = (actual - expected).abs()
    record_property("variant", variant)
    record_property("max_abs_diff", float(diff.max()))
    record_property("mean_abs_diff", float(diff.mean()))
    # The contract (what the mission promises) ...
    assert torch.allclose(actual, expected, atol=ATOL_CONTRACT, rtol=0), (
        f"{variant}: max |diff| {diff.max():.3g} exceeds the contract atol {ATOL_CONTRACT}"
    )
    # ... and how much tighter we really are: a LayerNorm eps of 1e-12 instead of timm's 1e-6
    # already moves logits by ~6e-4, so this bound catches it.
    torch.testing.assert_close(
        actual,
        expected,
        atol=ATOL_MEASURED,
        rtol=0,
        msg=lambda m: f"{variant}: beyond the measured bound {ATOL_MEASURED}: {m}",
    )


@pytest.mark.parametrize("variant", variant_params())
def test_variant_parity(variant, converted_variant, record_property):
    converted = converted_variant(variant)
    info = converted.loading_info
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    assert converted.hf_model.config.layer_norm_eps == 1e-6
    # the transformers model's outputs on the parity inputs, from its one pass (tests/variants.py)
    _assert_outputs(converted.hf_outputs.inputs, converted.expected, record_property, variant)


@pytest.mark.parametrize("variant", variant_params([TINY]))
def test_shared_conversion_is_of_the_seeded_model(variant, converted_variant):
    """The shared artefact holds what it claims: its checkpoint is `random_timm_model(variant,
    SEED)` bit for bit, its inputs are `parity_inputs` of it, its expected outputs and image
    logits are that model's on those inputs and on timm's eval transform of the images (one
    batch, as the artefact computes them), and the timm model it loads computes them. (One
    variant: every variant is built by the same code, tests/variants.py `_build`.)"""
    converted = converted_variant(variant)
    fresh = random_timm_model(variant, seed=SEED)
    assert_state_dicts_equal(load_file(converted.checkpoint), fresh.state_dict(), "checkpoint")
    assert torch.equal(converted.inputs, parity_inputs(fresh, n=4, seed=SEED))
    transform = create_transform(**data_config(fresh))
    images = [sample_images()[n].convert("RGB") for n in converted.images]
    batch = torch.cat([converted.inputs, torch.stack([transform(i) for i in images])])
    reference = torch.cat([converted.expected, torch.stack(list(converted.image_logits.values()))])
    assert torch.equal(reference, model_output(fresh, batch))
    # the shared timm model runs on DEVICE: bitwise on the CPU the reference was computed on
    reloaded = model_output(converted.timm_model, batch.to(DEVICE)).float().cpu()
    atol = 0.0 if DEVICE.type == "cpu" else ATOL_MEASURED
    torch.testing.assert_close(reloaded, reference, atol=atol, rtol=0)


@pytest.mark.parametrize("variant", sorted(FAST_VARIANTS))
def test_custom_finetune_parity(variant, tmp_path, record_property):
    """A fine-tune with its own classes and resolution: timm num_classes=37, img_size=160."""
    kwargs = {"num_classes": 37, "img_size": 160}
    out = tmp_path / "hf"
    convert_deit_checkpoint(variant, out, init="random", seed=7, model_kwargs=kwargs, verify=False)

    hf_model, info = AutoModelForImageClassification.from_pretrained(out, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    assert hf_model.config.image_size == 160
    assert hf_model.config.num_labels == 37

    timm_model = random_timm_model(variant, seed=7, **kwargs)
    x = parity_inputs(timm_model, n=4, seed=7)
    assert x.shape[-2:] == (160, 160)
    _assert_parity(timm_model, hf_model, x, record_property, f"{variant} (37 classes, 160px)")


@pytest.mark.parametrize(
    "variant, hf_class",
    [
        (TINY, ViTModel),
        (TINY_DISTILLED, DeiTModel),
        ("deit3_small_patch16_224", ViTModel),
    ],
)
def test_headless_parity(variant, hf_class, tmp_path, record_property):
    """num_classes=0 converts to the base model; every token's final hidden state matches."""
    out = tmp_path / "hf"
    kwargs = {"num_classes": 0}  # verify=False: the case checks what was written itself
    convert_deit_checkpoint(variant, out, init="random", seed=3, model_kwargs=kwargs, verify=False)
    hf_model, info = hf_class.from_pretrained(
        out, add_pooling_layer=False, output_loading_info=True
    )
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info

    timm_model = random_timm_model(variant, seed=3, num_classes=0)
    x = parity_inputs(timm_model, n=4, seed=3)
    _assert_parity(timm_model, hf_model, x, record_property, f"{variant} (headless)")
