"""int8 quantization of an ONNX file as transformers.js makes its `q8` files, checked against
the float32 file before it is written.

    >>> quantize_onnx("onnx/model.onnx", "onnx/model_quantized.onnx", x).top1_agreement
    1.0
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import BadInputError, ParityError
from .onnx_data import data_file
from .onnx_export import require_onnx, run_onnx
from .output import check_output_file
from .parity import compare_tensors
from .publish import atomic_file

__all__ = ["QuantizedCheck", "check_fraction", "onnx_bytes", "q8_weight_type", "quantize_onnx"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantizedCheck:
    """The int8 model against the float32 one, on the same batch (`quantize_onnx`).

    Dynamic int8 quantization is lossy by design, so this is a measurement, not a parity
    contract: `passed` asks only for finite outputs of the float32 model's shape and, when
    `min_top1` is set, that much top-1 agreement (None for hidden states)."""

    output: Path
    reference: str
    weight_type: str
    inputs: int
    top1_agreement: float | None
    max_abs_diff: float
    mean_abs_diff: float
    size_bytes: int
    fp32_size_bytes: int
    min_top1: float = 0.0

    @property
    def passed(self) -> bool:
        top1_ok = self.top1_agreement is None or self.top1_agreement >= self.min_top1
        return math.isfinite(self.max_abs_diff) and top1_ok

    def summary(self) -> str:
        top1 = "" if self.top1_agreement is None else f"top-1 agreement {self.top1_agreement:.1%}, "
        gate = f" (at least {self.min_top1:.1%} asked)" if self.min_top1 else ""
        return (
            f"int8 check {'PASS' if self.passed else 'FAIL'}: {self.output.name} "
            f"({self.weight_type} weights, {self.size_bytes / 1e6:.1f} MB, float32 "
            f"{self.fp32_size_bytes / 1e6:.1f} MB) vs {self.reference} on {self.inputs} inputs: "
            f"{top1}max |diff| {self.max_abs_diff:.3g}, mean |diff| {self.mean_abs_diff:.3g}{gate}"
        )


def q8_weight_type(model_file: str | os.PathLike) -> str:
    """The weight type of transformers.js's own `q8` files: `QUInt8` when the graph has a
    `Conv` (a ViT's patch embedding: onnxruntime-web has no `ConvInteger` for int8 weights),
    else `QInt8` (faster on most CPUs). Activations are always uint8 (dynamic quantization)."""
    import onnx

    graph = onnx.load(os.fspath(model_file), load_external_data=False).graph
    return "QUInt8" if any(node.op_type == "Conv" for node in graph.node) else "QInt8"


class _DropRootMessage(logging.Filter):
    """onnxruntime's quantizer advises its pre-processing on the root logger, every call."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Please consider to run pre-processing")


def quantize_onnx(
    model_file: str | os.PathLike,
    output: str | os.PathLike,
    inputs: torch.Tensor,
    *,
    min_top1: float = 0.0,
    overwrite: bool = False,
) -> QuantizedCheck:
    """Quantize an ONNX file to int8 as transformers.js's `q8` files are made, check it, and
    write it atomically.

    `onnxruntime.quantization.quantize_dynamic` (weights per tensor, `q8_weight_type`,
    activations uint8 at run time, `MatMulConstBOnly`), then both files are run by onnxruntime
    on `inputs` and compared: top-1 agreement, max and mean |logit diff|.

    Args:
        model_file: the float32 `.onnx` file (input `pixel_values`).
        output: the `.onnx` file to write.
        inputs: the check batch `(N, C, H, W)`.
        min_top1: the least top-1 agreement accepted (0: measured and reported only).
        overwrite: replace an existing `output`.

    Returns:
        A `QuantizedCheck` that passed.

    Raises:
        ParityError: non-finite outputs, or top-1 agreement below `min_top1`; nothing written.
        OutputError: as `deit_port.publish.atomic_file`.

    Example:
        >>> quantize_onnx("onnx/model.onnx", "onnx/model_quantized.onnx", x).top1_agreement
        1.0
    """
    require_onnx()
    check_fraction(min_top1)
    out = check_output_file(output, overwrite, suffix=".onnx")
    model_file = Path(model_file)
    weight_type = q8_weight_type(model_file)
    expected = _run_file(model_file, inputs)
    with atomic_file(out, overwrite) as tmp:
        _quantize(model_file, tmp, weight_type)
        actual = _run_file(tmp, inputs)
        report = compare_tensors(expected, actual, atol=math.inf)
        finite = bool(torch.isfinite(actual).all()) and report.shape_hf == report.shape_timm
        check = QuantizedCheck(
            output=out,
            reference=model_file.name,
            weight_type=weight_type,
            inputs=len(inputs),
            top1_agreement=report.top1_agreement,
            max_abs_diff=report.max_abs_diff if finite else math.inf,
            mean_abs_diff=report.mean_abs_diff if finite else math.inf,
            size_bytes=tmp.stat().st_size,
            fp32_size_bytes=onnx_bytes(model_file),
            min_top1=min_top1,
        )
        logger.info(check.summary())
        if not check.passed:
            raise ParityError(check)
    return check


def _run_file(model_file: Path, inputs: torch.Tensor) -> torch.Tensor:
    """An ONNX file's output on `inputs`, run by onnxruntime on the CPU (the session freed)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(
        os.fspath(model_file), providers=["CPUExecutionProvider"]
    )
    return run_onnx(session, inputs)


def _quantize(model_file: Path, output: Path, weight_type: str) -> None:
    """onnxruntime's `quantize_dynamic`, as transformers.js makes its `q8` files."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    drop = _DropRootMessage()
    logging.getLogger().addFilter(drop)
    try:
        quantize_dynamic(
            _without_shape_annotations(model_file),
            os.fspath(output),
            weight_type=QuantType[weight_type],
            extra_options={"MatMulConstBOnly": True},
        )
    finally:
        logging.getLogger().removeFilter(drop)


def _without_shape_annotations(model_file: Path):
    """The model for the quantizer: without the exporter's `value_info` shape annotations where
    its weights are inside the file (a model with external weights is passed as its path).

    The quantizer infers every shape again; onnxruntime 1.23 (the newest for Python 3.10)
    refuses a model whose annotations its own inference contradicts ("Inferred shape and
    existing shape differ"), which torch's exporter writes for DeiT's classifier."""
    import onnx

    if data_file(model_file) is not None:
        return os.fspath(model_file)
    model = onnx.load(os.fspath(model_file))
    del model.graph.value_info[:]
    return model


def check_fraction(min_top1: float) -> None:
    """Refuse a least top-1 agreement outside [0, 1] (`BadInputError`)."""
    if not 0 <= min_top1 <= 1:
        raise BadInputError(f"the least top-1 agreement must be in [0, 1], not {min_top1:g}")


def onnx_bytes(model_file: Path) -> int:
    """The size of an `.onnx` file with its external weights (`deit_port.onnx_data`), if any."""
    data = data_file(model_file)
    return model_file.stat().st_size + (data.stat().st_size if data is not None else 0)
