"""`HF_DIR/onnx/`, the layout transformers.js and optimum read: `model.onnx` (`export_onnx`'s
file, same checks) and, by default, `model_quantized.onnx` (int8, `quantize_onnx`), published
as one folder; the model card gets an ONNX section with the figures (`card.onnx_section`).

    >>> export_onnx_folder("deit-tiny-hf").quantized.summary()  # deit-tiny-hf/onnx/
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import hf_folder
from .card import onnx_section, replace_section
from .errors import BadInputError
from .onnx_data import as_transformers_js_data, record_external_data
from .onnx_export import BATCH_SIZES, OnnxReport, export_onnx, require_onnx
from .onnx_quantize import QuantizedCheck, check_fraction, quantize_onnx
from .publish import atomic_folder
from .source import WeightSource, weight_source
from .tolerances import ONNX_ATOL

__all__ = [
    "CHECK_BATCH",
    "MODEL_FILE",
    "ONNX_FOLDER",
    "QUANTIZED_FILE",
    "Int8Check",
    "OnnxFolderReport",
    "check_batch",
    "export_onnx_folder",
]


ONNX_FOLDER = "onnx"
MODEL_FILE = "model.onnx"
QUANTIZED_FILE = "model_quantized.onnx"  # transformers.js's `dtype: 'q8'`, its WASM default
CHECK_BATCH = max(BATCH_SIZES)


@dataclass(frozen=True)
class OnnxFolderReport:
    """What `export_onnx_folder` wrote and checked: the float32 export, the int8 model."""

    folder: Path
    fp32: OnnxReport
    quantized: QuantizedCheck | None

    @property
    def passed(self) -> bool:
        return self.fp32.passed and (self.quantized is None or self.quantized.passed)

    def summary(self) -> str:
        lines = [self.fp32.summary()]
        if self.quantized is not None:
            lines.append(self.quantized.summary())
        return "\n".join(lines)

    def table(self) -> str:
        return self.fp32.table()


def check_batch(
    hf_dir: str | os.PathLike,
    shape: tuple[int, int, int],
    images: list | None = None,
    n: int = CHECK_BATCH,
    seed: int = 0,
) -> torch.Tensor:
    """The batch `export_onnx_folder` checks the int8 model on, made as `parity_inputs` makes
    the parity batch: the synthetic image and `images` through the folder's own image
    processor (its PIL backend computes timm's eval transform), then N(0, 1) tensors up to
    `n`. A folder without `preprocessor_config.json` gets the tensors only.

    Args:
        hf_dir: the transformers folder.
        shape: `(C, H, W)` of one input.
        images: PIL images to add (the user's `--image`s).
        n: the least batch size.
        seed: the synthetic image's and the tensors' seed.
    """
    from .parity import synthetic_image
    from .preprocess import load_image_processor

    folder = Path(hf_dir)
    batch: list[torch.Tensor] = []
    if (folder / "preprocessor_config.json").is_file():
        processor = load_image_processor(folder, "pil")
        pictures = [synthetic_image(seed), *(images or [])]
        pixels = processor(pictures, return_tensors="pt")["pixel_values"]
        if tuple(pixels.shape[1:]) != tuple(shape):
            raise BadInputError(
                f"{folder}/preprocessor_config.json makes {tuple(pixels.shape[1:])} pixel "
                f"values, the model takes {tuple(shape)}: fix the image processor's size"
            )
        batch += list(pixels)
    g = torch.Generator().manual_seed(seed)
    batch += [torch.randn(shape, generator=g) for _ in range(max(0, n - len(batch)))]
    return torch.stack(batch)


@dataclass(frozen=True)
class Int8Check:
    """What `export_onnx_folder` checks the int8 file on: `images` (PIL images) added to the
    check batch, and the least top-1 agreement with the float32 file accepted (`min_top1`;
    0: measured and reported only)."""

    images: tuple = ()
    min_top1: float = 0.0


def export_onnx_folder(
    hf_dir: str | os.PathLike,
    deit_name: str | None = None,
    weights: WeightSource | None = None,
    *,
    quantize: Int8Check | bool = True,
    overwrite: bool = False,
    atol: float = ONNX_ATOL,
    external_data: bool | None = None,
    **loose: Any,
) -> OnnxFolderReport:
    """Write `HF_DIR/onnx/`, the layout transformers.js and optimum read, checked, atomically.

    `onnx/model.onnx` is `export_onnx`'s file (same checks); with `quantize`, also
    `onnx/model_quantized.onnx` (`quantize_onnx`, checked against it on `check_batch`). The
    folder is built in a hidden `.onnx.PID.*.partial` folder inside HF_DIR and moved into place
    when everything passed; then the model card (`README.md`) gets an ONNX section with the
    figures (rewritten atomically, any earlier ONNX section replaced).

    Args:
        hf_dir: the transformers folder (ours or the hub's).
        deit_name, weights, atol, external_data: as `export_onnx`; external weights are named
            as transformers.js loads them (`model.onnx_data`) and recorded in `config.json`
            (`transformers.js_config.use_external_data_format`, `deit_port.onnx_data`).
        quantize: the int8 file too (WASM's default, `q8`), checked as `Int8Check()` or as given.
        overwrite: replace an existing, non-empty `HF_DIR/onnx`.
        **loose: keyword-only compatibility, as for `export_onnx`.

    Returns:
        An `OnnxFolderReport` (everything passed).

    Raises:
        As `export_onnx` and `quantize_onnx`; nothing is written then.

    Example:
        >>> export_onnx_folder("deit-tiny-hf").quantized.top1_agreement
        1.0
    """
    require_onnx()
    weights = weight_source(weights, **loose)
    int8 = Int8Check() if quantize is True else quantize or None
    if int8 is not None:
        check_fraction(int8.min_top1)
    folder = Path(hf_dir)
    hf_folder.read_folder_config(folder)  # a model folder, before atomic_folder makes one there
    with atomic_folder(folder / ONNX_FOLDER, overwrite) as tmp:
        fp32 = export_onnx(
            folder, tmp / MODEL_FILE, deit_name, weights, atol=atol, external_data=external_data
        )
        external = {MODEL_FILE: 1} if as_transformers_js_data(tmp / MODEL_FILE) else {}
        quantized = None if int8 is None else _quantize(folder, tmp, int8, weights.seed)
    out = folder / ONNX_FOLDER  # the reports name the files where they now lie
    done = OnnxFolderReport(
        out,
        dataclasses.replace(fp32, output=out / MODEL_FILE),
        None if quantized is None else dataclasses.replace(quantized, output=out / QUANTIZED_FILE),
    )
    record_external_data(folder, external)  # what transformers.js must fetch beside the graph
    replace_section(folder, ONNX_FOLDER, onnx_section(done.folder, done.fp32, done.quantized))
    return done


def _quantize(folder: Path, tmp: Path, int8: Int8Check, seed: int) -> QuantizedCheck:
    """`tmp/model_quantized.onnx` from `tmp/model.onnx`, checked on `check_batch`."""
    x = check_batch(folder, _input_shape(tmp / MODEL_FILE), list(int8.images), seed=seed)
    return quantize_onnx(tmp / MODEL_FILE, tmp / QUANTIZED_FILE, x, min_top1=int8.min_top1)


def _input_shape(model_file: Path) -> tuple[int, int, int]:
    """`(C, H, W)` of the ONNX file's input, as onnxruntime reads it."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    _, channels, height, width = session.get_inputs()[0].shape
    return channels, height, width
