"""The model card written with every folder: metadata, the parity report, where the weights
came from."""

import importlib.metadata
import re

import huggingface_hub
import pytest
import torch
import yaml
from transformers import AutoModelForImageClassification

from deit_port import cli
from deit_port.convert import convert_deit_checkpoint
from deit_port.parity import parity_inputs

from .util import (
    TINY,
    model_output,
    random_init_args,
    random_timm_model,
)

SEED = 5
RANDOM = random_init_args(SEED)


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


# --- the model card ------------------------------------------------------------------------


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_model_card_metadata(folder):
    card = huggingface_hub.ModelCard.load(folder / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "image-classification"
    assert {"timm", "deit"} <= set(card.data.tags)
    meta = _front_matter((folder / "README.md").read_text())
    assert "license" in meta and meta["license"] is None, "the license is the publisher's to set"


def test_model_card_parity_report(half_folder, timm_model):
    text = (half_folder / "README.md").read_text()
    rows = dict(re.findall(r"^\| ([a-z0-9 -]+) \| (.+) \|$", text, re.MULTILINE))
    hf = AutoModelForImageClassification.from_pretrained(half_folder, dtype=torch.float32)
    x = parity_inputs(timm_model)
    a, b = model_output(timm_model, x), model_output(hf, x)
    diff = (a - b).abs()
    assert float(rows["max abs diff"]) == pytest.approx(diff.max().item(), rel=1e-2)
    assert float(rows["mean abs diff"]) == pytest.approx(diff.mean().item(), rel=1e-2)
    top1 = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    assert rows["top-1 agreement"] == f"{top1:.0%}"
    assert re.fullmatch(
        r"max abs diff <= \S+ \(float16 weights, loaded as float32\)", rows["tolerance"]
    )
    assert rows["result"] == "PASS"
    assert "4 inputs" in text and "synthetic" in text and "N(0, 1)" in text
    for lib in ("torch", "timm", "transformers"):
        assert f"{lib} {importlib.metadata.version(lib)}" in text  # as pip installed it
    assert "weights dtype: float16" in text


def test_model_card_names_the_ema_weights(timm_model, tmp_path):
    ckpt = tmp_path / "checkpoint.pth"
    sd = timm_model.state_dict()
    torch.save({"model": sd, "model_ema": sd, "epoch": 1}, ckpt)
    out = tmp_path / "out"
    assert cli.main(["-q", "convert", TINY, str(out), "--checkpoint", str(ckpt), "--ema"]) == 0
    assert (
        "weights: entry 'model_ema' (EMA) of checkpoint.pth (torch zip)"
        in (out / "README.md").read_text()
    )


def test_model_card_without_verification_says_so(tmp_path):
    out = tmp_path / "out"
    assert cli.main(["-q", "convert", TINY, str(out), *RANDOM, "--no-verify"]) == 0
    text = (out / "README.md").read_text()
    assert "Not checked" in text and "| max abs diff |" not in text
