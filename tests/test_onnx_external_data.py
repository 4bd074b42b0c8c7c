"""ONNX weights past 2 GB, as transformers.js loads them (issue 27): `export-onnx HF_DIR` names
the external weights `onnx/model.onnx_data` (transformers.js 4.x's `getExternalDataChunkNames`),
points the graph at that file and records `transformers.js_config.use_external_data_format`
in config.json (`resolveExternalDataFormat`). A 2 GB model is not needed to test it:
`--external-data` forces the same path on DeiT tiny at depth 2, which node then runs.

The node case (under --runslow, as test_browser.py's other non-tiny folders) skips locally
without node or the npm packages, and fails under CI=true (tests/web.py `need`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deit_port import cli
from deit_port.convert import convert_deit_checkpoint
from deit_port.parity import parity_inputs

from .util import ATOL_MEASURED, TINY, model_output, random_timm_model
from .web import classify, need, write_f32

SEED, DEPTH = 1234, 2


@pytest.fixture(scope="module")
def forced(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A DeiT (tiny, depth 2, seeded random) folder given `onnx/` by the user's command with
    `--external-data`; and the timm model."""
    pytest.importorskip("onnxruntime")
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("external")
    model = random_timm_model(TINY, seed=SEED, depth=DEPTH)
    save_file(model.state_dict(), root / "timm.safetensors")
    out = root / "hf"
    convert_deit_checkpoint(
        TINY, out, checkpoint=root / "timm.safetensors", model_kwargs={"depth": DEPTH}
    )
    assert cli.main(["-q", "export-onnx", str(out), "--external-data", "--no-quantize"]) == 0
    return out, model


def test_external_weights_are_named_as_transformers_js_loads_them(forced):
    import onnx

    folder, _ = forced
    onnx_dir = folder / "onnx"
    assert sorted(p.name for p in onnx_dir.iterdir()) == ["model.onnx", "model.onnx_data"]
    graph = onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False).graph
    locations = {
        entry.value
        for tensor in graph.initializer
        for entry in tensor.external_data
        if entry.key == "location"
    }
    assert locations == {"model.onnx_data"}, locations
    # the weights are in the data file, not the graph
    assert (onnx_dir / "model.onnx").stat().st_size < (onnx_dir / "model.onnx_data").stat().st_size
    config = json.loads((folder / "config.json").read_text())
    assert config["transformers.js_config"]["use_external_data_format"] == {"model.onnx": 1}


@pytest.mark.slow
def test_external_weights_run_in_transformers_js(forced, tmp_path, record_property):
    """transformers.js in node, fp32, timm's pixel values: logits within 1e-4 of timm's."""
    need("node", "packages")
    folder, model = forced
    x = parity_inputs(model, n=4, seed=SEED)
    out = classify(folder, pixels=write_f32(tmp_path / "x.f32", x), shape=tuple(x.shape))
    expected = model_output(model, x)
    actual = torch.tensor(out["pixels"]["logits"], dtype=torch.float32).reshape(expected.shape)
    diff = (actual - expected).abs()
    record_property(
        "measured",
        [("transformers.js external data (node)", TINY, f"max {float(diff.max()):.3g}")],
    )
    torch.testing.assert_close(
        actual,
        expected,
        atol=ATOL_MEASURED,
        rtol=0,
        msg=lambda m: f"transformers.js from model.onnx_data: beyond {ATOL_MEASURED}: {m}",
    )
