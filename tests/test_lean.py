"""Conversion does no throwaway work: no random initialisation of weights about to be replaced."""

import safetensors.torch
import timm
import torch

from deit_port.convert import convert_deit_checkpoint

from .util import random_timm_model


def test_convert_from_a_checkpoint_draws_no_random_numbers(tmp_path):
    """Every random init (timm's trunc_normal_, torch's kaiming_uniform_, transformers'
    _init_weights) draws from torch's global generator on real tensors; meta tensors, which
    cost nothing, draw nothing. So an unchanged generator state means no model was
    random-initialised, on either side, during load, write and verification."""
    ckpt = tmp_path / "ckpt.safetensors"
    safetensors.torch.save_file(
        random_timm_model("deit_tiny_distilled_patch16_224", seed=2).state_dict(), ckpt
    )
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    report = convert_deit_checkpoint(
        "deit_tiny_distilled_patch16_224", tmp_path / "out", checkpoint=ckpt
    )
    assert report.passed
    assert torch.equal(torch.random.get_rng_state(), before), "random numbers were drawn"


def test_the_rng_check_can_fail(tmp_path):
    """Control: the same check sees a random init when the timm model is built the usual way."""
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    timm.create_model("deit_tiny_patch16_224", pretrained=False)  # timm's own random init
    assert not torch.equal(torch.random.get_rng_state(), before)
