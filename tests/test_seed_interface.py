"""`python -m deit_port.convert`, the interface of transformers' conversion script, with the new
options."""

import json

import pytest

from deit_port.cli import seed_main as convert_main

from .util import TINY, random_timm_model, save_checkpoint, state_dict_copy


@pytest.fixture(scope="module")
def tiny():
    return random_timm_model(TINY, seed=3)


def test_seed_interface_takes_the_new_options(tiny, tmp_path):
    ckpt = save_checkpoint(
        {"model": state_dict_copy(tiny), "model_ema": state_dict_copy(tiny)},
        tmp_path / "c.pth",
        "torch-zip",
    )
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
