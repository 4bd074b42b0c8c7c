"""`deit-port verify`: a folder against timm, passing, failing, bad input, half precision."""

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForImageClassification

from deit_port import cli
from deit_port.convert import convert_deit_checkpoint, verify_hf_folder
from deit_port.parity import parity_inputs

from .util import (
    TINY,
    TINY_DISTILLED,
    cli_error_line,
    model_output,
    nothing_written,
    one_error_line,
    random_init_args,
    random_timm_model,
)

SEED = 5
RANDOM = random_init_args(SEED)
SUMMARY = re.compile(r"max \|diff\| ([^\s,]+), mean \|diff\| ([^\s,]+).*\(atol ([^\s)]+)\)")


@pytest.fixture(scope="module")
def timm_model():
    return random_timm_model(TINY, seed=SEED)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("verify") / "hf"
    convert_deit_checkpoint(TINY, out, init="random", seed=SEED)
    return out


@pytest.fixture(scope="module")
def half_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("verify16") / "hf16"
    convert_deit_checkpoint(TINY, out, init="random", seed=SEED, dtype="float16")
    return out


# --- verify --------------------------------------------------------------------------------


def test_verify_passes_on_the_same_weights(folder, capsys):
    assert cli.main(["verify", str(folder), TINY, *RANDOM, "-q"]) == 0
    out = capsys.readouterr().out
    assert "parity PASS" in out and "top-1 agreement 100%" in out


def test_verify_fails_on_other_weights(folder, capsys):
    with nothing_written(folder):
        assert cli.main(["verify", str(folder), TINY, "--init", "random", "--seed", "6", "-q"]) == 1
    captured = capsys.readouterr()
    assert "parity FAIL" in captured.out
    assert "does not compute what timm's" in one_error_line(captured.err)


def test_verify_against_a_checkpoint(folder, timm_model, tmp_path, capsys):
    ckpt = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in timm_model.state_dict().items()}, ckpt)
    assert cli.main(["verify", str(folder), TINY, "--checkpoint", str(ckpt), "-q"]) == 0
    assert "parity PASS" in capsys.readouterr().out


@pytest.mark.parametrize("what", ["missing", "no-config", "other-architecture"])
def test_verify_bad_input_exits_2(folder, tmp_path, capsys, what):
    args = [str(tmp_path / "nothing-here"), TINY, *RANDOM]
    if what == "no-config":
        (tmp_path / "empty").mkdir()
        args[0] = str(tmp_path / "empty")
    elif what == "other-architecture":
        args = [str(folder), TINY_DISTILLED, *RANDOM]
    line = cli_error_line(["verify", *args, "-q"], capsys, unchanged=Path(args[0]))
    if what == "other-architecture":
        assert "does not match the architecture" in line
    else:
        assert "no config.json" in line


def test_verify_a_half_precision_folder_with_its_tolerance(half_folder, timm_model, capsys):
    assert cli.main(["verify", str(half_folder), TINY, *RANDOM, "-q"]) == 0
    mx, _, atol = (float(v) for v in SUMMARY.search(capsys.readouterr().out).groups())
    hf = AutoModelForImageClassification.from_pretrained(half_folder, dtype=torch.float32)
    x = parity_inputs(timm_model)
    measured = (model_output(hf, x) - model_output(timm_model, x)).abs().max().item()
    assert measured > 1e-3, "float16 rounding should exceed the float32 tolerance here"
    assert mx == pytest.approx(measured, rel=1e-2) and measured <= atol
    # with the float32 tolerance the same folder fails: the dtype tolerance is what passed it
    assert not verify_hf_folder(half_folder, TINY, init="random", seed=SEED, atol=1e-3).passed
