"""Conversion does no throwaway work: no random initialisation of weights about to be replaced,
no memory held for mapped pages it has finished with."""

from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

from deit_port.convert import convert_deit_checkpoint
from deit_port.memory import release_pages

from .util import TINY, TINY_DISTILLED, random_timm_model


def test_convert_from_a_checkpoint_draws_no_random_numbers(tmp_path):
    """Every random init (timm's trunc_normal_, torch's kaiming_uniform_, transformers'
    _init_weights) draws from torch's global generator on real tensors; meta tensors, which
    cost nothing, draw nothing. So an unchanged generator state means no model was
    random-initialised, on either side, during load, write and verification."""
    ckpt = tmp_path / "ckpt.safetensors"
    safetensors.torch.save_file(random_timm_model(TINY_DISTILLED, seed=2).state_dict(), ckpt)
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    report = convert_deit_checkpoint(TINY_DISTILLED, tmp_path / "out", checkpoint=ckpt)
    assert report.passed
    assert torch.equal(torch.random.get_rng_state(), before), "random numbers were drawn"


def test_the_rng_check_can_fail(tmp_path):
    """Control: the same check sees a random init when the timm model is built the usual way."""
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    timm.create_model(TINY, pretrained=False)  # timm's own random init
    assert not torch.equal(torch.random.get_rng_state(), before)


def _rss_file_kb() -> int:
    """This process's resident pages of mapped files (Linux's RssFile, in kB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    pytest.skip("no RssFile in /proc/self/status (not Linux)")


def test_released_pages_stop_counting_and_read_back_the_same(tmp_path):
    """`release_pages` (used on the mapped tensors DeiT III's fold has read): the pages it
    releases leave the process's memory, the tensor still reads the file's values, and the
    tensor beside it is untouched."""
    path = tmp_path / "w.safetensors"
    g = torch.Generator().manual_seed(0)
    values = {"a": torch.randn(4096, 1024, generator=g), "b": torch.randn(256, 1024, generator=g)}
    safetensors.torch.save_file(values, path)
    sd = safetensors.torch.load_file(path)  # mapped copy-on-write, a storage a tensor
    assert float(sd["a"].sum()) == float(values["a"].sum())  # reads all 16 MB of "a"
    touched = _rss_file_kb()
    release_pages([sd["a"]])
    released = touched - _rss_file_kb()
    assert released > 0.9 * sd["a"].nbytes / 1024, f"only {released} kB of 16384 released"
    assert torch.equal(sd["b"], values["b"])
    assert torch.equal(sd["a"], values["a"])  # read again from the file
