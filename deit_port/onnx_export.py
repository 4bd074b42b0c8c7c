"""ONNX export of a converted folder, checked through onnxruntime before it is written.

The folder is loaded in float32 and exported with `torch.onnx.export(..., dynamo=True)` with a
dynamic batch axis (input `pixel_values`, output `logits`, or `last_hidden_state` for a base
model). The file is written beside its final name (a hidden `.NAME.PID.*.partial` folder), run
with onnxruntime on batches of 1 and 5, compared with the transformers model and, when the timm
model is given, with timm; only then is it moved into place.

The int8 quantization is `onnx_quantize`'s; the folder transformers.js reads (`HF_DIR/onnx/`)
is `onnx_folder`'s. A next runtime gets a module of its own beside them, built on `run_onnx`'s
pattern: load the file, run it on the parity batch, compare with `compare_tensors`.

The ONNX stack is an optional extra: `pip install 'deit-port[onnx]'` (onnx, onnxscript,
onnx-ir, onnxruntime).

    >>> report = export_onnx("deit-tiny-hf", "deit-tiny.onnx", "deit_tiny_patch16_224",
    ...                      WeightSource(init="random", seed=0))
    >>> print(report.table())
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import hf_folder
from .arch import ArchSpec
from .errors import BadInputError, MissingExtraError, ParityError
from .headroom import check_export
from .output import check_output_file
from .parity import ParityReport, compare_tensors, parity_inputs, reference_outputs
from .publish import atomic_file
from .source import WeightSource, timm_source, weight_source
from .tolerances import DTYPE_ATOL, ONNX_ATOL

__all__ = [
    "BATCH_SIZES",
    "EXTRA",
    "ONNXRUNTIME",
    "TIMM",
    "TRANSFORMERS",
    "OnnxCheck",
    "OnnxReport",
    "export_onnx",
    "require_onnx",
    "run_onnx",
]

logger = logging.getLogger(__name__)

BATCH_SIZES = (1, 5)
# Past this many bytes of weights, torch.onnx's `save` writes them into NAME.onnx.data.
_EXTERNAL_DATA = 1536 * 1024 * 1024
EXTRA = "pip install 'deit-port[onnx]'"
_MODULES = ("onnx", "onnxscript", "onnx_ir", "onnxruntime")
# What runs the exported file, and what the folder itself is checked with before the export.
ONNXRUNTIME, TRANSFORMERS, TIMM = "onnxruntime", "transformers", "timm"


def require_onnx() -> None:
    """Raise `MissingExtraError` (exit 2) naming the extra unless the ONNX stack imports."""
    missing = []
    for name in _MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name.replace("_", "-"))
    if missing:
        raise MissingExtraError(f"ONNX export needs {', '.join(missing)}, not installed: {EXTRA}")


@dataclass(frozen=True)
class OnnxCheck:
    """One comparison on a batch of `batch` inputs: the outputs of `runtime` (`onnxruntime`;
    `transformers` for the folder itself, before the export) against those of `reference`
    (`transformers` or `timm`)."""

    runtime: str
    reference: str
    batch: int
    report: ParityReport

    @property
    def compared(self) -> str:
        """`onnxruntime vs timm`: the comparison in words."""
        return f"{self.runtime} vs {self.reference}"


@dataclass(frozen=True)
class OnnxReport:
    """What `export_onnx` checked: every (reference, batch size) comparison, and the export."""

    output: Path
    output_name: str
    checks: tuple[OnnxCheck, ...]
    export_seconds: float
    opset: int | None

    @property
    def passed(self) -> bool:
        return all(c.report.passed for c in self.checks)

    @property
    def first_failure(self) -> OnnxCheck | None:
        return next((c for c in self.checks if not c.report.passed), None)

    @property
    def runtime_checks(self) -> list[OnnxCheck]:
        """The checks of the exported file (onnxruntime's), not of the folder before it."""
        return [c for c in self.checks if c.runtime == ONNXRUNTIME]

    def summary(self) -> str:
        """One line: the verdict and the largest difference (or the first failing check)."""
        if (bad := self.first_failure) is not None:
            r = bad.report
            return (
                f"ONNX parity FAIL: {bad.compared}, batch {bad.batch}: {r.output} "
                f"max |diff| {r.max_abs_diff:.3g} (atol {r.atol:g})"
            )
        ort = self.runtime_checks
        refs = " and ".join(dict.fromkeys(c.reference for c in ort))
        batches = " and ".join(str(b) for b in dict.fromkeys(c.batch for c in ort))
        worst = max(c.report.max_abs_diff for c in ort)
        return (
            f"ONNX parity PASS: onnxruntime vs {refs} on batches of {batches}, "
            f"{self.output_name} max |diff| {worst:.3g} (atol {max(c.report.atol for c in ort):g}); "
            f"exported in {self.export_seconds:.1f} s, opset {self.opset}"
        )

    def table(self) -> str:
        """One line a comparison: what was compared, batch, max and mean |diff|, atol."""
        width = max(len("compared"), *(len(c.compared) for c in self.checks))
        header = f"{'compared':{width}s}  {'batch':>5s}  {'max |diff|':>10s}  {'mean |diff|':>11s}"
        lines = [f"{header}  {'atol':>6s}"]
        for c in self.checks:
            r = c.report
            lines.append(
                f"{c.compared:{width}s}  {c.batch:5d}  {r.max_abs_diff:10.3g}  "
                f"{r.mean_abs_diff:11.3g}  {r.atol:6g}"
            )
        return "\n".join(lines)


class _Output(nn.Module):
    """The transformers model as a function of one tensor to one tensor, for the exporter."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _load(folder: Path, spec: ArchSpec | None) -> tuple[nn.Module, ArchSpec]:
    """The folder's transformers model in float32; its spec from the folder when not given."""
    if spec is None:
        _, _, spec = hf_folder.read_hf_folder(folder)
    return hf_folder.load_hf_folder(folder, spec, **hf_folder.float32_kwargs()), spec


@torch.inference_mode()
def _torch_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).float()


def run_onnx(session, x: torch.Tensor) -> torch.Tensor:
    """An onnxruntime `session`'s one output on the batch `x` (input `pixel_values`)."""
    (y,) = session.run(None, {"pixel_values": x.numpy()})
    return torch.from_numpy(y)


def export_onnx(
    hf_dir: str | os.PathLike,
    output: str | os.PathLike,
    deit_name: str | None = None,
    weights: WeightSource | None = None,
    *,
    overwrite: bool = False,
    atol: float = ONNX_ATOL,
    external_data: bool | None = None,
    **loose: Any,
) -> OnnxReport:
    """Export a transformers ViT/DeiT folder to ONNX, checked with onnxruntime, atomically.

    Args:
        hf_dir, output: the transformers folder (ours or the hub's); the `.onnx` file to write.
        deit_name: the timm model the folder was converted from; with it the folder is first
            checked against timm (as `verify`), and the ONNX file is compared with timm too.
        weights: the timm model's weights (`WeightSource`); its `seed` seeds the batch too.
        overwrite: replace an existing `output`.
        atol: the bound for onnxruntime vs transformers, and vs timm for a float32 folder
            (a float16/bfloat16 folder differs from timm by up to its `DTYPE_ATOL`).
        external_data: the weights beside the graph (NAME.onnx.data) at any size, not only past 2 GB.
        **loose: keyword-only compatibility: `weights`' fields (`source.WEIGHT_KEYWORDS`).

    Returns:
        An `OnnxReport` (every check passed).

    Raises:
        MissingExtraError: the ONNX stack is not installed (`pip install 'deit-port[onnx]'`).
        ParityError, BadInputError (OutputError, CheckpointError, ...): nothing was written.

    Example:
        >>> export_onnx("deit-tiny-hf", "deit-tiny.onnx", "deit_tiny_patch16_224").passed
        True
    """
    require_onnx()
    out, folder = check_output_file(output, overwrite, suffix=".onnx"), Path(hf_dir)
    dtype = hf_folder.folder_dtype(hf_folder.read_folder_config(folder))
    weights = weight_source(weights, **loose)
    check_export(folder, with_timm=deit_name is not None)  # memory, before the weights
    timm_model = _timm_model(deit_name, weights)
    hf_model, spec = _load(folder, None if timm_model is None else ArchSpec.from_timm(timm_model))
    model = _Output(hf_model).eval()
    x = _inputs(timm_model, spec, weights.seed)
    output_name = "logits" if spec.num_classes else "last_hidden_state"
    timm_atol = atol if dtype == "float32" else max(atol, DTYPE_ATOL.get(dtype, atol))
    checks = _check_folder(timm_model, model, x, dtype, _report(out, output_name, [], 0.0, None))
    nbytes = sum(v.nbytes for v in hf_model.state_dict().values())  # the graph: in the margin
    files = 2 if external_data or nbytes > _EXTERNAL_DATA else 1
    with atomic_file(out, overwrite, size=nbytes, files=files) as tmp:
        logger.info("exporting %s to ONNX", folder)
        seconds, opset = _export(model, x, tmp, output_name, external_data)
        logger.info("exported in %.1f s (opset %s); checking with onnxruntime", seconds, opset)
        checks += _check_onnx(tmp, model, timm_model, x, atol, timm_atol)
        result = _report(out, output_name, checks, seconds, opset)
        logger.info(result.summary())
        if not result.passed:
            raise ParityError(result)
        _publish_data(tmp, out, overwrite)
    return result


def _check_folder(
    timm_model: nn.Module | None, model: nn.Module, x: torch.Tensor, dtype: str, empty: OnnxReport
) -> list[OnnxCheck]:
    """The folder itself against timm, as `verify` checks it, before any export: no export for
    a folder that differs (`ParityError`, with `empty`'s names). No check without timm."""
    if timm_model is None:
        return []
    folder_atol = DTYPE_ATOL.get(dtype, DTYPE_ATOL["float32"])
    report = compare_tensors(reference_outputs(timm_model, x), _torch_output(model, x), folder_atol)
    checks = [OnnxCheck(TRANSFORMERS, TIMM, len(x), report)]
    if not report.passed:
        raise ParityError(dataclasses.replace(empty, checks=tuple(checks)))
    return checks


def _publish_data(tmp: Path, out: Path, overwrite: bool) -> None:
    """The weights torch wrote beside the file (`NAME.onnx.data`, past 1.5 GB), if any,
    published first: the `.onnx` that reads them comes when its own block ends."""
    data = tmp.with_name(tmp.name + ".data")
    if data.exists():
        with atomic_file(out.with_name(data.name), overwrite) as data_tmp:
            os.rename(data, data_tmp)


def _timm_model(deit_name: str | None, weights: WeightSource) -> nn.Module | None:
    """The timm model to compare with, or None without `deit_name` (then nothing may choose
    its weights)."""
    if deit_name is not None:
        return timm_source(deit_name, weights).model
    if dataclasses.replace(weights, seed=0).chosen:
        raise BadInputError(
            "--checkpoint, --init, --ema, --num-classes and --img-size choose the timm model's "
            "weights: give MODEL (the timm name) too"
        )
    return None


def _inputs(timm_model: nn.Module | None, spec: ArchSpec, seed: int) -> torch.Tensor:
    """The largest batch: timm's parity inputs, or N(0, 1) (the scale of a normalised image)
    when there is no timm transform to preprocess an image with."""
    if timm_model is not None:
        return parity_inputs(timm_model, n=max(BATCH_SIZES), seed=seed)
    shape = (max(BATCH_SIZES), spec.in_chans, spec.img_size, spec.img_size)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _export(
    model: nn.Module, x: torch.Tensor, path: Path, output_name: str, external_data: bool | None
) -> tuple[float, int | None]:
    """Export `model` to `path` with a dynamic batch axis; `(seconds, opset)`. Weights over
    1.5 GB go beside it, into NAME.onnx.data."""
    import onnx

    start = time.perf_counter()
    program = torch.onnx.export(
        model,
        (x[:2],),  # batch 2: torch.export would specialise a batch of 1 to a constant
        dynamo=True,
        input_names=["pixel_values"],
        output_names=[output_name],
        dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch")}},
        verbose=False,
    )
    assert program is not None  # dynamo=True always returns the program
    program.save(path, **({"external_data": True} if external_data else {}))
    seconds = time.perf_counter() - start
    opsets = onnx.load(path, load_external_data=False).opset_import
    opset = next((o.version for o in opsets if o.domain in ("", "ai.onnx")), None)
    return seconds, opset


def _check_onnx(
    path: Path,
    model: nn.Module,
    timm_model: nn.Module | None,
    x: torch.Tensor,
    atol: float,
    timm_atol: float,
) -> list[OnnxCheck]:
    """onnxruntime on each of `BATCH_SIZES` against the transformers model (and timm)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    checks = []
    for batch in BATCH_SIZES:
        xb = x[:batch]
        actual = run_onnx(session, xb)
        report = compare_tensors(_torch_output(model, xb), actual, atol)
        checks.append(OnnxCheck(ONNXRUNTIME, TRANSFORMERS, batch, report))
        if timm_model is not None:
            report = compare_tensors(reference_outputs(timm_model, xb), actual, timm_atol)
            checks.append(OnnxCheck(ONNXRUNTIME, TIMM, batch, report))
    return checks


def _report(out, output_name, checks, seconds, opset) -> OnnxReport:
    return OnnxReport(out, output_name, tuple(checks), seconds, opset)
