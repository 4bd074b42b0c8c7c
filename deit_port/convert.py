"""Convert timm DeiT models to transformers: the importable API.

The pieces live in their own modules (`arch`, `mapping`, `hf_config`, `io`, `parity`,
`source`); this module puts them together and exports what a user calls (`__all__`):

    >>> from deit_port.convert import ArchSpec, timm_to_hf, convert_timm_model
    >>> hf_model = convert_timm_model(timm.create_model("deit_tiny_patch16_224"))

Run as `python -m deit_port.convert --deit_name NAME --pytorch_dump_folder_path DIR`, the
interface of transformers' `convert_deit_timm_to_pytorch.py` (its parser is `cli.seed_parser`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image
from torch import nn

from .arch import ArchSpec
from .card import write_model_card
from .checkpoint import (
    Checkpoint,
    load_timm_model,
    release_freed,
    release_pages,
    remap_state_dict,
)
from .errors import (
    BadInputError,
    CheckpointError,
    DeitPortError,
    ImageLoadError,
    KeyMismatchError,
    MissingExtraError,
    OutputError,
    ParityError,
    ParityFailure,
    PreprocessingError,
    UnsupportedModelError,
    WeightsUnavailableError,
)
from .hf_config import build_config
from .io import (
    atomic_folder,
    check_output_dir,
    load_hf_folder,
    load_hf_state_dict,
    save_hf_folder,
)
from .mapping import (
    create_rename_keys,
    hf_to_timm,
    merge_qkv,
    qkv_pairs,
    read_in_q_k_v,
    rename_key,
    rename_pairs,
    split_qkv,
    timm_to_hf,
)
from .parity import (
    DEFAULT_ATOL,
    ParityReport,
    check_parity,
    compare_outputs,
    parity_inputs,
    reference_outputs,
    reference_stages,
    synthetic_image,
)
from .preprocess import compare_preprocessing, save_preprocessor
from .shapes import AUTO
from .source import create_timm_model, resolve_model_name
from .versions import transformers_major

# What a user calls: the conversion and verification entry points, the architecture, the
# key mapping, the names of transformers' script, and the errors. Everything else stays in
# its own module (`deit_port.checkpoint`, `deit_port.io`, `deit_port.source`, ...).
__all__ = [
    "DTYPE_ATOL",
    "ArchSpec",
    "BadInputError",
    "CheckpointError",
    "DeitPortError",
    "ImageLoadError",
    "KeyMismatchError",
    "MissingExtraError",
    "OutputError",
    "ParityError",
    "ParityFailure",
    "PreprocessingError",
    "UnsupportedModelError",
    "WeightsUnavailableError",
    "build_config",
    "check_parity",
    "convert_deit_checkpoint",
    "convert_timm_model",
    "create_rename_keys",
    "hf_to_timm",
    "merge_qkv",
    "qkv_pairs",
    "read_in_q_k_v",
    "rename_key",
    "rename_pairs",
    "split_qkv",
    "timm_to_hf",
    "verify_hf_folder",
    "with_head",
]

logger = logging.getLogger(__name__)

# The parity tolerance (max |logit diff| vs timm in float32) of a folder written in each dtype,
# loaded back as float32. float16/bfloat16 round every weight (relative 2**-11 / 2**-8): on the
# fast variants with seeded random weights that moved logits by up to 3.3e-3 / 3.3e-2 (measured,
# see README); trained models have larger logits, hence the margin. The conversion itself is
# checked in float32 at DEFAULT_ATOL before the cast.
DTYPE_ATOL = {"float32": DEFAULT_ATOL, "float16": 5e-2, "bfloat16": 5e-1}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def convert_timm_model(
    model: nn.Module, labels: Sequence[str] | None = None, head: str | None = None
) -> nn.Module:
    """Convert a timm DeiT model to the equivalent transformers model, in memory.

    Args:
        model: a timm `VisionTransformer` / `VisionTransformerDistilled`.
        labels: class names (default: ImageNet-1k for 1000 classes).
        head: for a distilled model, `teacher` (default) or `cls` (see `convert_deit_checkpoint`).

    Returns:
        The transformers model (`hf_model_class(spec)`), in eval mode.

    Example:
        >>> hf = convert_timm_model(timm.create_model("deit_tiny_patch16_224"))
    """
    spec = with_head(ArchSpec.from_timm(model), head)
    state_dict = timm_to_hf(model.state_dict(), spec)
    return load_hf_state_dict(state_dict, build_config(spec, labels), spec)


def convert_deit_checkpoint(
    deit_name: str,
    pytorch_dump_folder_path: str | os.PathLike,
    *,
    init: str = "pretrained",
    seed: int = 0,
    model_kwargs: dict | None = None,
    labels: Sequence[str] | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    verify: bool = True,
    atol: float | None = None,
    images: Sequence[Image.Image] | None = None,
    checkpoint: str | os.PathLike | None = None,
    ema: bool | None = None,
    dtype: str = "float32",
    head: str | None = None,
    progress: Callable[[str], None] | None = None,
    layers: bool = False,
) -> ParityReport | None:
    """Convert the timm model `deit_name` and write a transformers folder, parity checked.

    The folder (config, safetensors weights, image processor, model card `README.md`) is built
    beside `pytorch_dump_folder_path` and moved into place only after the written folder,
    loaded back with `from_pretrained`, matched the timm model.

    Args:
        deit_name: a timm model name (tags and legacy `vit_deit_*` names accepted).
        pytorch_dump_folder_path: the output folder; must be absent or empty unless `overwrite`.
        init: `pretrained` (timm's weights) or `random` (seeded, see `randomize_`); not used
            with `checkpoint`.
        seed: seed for `random`.
        model_kwargs: passed to `timm.create_model` (e.g. `num_classes`, `img_size`).
        labels: class names.
        max_shard_size: safetensors shard size.
        overwrite: replace an existing folder.
        verify: run the parity check (else return None).
        atol: the parity contract (default: `DTYPE_ATOL[dtype]`).
        images: more images for the parity batch (any mode; added to the synthetic one). The
            written `preprocessor_config.json` is also checked against timm's transform on them.
        checkpoint: a checkpoint file with the weights (see `deit_port.checkpoint`).
        ema: with `checkpoint`: True for its EMA weights, False for the plain ones, None for
            whichever it has (an error if both).
        dtype: `float32`, `float16` or `bfloat16`: the written weights. For the other two the
            conversion is checked in float32 first, then the written folder at `DTYPE_ATOL`.
        head: for a distilled model, `teacher` (default): both heads, averaged, as timm's eval
            forward (`DeiTForImageClassificationWithTeacher`, for inference); or `cls`: the
            class-token head only (`DeiTForImageClassification`, which transformers trains
            with `labels`), checked against `model.head(model.forward_features(x)[:, 0])`.
            A model without distillation head has only the class-token head: `cls` changes
            nothing there and `teacher` is an error, as is either without a classifier.
        progress: called with the name of each step as it starts (`loading`, `timm outputs`,
            `converting`, `writing`, `verifying`, `model card`); their times are logged at
            INFO (`time per step: ...`).
        layers: compare every stage too (`check_parity(..., layers=True)`): the report's
            `table()` and, on failure, `first_divergence` say where the models part.

    Returns:
        The `ParityReport` of the written folder (None without `verify`).

    Raises:
        ParityError: the check failed; nothing was written.
        PreprocessingError: the written image processor does not reproduce timm's eval
            transform (`compare_preprocessing`); nothing was written.
        BadInputError (OutputError, CheckpointError, WeightsUnavailableError, ...): bad input; nothing
            was written.

    Example:
        >>> convert_deit_checkpoint("deit_small_patch16_224", "out", checkpoint="ckpt.pth", ema=False)
    """
    step = _Steps(progress)
    dtype_name, cast = _dtype(dtype)
    atol = DTYPE_ATOL[dtype_name] if atol is None else atol
    check_output_dir(pytorch_dump_folder_path, overwrite, _protected(checkpoint))
    step("loading")
    timm_model, timm_name, source, notes, ckpt = _timm_source(
        deit_name, init, seed, model_kwargs, checkpoint, ema
    )
    spec = with_head(ArchSpec.from_timm(timm_model), head)
    config = build_config(spec, labels)
    batch = [synthetic_image(0), *(images or [])]
    inputs = expected = stages = None
    if verify:
        # timm's outputs are computed up front, so the timm model is freed before the written
        # folder is loaded back: the two models are never in memory side by side.
        step("timm outputs")
        inputs = parity_inputs(timm_model, images=batch)
        if layers:
            stages = reference_stages(timm_model, inputs, spec.cls_head_only)
            expected = next(reversed(stages.values()))
        else:
            expected = reference_outputs(timm_model, inputs, spec.cls_head_only)
    step("converting")
    # A mapped checkpoint is converted and written from a fresh map of its file
    # (`remap_state_dict`: written several times faster than from pages the checks and the
    # forward pass read), and the timm model lets its own map go first (it keeps its structure,
    # and with it its data config, on the meta device). DeiT III's folded tensors are new ones:
    # folding into the mapped tensors in place made every page a copy-on-write fault (measured
    # on DeiT III huge, 1 GB folded: 2.45 s in place, 0.25 s into new tensors); the pages the
    # fold read are then handed back (`release_pages`), so the memory held is what the in-place
    # fold held.
    weights = remap_state_dict(ckpt) if ckpt is not None else None
    del ckpt
    held = timm_model.state_dict()
    if weights is not None and _shapes(weights) != _shapes(held):
        weights = None  # timm's checkpoint filter renamed or resampled: convert what it loaded
    mapped = weights is not None
    if mapped:
        timm_model.to("meta")
    else:
        weights = held
    del held
    state_dict = timm_to_hf(weights, spec)
    if mapped:
        kept = {v.untyped_storage().data_ptr() for v in state_dict.values()}
        release_pages(v for v in weights.values() if v.untyped_storage().data_ptr() not in kept)
    del weights
    exact = None
    if cast is not torch.float32:
        if verify:
            step("verifying in float32")
            exact = compare_outputs(
                expected,
                load_hf_state_dict(state_dict, config, spec),
                inputs,
                atol=DEFAULT_ATOL,
                stages=stages,
            )
            logger.info("before the cast to %s: %s", dtype_name, exact.summary())
            if not exact.passed:
                raise ParityError(exact)
        state_dict = {k: v.to(cast) if v.is_floating_point() else v for k, v in state_dict.items()}
        setattr(config, _dtype_key(), dtype_name)
    report = None
    protect = _protected(checkpoint)
    with atomic_folder(pytorch_dump_folder_path, overwrite=overwrite, protect=protect) as tmp:
        step("writing")
        logger.info("writing %s", pytorch_dump_folder_path)
        save_hf_folder(tmp, state_dict, config, max_shard_size=max_shard_size)
        save_preprocessor(tmp, timm_model)
        if verify:
            step("verifying")
            logger.info("verifying parity")
            preprocessing = compare_preprocessing(tmp, timm_model, batch)
            logger.info(preprocessing.summary())
            if not preprocessing.matches:
                raise PreprocessingError(preprocessing)
            del timm_model, state_dict
            release_freed()  # the folded tensors' memory, before the folder is loaded
            hf_model = load_hf_folder(tmp, spec, **_float32())
            report = compare_outputs(expected, hf_model, inputs, atol=atol, stages=stages)
            del hf_model
            logger.info(report.summary())
            if not report.passed:
                raise ParityError(report)
        step("model card")
        write_model_card(
            tmp,
            timm_name=timm_name,
            spec=spec,
            source=source,
            notes=notes,
            dtype=dtype_name,
            report=report,
            inputs=_describe_inputs(len(batch), 0 if inputs is None else len(inputs)),
            exact_report=exact,
            labels=[config.id2label[i] for i in range(spec.num_classes)],
        )
    logger.info("time per step: %s", step.summary())
    return report


def verify_hf_folder(
    hf_dir: str | os.PathLike,
    deit_name: str,
    *,
    init: str = "pretrained",
    seed: int = 0,
    model_kwargs: dict | None = None,
    checkpoint: str | os.PathLike | None = None,
    ema: bool | None = None,
    atol: float | None = None,
    images: Sequence[Image.Image] | None = None,
    progress: Callable[[str], None] | None = None,
    layers: bool = False,
) -> ParityReport:
    """Check an existing transformers folder (ours or the hub's) against a timm model.

    The folder is loaded strictly into the class of the timm model's architecture, in float32;
    the tolerance follows the dtype its `config.json` records (`DTYPE_ATOL`).

    Args:
        hf_dir: the transformers folder (local).
        deit_name, init, seed, model_kwargs, checkpoint, ema: the timm model, as for
            `convert_deit_checkpoint`.
        atol: the tolerance (default: `DTYPE_ATOL` of the folder's dtype).
        images: more images for the parity batch.
        progress: called with `loading`, `verifying`.
        layers: compare every stage too (`check_parity(..., layers=True)`).

    Returns:
        The `ParityReport`; `passed` says whether it matched.

    Raises:
        OutputError: `hf_dir` is not a model folder.
        KeyMismatchError: its weights are not those of the timm model's architecture.
        BadInputError (CheckpointError, WeightsUnavailableError, ...): bad input.

    Example:
        >>> verify_hf_folder("deit-tiny-hf", "deit_tiny_patch16_224").passed
        True
    """
    step = progress or _no_progress
    folder = Path(hf_dir)
    if not (folder / "config.json").is_file():
        raise OutputError(f"{folder} is not a transformers model folder (no config.json)")
    step("loading")
    timm_model, *_ = _timm_source(deit_name, init, seed, model_kwargs, checkpoint, ema)
    spec = ArchSpec.from_timm(timm_model)
    if spec.distilled and _folder_config(folder).get("architectures") == [
        "DeiTForImageClassification"
    ]:
        spec = with_head(spec, "cls")  # a `--head cls` folder
    if atol is None:
        atol = DTYPE_ATOL.get(_folder_dtype(folder), DEFAULT_ATOL)
    step("verifying")
    hf_model = load_hf_folder(folder, spec, **_float32())
    inputs = parity_inputs(timm_model, images=[synthetic_image(0), *(images or [])])
    return check_parity(
        timm_model, hf_model, inputs, atol=atol, layers=layers, cls_head_only=spec.cls_head_only
    )


class _Steps:
    """Calls `progress` as each step starts and times the steps, for the log."""

    def __init__(self, progress: Callable[[str], None] | None):
        self._progress = progress or _no_progress
        self.seconds: dict[str, float] = {}
        self._current: str | None = None
        self._start = 0.0

    def __call__(self, name: str) -> None:
        self._stop()
        self._progress(name)
        self._current, self._start = name, time.perf_counter()

    def _stop(self) -> None:
        if self._current is not None:
            self.seconds[self._current] = time.perf_counter() - self._start
            self._current = None

    def summary(self) -> str:
        """`loading 0.41 s, writing 1.20 s, ...` (the step running now ends here)."""
        self._stop()
        return ", ".join(f"{name} {t:.2f} s" for name, t in self.seconds.items())


def _shapes(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def _no_progress(step: str) -> None:
    pass


def _dtype(dtype: str | torch.dtype) -> tuple[str, torch.dtype]:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise BadInputError(f"dtype must be one of {', '.join(_DTYPES)}, not {dtype!r}")
    return name, _DTYPES[name]


def _protected(checkpoint) -> tuple:
    return () if checkpoint is None else (checkpoint,)


def _dtype_key() -> str:
    """transformers 5 calls it `dtype` (in configs and `from_pretrained`), 4.x `torch_dtype`."""
    return "dtype" if transformers_major() >= 5 else "torch_dtype"


def _float32() -> dict:
    """`from_pretrained` keywords that load in float32 (transformers 5 loads the saved dtype)."""
    return {_dtype_key(): torch.float32}


def _folder_config(folder: Path) -> dict:
    import json

    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise OutputError(f"{folder}/config.json cannot be read: {e}") from e


def _folder_dtype(folder: Path) -> str:
    config = _folder_config(folder)
    return str(config.get("dtype") or config.get("torch_dtype") or "float32")


HEADS = ("teacher", "cls")


def with_head(spec: ArchSpec, head: str | None) -> ArchSpec:
    """`spec` for the head asked (`--head`): `cls` keeps a distilled model's class-token head
    only (`cls_head_only`); `teacher` (or None) both. A model without distillation head has only
    the class-token head: `cls` is that (nothing changes) and `teacher` is an error.

    Raises:
        BadInputError: an unknown head, `teacher` for a model without distillation head, or a
            head for a model without classifier.
    """
    if head is None:
        return spec
    if head not in HEADS:
        raise BadInputError(f"head must be one of {', '.join(HEADS)}, not {head!r}")
    if spec.num_classes == 0:
        raise BadInputError(
            f"--head {head}: the model has no classifier (num_classes=0); drop --head"
        )
    if not spec.distilled:
        if head == "teacher":
            raise BadInputError(
                "--head teacher: the model is not distilled, it has no distillation head; its "
                "one head is the class-token head (drop --head)"
            )
        logger.info("--head cls: the model is not distilled; its one head is the class-token head")
        return spec
    return dataclasses.replace(spec, cls_head_only=head == "cls")


def _timm_source(deit_name, init, seed, model_kwargs, checkpoint, ema) -> _Source:
    """The timm model, its name, where its weights came from in words, notes on what was read
    from or done to the checkpoint (for the model card), and the `Checkpoint` read (if any)."""
    kwargs = model_kwargs or {}
    if checkpoint is not None:
        model, ckpt = load_timm_model(deit_name, checkpoint, ema=ema, **kwargs)
        name = model.pretrained_cfg["architecture"] if deit_name == AUTO else deit_name
        return _Source(model, resolve_model_name(name), ckpt.describe(), ckpt.notes, ckpt)
    if deit_name == AUTO:
        raise BadInputError(
            "MODEL auto picks the DeiT a checkpoint's tensors fit: give --checkpoint PATH, or "
            "a timm model name"
        )
    if ema is not None:
        raise BadInputError("--ema/--no-ema choose weights inside a --checkpoint; give one")
    model = create_timm_model(deit_name, init=init, seed=seed, **kwargs)
    name = resolve_model_name(deit_name)
    if init == "random":
        return _Source(model, name, f"seeded random weights (seed {seed}), not a trained model")
    cfg = getattr(model, "pretrained_cfg", None) or {}
    where = cfg.get("hf_hub_id") or cfg.get("url") or name
    return _Source(model, name, f"timm's pretrained weights ({where})")


class _Source(NamedTuple):
    model: nn.Module
    name: str
    weights: str
    notes: tuple[str, ...] = ()
    checkpoint: Checkpoint | None = None


def _describe_inputs(images: int, total: int) -> str:
    noise = total - images
    return (
        f"{total} inputs: {images} image{'s' if images > 1 else ''} (a synthetic test image"
        f"{' and your own' if images > 1 else ''}) through timm's eval transform, and {noise} "
        "N(0, 1) tensors"
    )


if __name__ == "__main__":  # `python -m deit_port.convert`: the seed script's interface
    from .cli import seed_main

    raise SystemExit(seed_main())
