"""`python -m deit_port.convert`, the interface of transformers' conversion script, with the new
options."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from deit_port.cli import seed_main as convert_main

from .util import TINY, random_timm_model


@pytest.fixture(scope="module")
def tiny():
    return random_timm_model(TINY, seed=3)


def _sd(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _save(obj, path: Path, how: str) -> Path:
    if how == "safetensors":
        save_file(obj, path)
    elif how == "torch-zip":
        torch.save(obj, path)
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    return path


def test_seed_interface_takes_the_new_options(tiny, tmp_path):
    ckpt = _save({"model": _sd(tiny), "model_ema": _sd(tiny)}, tmp_path / "c.pth", "torch-zip")
    out = tmp_path / "out"
    code = convert_main(
        [
            "--deit_name",
            "vit_deit_tiny_patch16_224",
            "--pytorch_dump_folder_path",
            str(out),
            "--checkpoint",
            str(ckpt),
            "--no-ema",
            "--dtype",
            "bfloat16",
            "--max-shard-size",
            "2MB",
            "-q",
        ]
    )  # `python -m deit_port.convert` runs this main (tests/test_cli.py runs it as a module)
    assert code == 0
    assert (out / "model.safetensors.index.json").is_file()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert "entry 'model' of c.pth" in (out / "README.md").read_text()
