"""ONNX weights outside the graph, named as transformers.js loads them.

Past 2 GB (protobuf's limit), an ONNX file keeps its weights in a file beside it. torch's
exporter names it `NAME.onnx.data`; transformers.js (4.x, `getExternalDataChunkNames` in its
dist) looks for `NAME.onnx_data` (then `_data_1`, `_data_2`, ... chunks), and only for the
files that `config.json`'s `transformers.js_config.use_external_data_format` names
(`resolveExternalDataFormat`: `true` for every file, or `{"model.onnx": 1}`, a chunk count per
file). onnxruntime reads the data from the location each tensor records in the graph, so the
file is renamed and the graph's locations rewritten together (no weight is loaded to do it).

    >>> as_transformers_js_data(Path("onnx/model.onnx"))
    True
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .publish import atomic_file

__all__ = [
    "JS_CONFIG_KEY",
    "JS_DATA_SUFFIX",
    "TORCH_DATA_SUFFIX",
    "as_transformers_js_data",
    "data_file",
    "record_external_data",
]

TORCH_DATA_SUFFIX = ".data"  # torch.onnx: model.onnx -> model.onnx.data
JS_DATA_SUFFIX = "_data"  # transformers.js: model.onnx -> model.onnx_data
JS_CONFIG_KEY = "transformers.js_config"


def data_file(model_file: Path) -> Path | None:
    """The external weights beside `model_file` (either name), or None where it has none."""
    for suffix in (JS_DATA_SUFFIX, TORCH_DATA_SUFFIX):
        path = model_file.with_name(model_file.name + suffix)
        if path.exists():
            return path
    return None


def as_transformers_js_data(model_file: Path) -> bool:
    """Rename `NAME.onnx.data` to `NAME.onnx_data` and point the graph's tensors at it;
    True where `model_file` has external weights (renamed or already so named)."""
    import onnx

    old = model_file.with_name(model_file.name + TORCH_DATA_SUFFIX)
    new = model_file.with_name(model_file.name + JS_DATA_SUFFIX)
    if not old.exists():
        return new.exists()
    model = onnx.load(os.fspath(model_file), load_external_data=False)
    for tensor in model.graph.initializer:  # where torch's exporter puts the weights
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == old.name:
                entry.value = new.name
    onnx.save(model, os.fspath(model_file))
    os.rename(old, new)
    return True


def record_external_data(hf_dir: Path, files: dict[str, int]) -> None:
    """Write `files` ({"model.onnx": 1}: the chunks of each ONNX file with external weights)
    as `transformers.js_config.use_external_data_format` in `hf_dir/config.json`, atomically;
    without any, the key is removed."""
    path = hf_dir / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    js = dict(config.get(JS_CONFIG_KEY) or {})
    if files:
        js["use_external_data_format"] = dict(sorted(files.items()))
    else:
        js.pop("use_external_data_format", None)
    if js == (config.get(JS_CONFIG_KEY) or {}):
        return
    if js:
        config[JS_CONFIG_KEY] = js
    else:
        config.pop(JS_CONFIG_KEY, None)
    with atomic_file(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
