"""Folders written under one transformers major version load, with the same logits, under the other.

`.ci/run` runs this file three times with one `DEIT_PORT_XV_DIR`: the 5.x side writes, the 4.x
side (an overlay of the latest transformers 4.x on the same torch/timm) writes and loads what
5.x wrote, then the 5.x side loads what 4.x wrote. Without `DEIT_PORT_XV_DIR` it is skipped.
"""

import os
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModelForImageClassification,
    DeiTConfig,
    DeiTForImageClassificationWithTeacher,
    ViTConfig,
    ViTForImageClassification,
)

from deit_port.arch import ArchSpec
from deit_port.convert import convert_deit_checkpoint
from deit_port.mapping import hf_to_timm
from deit_port.parity import parity_inputs
from deit_port.source import randomize_

from .util import ATOL_MEASURED, build_timm_model, model_output, random_timm_model

XV_DIR = os.environ.get("DEIT_PORT_XV_DIR")
pytestmark = pytest.mark.skipif(not XV_DIR, reason="cross-version check: set DEIT_PORT_XV_DIR")

MAJOR = int(transformers.__version__.split(".")[0])
OTHER = 4 if MAJOR >= 5 else 5
VARIANTS = ["deit3_small_patch16_224", "deit_tiny_distilled_patch16_224", "deit_tiny_patch16_224"]
SAVED = {
    "vit": (ViTConfig, ViTForImageClassification),
    "deit": (DeiTConfig, DeiTForImageClassificationWithTeacher),
}
SEED = 99


def _side(major: int) -> Path:
    return Path(XV_DIR or ".") / f"transformers{major}"


def _other_folder(*parts: str) -> Path:
    folder = _side(OTHER).joinpath(*parts)
    assert folder.is_dir(), f"{folder} missing: the transformers {OTHER} side must write it first"
    return folder


def _assert_close(actual, expected, what):
    assert actual.shape == expected.shape, what
    torch.testing.assert_close(
        actual,
        expected,
        atol=ATOL_MEASURED,
        rtol=0,
        msg=lambda m: f"{what} (transformers {transformers.__version__}): {m}",
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_write_converted(variant):
    """The folder the other side loads: written, checked against timm by the writer itself,
    with the keys this transformers' own class expects."""
    folder = _side(MAJOR) / "converted" / variant
    report = convert_deit_checkpoint(variant, folder, init="random", seed=SEED, overwrite=True)
    assert report is not None and report.passed, report
    assert report.max_abs_diff <= ATOL_MEASURED, report.summary()
    _assert_loads_strictly(folder)


@pytest.mark.parametrize("kind", sorted(SAVED))
def test_write_save_pretrained(kind):
    config_class, model_class = SAVED[kind]
    config = config_class(
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=96,
        image_size=64,
        patch_size=16,
        num_labels=5,
        layer_norm_eps=1e-6,
    )
    model = randomize_(model_class(config), seed=SEED).eval()
    folder = _side(MAJOR) / "saved" / kind
    model.save_pretrained(folder)
    _assert_loads_strictly(folder)
    again = model_class.from_pretrained(folder).state_dict()
    for key, value in model.state_dict().items():  # the file holds the weights, bit for bit
        assert torch.equal(again[key], value), key


def _assert_loads_strictly(folder: Path) -> None:
    _, info = AutoModelForImageClassification.from_pretrained(folder, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info


@pytest.mark.parametrize("variant", VARIANTS)
def test_load_converted_from_other_version(variant):
    folder = _other_folder("converted", variant)
    hf_model, info = AutoModelForImageClassification.from_pretrained(
        folder, output_loading_info=True
    )
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    timm_model = random_timm_model(variant, seed=SEED)
    x = parity_inputs(timm_model, n=4, seed=SEED)
    _assert_close(model_output(hf_model.eval(), x), model_output(timm_model, x), variant)


@pytest.mark.parametrize("kind", sorted(SAVED))
def test_load_saved_from_other_version_via_timm(kind):
    """transformers <OTHER> save_pretrained -> hf_to_timm -> timm, against transformers <MAJOR>."""
    folder = _other_folder("saved", kind)
    spec = ArchSpec.from_hf_config(AutoConfig.from_pretrained(folder))
    timm_model = build_timm_model(spec)
    timm_model.load_state_dict(hf_to_timm(load_file(folder / "model.safetensors"), spec))
    hf_model, info = AutoModelForImageClassification.from_pretrained(
        folder, output_loading_info=True
    )
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    x = torch.randn(4, 3, spec.img_size, spec.img_size, generator=torch.Generator().manual_seed(0))
    _assert_close(model_output(hf_model.eval(), x), model_output(timm_model.eval(), x), kind)
