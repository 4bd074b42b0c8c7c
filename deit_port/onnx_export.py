"""ONNX export of a converted folder, checked through onnxruntime before it is written.

The folder is loaded in float32 and exported with `torch.onnx.export(..., dynamo=True)` with a
dynamic batch axis (input `pixel_values`, output `logits`, or `last_hidden_state` for a base
model). The file is written beside its final name (a hidden `.NAME.PID.*.partial` folder), run
with onnxruntime on batches of 1 and 5, compared with the transformers model and, when the timm
model is given, with timm; only then is it moved into place.

`export_onnx_folder` writes the layout transformers.js and optimum read instead, `HF_DIR/onnx/`:
`model.onnx` (`export_onnx`'s file, same checks) and, by default, `model_quantized.onnx`
(int8, `quantize_onnx`: onnxruntime's dynamic quantization as transformers.js makes its `q8`
files, compared with the float32 file before it is written), published as one folder; the
model card gets the figures.

The ONNX stack is an optional extra: `pip install 'deit-port[onnx]'` (onnx, onnxscript,
onnx-ir, onnxruntime).

    >>> report = export_onnx("deit-tiny-hf", "deit-tiny.onnx", "deit_tiny_patch16_224",
    ...                      init="random", seed=0)
    >>> print(report.table())
    >>> export_onnx_folder("deit-tiny-hf").quantized.summary()  # deit-tiny-hf/onnx/
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import hf_folder
from .arch import ArchSpec
from .errors import BadInputError, MissingExtraError, ParityError
from .output import check_output_file
from .parity import ParityReport, compare_tensors, parity_inputs, reference_outputs
from .publish import atomic_file, atomic_folder
from .source import timm_source
from .tolerances import DTYPE_ATOL, ONNX_ATOL

__all__ = [
    "BATCH_SIZES",
    "MODEL_FILE",
    "ONNX_FOLDER",
    "QUANTIZED_FILE",
    "OnnxCheck",
    "OnnxFolderReport",
    "OnnxReport",
    "QuantizedCheck",
    "check_batch",
    "export_onnx",
    "export_onnx_folder",
    "q8_weight_type",
    "quantize_onnx",
    "require_onnx",
]

logger = logging.getLogger(__name__)

BATCH_SIZES = (1, 5)
# Past this many bytes of weights, torch.onnx's `save` writes them into NAME.onnx.data.
_EXTERNAL_DATA = 1536 * 1024 * 1024
EXTRA = "pip install 'deit-port[onnx]'"
_MODULES = ("onnx", "onnxscript", "onnx_ir", "onnxruntime")


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
    """One comparison: `onnxruntime vs transformers`, `onnxruntime vs timm`, or (before the
    export) `transformers vs timm`, on a batch of `batch` inputs."""

    compared: str
    batch: int
    report: ParityReport


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

    def summary(self) -> str:
        """One line: the verdict and the largest difference (or the first failing check)."""
        if (bad := self.first_failure) is not None:
            r = bad.report
            return (
                f"ONNX parity FAIL: {bad.compared}, batch {bad.batch}: {r.output} "
                f"max |diff| {r.max_abs_diff:.3g} (atol {r.atol:g})"
            )
        ort = [c for c in self.checks if c.compared.startswith("onnxruntime vs ")]
        refs = " and ".join(dict.fromkeys(c.compared.removeprefix("onnxruntime vs ") for c in ort))
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


def _run_onnx(session, x: torch.Tensor) -> torch.Tensor:
    (y,) = session.run(None, {"pixel_values": x.numpy()})
    return torch.from_numpy(y)


def export_onnx(
    hf_dir: str | os.PathLike,
    output: str | os.PathLike,
    deit_name: str | None = None,
    *,
    init: str = "pretrained",
    seed: int = 0,
    model_kwargs: dict | None = None,
    checkpoint: str | os.PathLike | None = None,
    ema: bool | None = None,
    overwrite: bool = False,
    atol: float = ONNX_ATOL,
) -> OnnxReport:
    """Export a transformers ViT/DeiT folder to ONNX, checked with onnxruntime, atomically.

    Args:
        hf_dir: the transformers folder (ours or the hub's).
        output: the `.onnx` file to write.
        deit_name: the timm model the folder was converted from; with it the folder is first
            checked against timm (as `verify`), and the ONNX file is compared with timm too.
            Without it, with the transformers model only.
        init, seed, model_kwargs, checkpoint, ema: the timm model's weights, as for
            `convert_deit_checkpoint`.
        overwrite: replace an existing `output`.
        atol: the bound for onnxruntime vs transformers, and vs timm for a float32 folder
            (a float16/bfloat16 folder differs from timm by up to its `DTYPE_ATOL`). Before
            the export, the folder is checked against timm as `verify` checks it.

    Returns:
        An `OnnxReport` (every check passed).

    Raises:
        MissingExtraError: the ONNX stack is not installed (`pip install 'deit-port[onnx]'`).
        ParityError: a comparison exceeded its bound; nothing was written.
        OutputError, KeyMismatchError, CheckpointError, BadInputError: bad input; nothing
            was written.

    Example:
        >>> export_onnx("deit-tiny-hf", "deit-tiny.onnx", "deit_tiny_patch16_224").passed
        True
    """
    require_onnx()
    out = check_output_file(output, overwrite, suffix=".onnx")
    folder = Path(hf_dir)
    dtype = hf_folder.folder_dtype(hf_folder.read_folder_config(folder))
    timm_model = _timm_model(deit_name, init, seed, model_kwargs, checkpoint, ema)
    hf_model, spec = _load(folder, None if timm_model is None else ArchSpec.from_timm(timm_model))
    model = _Output(hf_model).eval()
    x = _inputs(timm_model, spec, seed)
    output_name = "logits" if spec.num_classes else "last_hidden_state"
    # a float16/bfloat16 folder (computed in float32) differs from timm by its rounding
    timm_atol = atol if dtype == "float32" else max(atol, DTYPE_ATOL.get(dtype, atol))

    checks: list[OnnxCheck] = []
    if timm_model is not None:  # the folder itself first: no export for a folder that differs
        folder_atol = DTYPE_ATOL.get(dtype, DTYPE_ATOL["float32"])  # as `verify` checks it
        report = compare_tensors(
            reference_outputs(timm_model, x), _torch_output(model, x), folder_atol
        )
        checks.append(OnnxCheck("transformers vs timm", len(x), report))
        if not report.passed:
            raise ParityError(_report(out, output_name, checks, 0.0, None))

    # the weights in float32 (past 1.5 GB, into NAME.onnx.data beside it); the graph (1.1 MiB
    # for DeiT tiny) is in the margin `check_free_space` adds
    nbytes = sum(v.nbytes for v in hf_model.state_dict().values())
    files = 2 if nbytes > _EXTERNAL_DATA else 1
    with atomic_file(out, overwrite, size=nbytes, files=files) as tmp:
        logger.info("exporting %s to ONNX", folder)
        seconds, opset = _export(model, x, tmp, output_name)
        logger.info("exported in %.1f s (opset %s); checking with onnxruntime", seconds, opset)
        checks += _check_onnx(tmp, model, timm_model, x, atol, timm_atol)
        result = _report(out, output_name, checks, seconds, opset)
        logger.info(result.summary())
        if not result.passed:
            raise ParityError(result)
        data = tmp.with_name(tmp.name + ".data")
        if data.exists():  # published first: the .onnx that reads it comes when this block ends
            with atomic_file(out.with_name(data.name), overwrite) as data_tmp:
                os.rename(data, data_tmp)
    return result


def _timm_model(deit_name, init, seed, model_kwargs, checkpoint, ema) -> nn.Module | None:
    """The timm model to compare with, or None without `deit_name` (then nothing may choose
    its weights)."""
    if deit_name is not None:
        return timm_source(
            deit_name,
            init=init,
            seed=seed,
            model_kwargs=model_kwargs,
            checkpoint=checkpoint,
            ema=ema,
        ).model
    if checkpoint is not None or ema is not None or model_kwargs or init != "pretrained":
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
    model: nn.Module, x: torch.Tensor, path: Path, output_name: str
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
    program.save(path)
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
        actual = _run_onnx(session, xb)
        report = compare_tensors(_torch_output(model, xb), actual, atol)
        checks.append(OnnxCheck("onnxruntime vs transformers", batch, report))
        if timm_model is not None:
            report = compare_tensors(reference_outputs(timm_model, xb), actual, timm_atol)
            checks.append(OnnxCheck("onnxruntime vs timm", batch, report))
    return checks


def _report(out, output_name, checks, seconds, opset) -> OnnxReport:
    return OnnxReport(out, output_name, tuple(checks), seconds, opset)


# --- the folder transformers.js and optimum read: HF_DIR/onnx/ ------------------------------

ONNX_FOLDER = "onnx"
MODEL_FILE = "model.onnx"
QUANTIZED_FILE = "model_quantized.onnx"  # transformers.js's `dtype: 'q8'`, its WASM default
CHECK_BATCH = max(BATCH_SIZES)


@dataclass(frozen=True)
class QuantizedCheck:
    """The int8 model against the float32 one, on the same batch (`quantize_onnx`).

    Dynamic int8 quantization is lossy by design, so this is a measurement, not a parity
    contract: `passed` asks only for finite outputs of the float32 model's shape and, when
    `min_top1` is set, that much top-1 agreement (None for hidden states)."""

    output: Path
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
            f"{self.fp32_size_bytes / 1e6:.1f} MB) vs {MODEL_FILE} on {self.inputs} inputs: "
            f"{top1}max |diff| {self.max_abs_diff:.3g}, mean |diff| {self.mean_abs_diff:.3g}{gate}"
        )


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
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _check_fraction(min_top1)

    out = check_output_file(output, overwrite, suffix=".onnx")
    weight_type = q8_weight_type(model_file)
    fp32 = onnxruntime.InferenceSession(os.fspath(model_file), providers=["CPUExecutionProvider"])
    expected = _run_onnx(fp32, inputs)
    del fp32
    with atomic_file(out, overwrite) as tmp:
        drop = _DropRootMessage()
        logging.getLogger().addFilter(drop)
        try:
            quantize_dynamic(
                _without_shape_annotations(Path(model_file)),
                os.fspath(tmp),
                weight_type=QuantType[weight_type],
                extra_options={"MatMulConstBOnly": True},
            )
        finally:
            logging.getLogger().removeFilter(drop)
        session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        actual = _run_onnx(session, inputs)
        del session
        report = compare_tensors(expected, actual, atol=math.inf)
        finite = bool(torch.isfinite(actual).all()) and report.shape_hf == report.shape_timm
        check = QuantizedCheck(
            output=out,
            weight_type=weight_type,
            inputs=len(inputs),
            top1_agreement=report.top1_agreement,
            max_abs_diff=report.max_abs_diff if finite else math.inf,
            mean_abs_diff=report.mean_abs_diff if finite else math.inf,
            size_bytes=tmp.stat().st_size,
            fp32_size_bytes=_onnx_bytes(Path(model_file)),
            min_top1=min_top1,
        )
        logger.info(check.summary())
        if not check.passed:
            raise ParityError(check)
    return check


def _without_shape_annotations(model_file: Path):
    """The model for the quantizer: without the exporter's `value_info` shape annotations where
    its weights are inside the file (a model with external weights is passed as its path).

    The quantizer infers every shape again; onnxruntime 1.23 (the newest for Python 3.10)
    refuses a model whose annotations its own inference contradicts ("Inferred shape and
    existing shape differ"), which torch's exporter writes for DeiT's classifier."""
    import onnx

    if model_file.with_name(model_file.name + ".data").exists():
        return os.fspath(model_file)
    model = onnx.load(os.fspath(model_file))
    del model.graph.value_info[:]
    return model


def _check_fraction(min_top1: float) -> None:
    if not 0 <= min_top1 <= 1:
        raise BadInputError(f"the least top-1 agreement must be in [0, 1], not {min_top1:g}")


def _onnx_bytes(model_file: Path) -> int:
    """The size of an `.onnx` file with its external weights (`NAME.onnx.data`), if any."""
    data = model_file.with_name(model_file.name + ".data")
    return model_file.stat().st_size + (data.stat().st_size if data.exists() else 0)


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


def export_onnx_folder(
    hf_dir: str | os.PathLike,
    deit_name: str | None = None,
    *,
    quantize: bool = True,
    images: list | None = None,
    min_top1: float = 0.0,
    init: str = "pretrained",
    seed: int = 0,
    model_kwargs: dict | None = None,
    checkpoint: str | os.PathLike | None = None,
    ema: bool | None = None,
    overwrite: bool = False,
    atol: float = ONNX_ATOL,
) -> OnnxFolderReport:
    """Write `HF_DIR/onnx/`, the layout transformers.js and optimum read, checked, atomically.

    `onnx/model.onnx` is `export_onnx`'s file (same checks); with `quantize`, also
    `onnx/model_quantized.onnx` (`quantize_onnx`, checked against it on `check_batch`). The
    folder is built in a hidden `.onnx.PID.*.partial` folder inside HF_DIR and moved into place
    when everything passed; then the model card (`README.md`) gets an ONNX section with the
    figures (rewritten atomically, any earlier ONNX section replaced).

    Args:
        hf_dir: the transformers folder (ours or the hub's).
        deit_name, init, seed, model_kwargs, checkpoint, ema, atol: as `export_onnx`.
        quantize: write the int8 file too (transformers.js's default on WASM, `dtype: 'q8'`).
        images: PIL images added to the int8 check's batch.
        min_top1: the least top-1 agreement of the int8 model accepted (0: reported only).
        overwrite: replace an existing, non-empty `HF_DIR/onnx`.

    Returns:
        An `OnnxFolderReport` (everything passed).

    Raises:
        As `export_onnx` and `quantize_onnx`; nothing is written then.

    Example:
        >>> export_onnx_folder("deit-tiny-hf").quantized.top1_agreement
        1.0
    """
    require_onnx()
    import onnxruntime

    from .card import CARD_FILE, with_section

    _check_fraction(min_top1)
    folder = Path(hf_dir)
    hf_folder.read_folder_config(
        folder
    )  # a model folder, before atomic_folder makes any folder there
    with atomic_folder(folder / ONNX_FOLDER, overwrite) as tmp:
        fp32 = export_onnx(
            folder,
            tmp / MODEL_FILE,
            deit_name,
            init=init,
            seed=seed,
            model_kwargs=model_kwargs,
            checkpoint=checkpoint,
            ema=ema,
            atol=atol,
        )
        quantized = None
        if quantize:
            session = onnxruntime.InferenceSession(
                str(tmp / MODEL_FILE), providers=["CPUExecutionProvider"]
            )
            shape = tuple(session.get_inputs()[0].shape[1:])
            del session
            x = check_batch(folder, shape, images, seed=seed)
            quantized = quantize_onnx(tmp / MODEL_FILE, tmp / QUANTIZED_FILE, x, min_top1=min_top1)
    out = folder / ONNX_FOLDER  # the reports name the files where they now lie
    done = OnnxFolderReport(
        out,
        dataclasses.replace(fp32, output=out / MODEL_FILE),
        None if quantized is None else dataclasses.replace(quantized, output=out / QUANTIZED_FILE),
    )
    card = folder / CARD_FILE
    text = card.read_text(encoding="utf-8") if card.is_file() else ""
    with atomic_file(card, overwrite=True) as tmp_card:
        tmp_card.write_text(with_section(text, ONNX_FOLDER, _card_section(done)), encoding="utf-8")
    return done


def _card_section(report: OnnxFolderReport) -> str:
    """The model card's ONNX section: the files, what each was compared with, the figures."""
    fp32, q = report.fp32, report.quantized
    ort = [c for c in fp32.checks if c.compared.startswith("onnxruntime vs ")]
    refs = " and ".join(dict.fromkeys(c.compared.removeprefix("onnxruntime vs ") for c in ort))
    worst = max(ort, key=lambda c: c.report.max_abs_diff).report
    batches = " and ".join(str(b) for b in BATCH_SIZES)
    files = (
        f"`{ONNX_FOLDER}/{MODEL_FILE}` (float32, "
        f"{_onnx_bytes(report.folder / MODEL_FILE) / 1e6:.1f} MB, opset {fp32.opset}, input "
        f"`pixel_values` with a dynamic batch, output `{fp32.output_name}`)"
    )
    if q is not None:
        files += (
            f" and `{ONNX_FOLDER}/{QUANTIZED_FILE}` (int8: onnxruntime's dynamic quantization, "
            f"{q.weight_type} weights, {q.size_bytes / 1e6:.1f} MB)"
        )
    fp32_row = (
        f"| {MODEL_FILE} | {refs} (onnxruntime, batches of {batches}) | {max(BATCH_SIZES)} | "
        f"{worst.max_abs_diff:.3g} (atol {worst.atol:g}) | {worst.mean_abs_diff:.3g} | "
        f"{_percent(worst.top1_agreement)} |"
    )
    lines = [
        "## ONNX (transformers.js, onnxruntime)",
        "",
        (
            f"Written by `deit-port export-onnx`: {files}. transformers.js reads them from this "
            "folder: `dtype: 'fp32'` the first, `dtype: 'q8'` (its default in the browser) the second."
        ),
        "",
        "| file | compared with | inputs | max abs diff | mean abs diff | top-1 agreement |",
        "|---|---|---|---|---|---|",
        fp32_row,
    ]
    if q is not None:
        lines += [
            (
                f"| {QUANTIZED_FILE} | {MODEL_FILE} (onnxruntime) | {q.inputs} | "
                f"{q.max_abs_diff:.3g} | {q.mean_abs_diff:.3g} | {_percent(q.top1_agreement)} |"
            ),
            "",
            (
                "The int8 file is compared on a synthetic image (and the images given with "
                "`--image`) through this folder's image processor, then N(0, 1) tensors: int8 "
                "weights change the logits by design, so these figures are a measurement, not a "
                "parity bound."
            ),
        ]
    lines += [
        "",
        "```js",
        "import { env, pipeline } from '@huggingface/transformers';",
        "env.allowRemoteModels = false;",
        "env.localModelPath = '/path/to/the/parent/folder/';",
        "const classify = await pipeline('image-classification', 'this-folder', { dtype: 'fp32' });",
        "console.log(await classify('image.png'));",
        "```",
    ]
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "n/a (hidden states)" if value is None else f"{value:.1%}"
