"""The conversion pipeline: a timm model in, a parity-checked transformers folder out; and the
check of an existing folder against timm.

`convert_deit_checkpoint` is a list of steps, each done by the module that owns it:

1. the output path is checked (`output`), before any work;
2. the timm model and its weights are had (`source`: pretrained, seeded random or a checkpoint);
3. timm's outputs on the parity batch are computed (`parity`), so the timm model can be freed
   before the written folder is loaded back;
4. the state dict is mapped (`mapping`), cast to the written dtype where asked;
5. the folder is written beside its final name (`publish`, `hf_folder`, `preprocess`), loaded back with
   `from_pretrained` and compared with timm's outputs (`parity`, `preprocess`), given its
   model card (`card`) and only then moved into place.

    >>> report = convert_deit_checkpoint("deit_tiny_patch16_224", "out", WeightSource(init="random"))
    >>> convert_deit_checkpoint("deit_small_patch16_224", "out", WeightSource(checkpoint="c.pth"))
    >>> report.passed
    True
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from PIL import Image
from torch import nn

from . import hf_folder, mapping, memory, output, parity, preprocess, publish
from .arch import ArchSpec, with_head
from .card import ModelFacts, write_model_card
from .errors import ParityError, PreprocessingError
from .headroom import check_convert
from .hf_config import build_config
from .options import VERIFY_KEYWORDS, CheckOptions, FolderOptions, fold_options
from .progress import Steps
from .shapes import AUTO
from .source import WeightSource, timm_source
from .tolerances import DEFAULT_ATOL

__all__ = [
    "STEPS",
    "convert_deit_checkpoint",
    "convert_timm_model",
    "verify_hf_folder",
]

logger = logging.getLogger(__name__)

# The steps `convert_deit_checkpoint` reports to its `progress` callback, in order (the
# float32 check before a cast, `verifying in float32`, is reported between the two middle ones).
STEPS = ("loading", "timm outputs", "converting", "writing", "verifying", "model card")


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
    state_dict = mapping.timm_to_hf(model.state_dict(), spec)
    return hf_folder.load_hf_state_dict(state_dict, build_config(spec, labels), spec)


def convert_deit_checkpoint(
    deit_name: str,
    pytorch_dump_folder_path: str | os.PathLike,
    weights: WeightSource | None = None,
    *,
    written: FolderOptions | None = None,
    check: CheckOptions | None = None,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
    **loose: Any,
) -> parity.ParityReport | None:
    """Convert the timm model `deit_name` and write a transformers folder, built beside its
    final name and moved there only after it matched timm, loaded back.

    Args:
        deit_name: a timm model name; `auto` with a checkpoint: the DeiT its tensors fit.
        pytorch_dump_folder_path: the output folder; absent or empty unless `overwrite`.
        weights, written, check: where the weights come from (default: timm's pretrained
            ones); labels, dtype, head, shard size; the parity check (`options`).
        progress: called with each step's name as it starts (`STEPS`).
        **loose: keyword-only compatibility: the three values' fields (`OPTION_KEYWORDS`).

    Returns:
        The `ParityReport` of the written folder (None without `check.verify`).

    Raises:
        ParityError, PreprocessingError, BadInputError: nothing is written then.
    """
    weights, written, check = fold_options(weights, written, check, loose)
    step, protect = Steps(progress), _protected(weights)
    dtype_name, _ = hf_folder.resolve_dtype(written.dtype)
    output.check_output_dir(pytorch_dump_folder_path, overwrite, protect)
    if deit_name != AUTO:  # before the weights, like the disk: the memory this path needs
        check_convert(deit_name, dict(weights.model_kwargs), verify=check.verify, dtype=dtype_name)
    step("loading")
    timm_model, spec, config, card, mapped = _load(deit_name, weights, written, dtype_name)
    batch = [parity.synthetic_image(0), *check.images]
    reference = _timm_reference(timm_model, spec, batch, check, step)
    step("converting")
    state_dict = _hf_state_dict(timm_model, mapped, spec)
    del mapped
    state_dict, exact = _cast(state_dict, config, spec, reference, dtype_name, step)
    report, (nbytes, files) = None, hf_folder.hf_folder_size(state_dict, written.max_shard_size)
    with publish.atomic_folder(
        pytorch_dump_folder_path, overwrite, protect, size=nbytes, files=files + 2
    ) as tmp:  # + 2: the image processor's config and the model card
        step("writing")
        hf_folder.save_hf_folder(tmp, state_dict, config, max_shard_size=written.max_shard_size)
        preprocess.save_preprocessor(tmp, timm_model)
        if reference is not None:
            step("verifying")
            _check_preprocessing(tmp, timm_model, batch)
            del timm_model, state_dict
            memory.release_freed()  # the folded tensors' memory, before the folder is loaded
            report = _check_written(tmp, spec, reference, check.atol_for(dtype_name))
        step("model card")
        inputs = _describe_inputs(len(batch), 0 if reference is None else len(reference.inputs))
        write_model_card(tmp, card, report=report, inputs=inputs, exact_report=exact)
    logger.info("time per step: %s", step.summary())
    return report


def _protected(weights: WeightSource) -> tuple:
    """The files the output must not overwrite: the checkpoint being converted."""
    return () if weights.checkpoint is None else (weights.checkpoint,)


def _load(deit_name: str, weights: WeightSource, written: FolderOptions, dtype_name: str):
    """`(timm model, spec, config, the model card's facts, the checkpoint mapped afresh)`.

    The checkpoint is mapped again here (`mapped_again`: writing from pages nothing has read
    is faster) and its `TimmSource` let go: its tensors are the timm model's, freed with it."""
    source = timm_source(deit_name, weights)
    spec = with_head(ArchSpec.from_timm(source.model), written.head)
    config = build_config(spec, written.labels)
    labels = [config.id2label[i] for i in range(spec.num_classes)]
    card = ModelFacts(source.name, spec, source.weights, dtype_name, labels, source.notes)
    return source.model, spec, config, card, source.mapped_again()


def _cast(state_dict, config, spec, reference, dtype_name: str, step: Steps):
    """The state dict in the written dtype, and (for a cast that a check follows) the report of
    the conversion checked in float32 before it, else None. The config records the dtype."""
    _, cast = hf_folder.resolve_dtype(dtype_name)
    if cast is torch.float32:
        return state_dict, None
    exact = None
    if reference is not None:
        step("verifying in float32")
        exact = _check_before_cast(state_dict, config, spec, reference, dtype_name)
    state_dict = {k: v.to(cast) if v.is_floating_point() else v for k, v in state_dict.items()}
    setattr(config, hf_folder.dtype_key(), dtype_name)
    return state_dict, exact


def verify_hf_folder(
    hf_dir: str | os.PathLike,
    deit_name: str,
    weights: WeightSource | None = None,
    *,
    check: CheckOptions | None = None,
    progress: Callable[[str], None] | None = None,
    **loose: Any,
) -> parity.ParityReport:
    """Check an existing transformers folder (ours or the hub's) against a timm model.

    The folder is loaded strictly into the class of the timm model's architecture, in float32;
    the tolerance follows the dtype its `config.json` records (`DTYPE_ATOL`).

    Args:
        hf_dir: the transformers folder (local).
        deit_name, weights: the timm model, as for `convert_deit_checkpoint`.
        check: `atol` (default: `DTYPE_ATOL` of the folder's dtype), `images`, `layers`.
        progress: called with `loading`, `verifying`.
        **loose: keyword-only compatibility, `options.VERIFY_KEYWORDS`: the weights'
            keywords and `atol`, `images`, `layers`.

    Returns:
        The `ParityReport`; `passed` says whether it matched.

    Raises:
        BadInputError: `hf_dir` is not a model folder; (KeyMismatchError) its weights are not
            those of the timm model's architecture; (CheckpointError, WeightsUnavailableError,
            ...) bad input for the timm model.

    Example:
        >>> verify_hf_folder("deit-tiny-hf", "deit_tiny_patch16_224").passed
        True
    """
    weights, _, check = fold_options(weights, None, check, loose, VERIFY_KEYWORDS)
    step = Steps(progress)
    folder = Path(hf_dir)
    folder_config = hf_folder.read_folder_config(folder)
    step("loading")
    timm_model = timm_source(deit_name, weights).model
    spec = ArchSpec.from_timm(timm_model)
    if spec.distilled and folder_config.get("architectures") == ["DeiTForImageClassification"]:
        spec = with_head(spec, "cls")  # a `--head cls` folder
    atol = check.atol_for(hf_folder.folder_dtype(folder_config))
    step("verifying")
    hf_model = hf_folder.load_hf_folder(folder, spec, **hf_folder.float32_kwargs())
    inputs = parity.parity_inputs(timm_model, images=[parity.synthetic_image(0), *check.images])
    return parity.check_parity(
        timm_model,
        hf_model,
        inputs,
        atol=atol,
        layers=check.layers,
        cls_head_only=spec.cls_head_only,
    )


class _Reference(NamedTuple):
    """timm's side of the parity check: the inputs, the outputs, and (with `layers`) the
    output of every stage."""

    inputs: torch.Tensor
    outputs: torch.Tensor
    stages: dict[str, torch.Tensor] | None


def _timm_reference(
    timm_model: nn.Module, spec: ArchSpec, batch: list[Image.Image], check: CheckOptions, step
) -> _Reference | None:
    """timm's outputs (and, with `check.layers`, every stage's) on the parity batch; None
    without `check.verify`."""
    if not check.verify:
        return None
    step("timm outputs")
    layers = check.layers
    inputs = parity.parity_inputs(timm_model, images=batch)
    if not layers:
        return _Reference(
            inputs, parity.reference_outputs(timm_model, inputs, spec.cls_head_only), None
        )
    stages = parity.reference_stages(timm_model, inputs, spec.cls_head_only)
    return _Reference(inputs, next(reversed(stages.values())), stages)


def _hf_state_dict(
    timm_model: nn.Module, weights: dict[str, torch.Tensor] | None, spec: ArchSpec
) -> dict[str, torch.Tensor]:
    """The transformers state dict of `timm_model`.

    `weights`, where given, are the model's checkpoint mapped afresh (`mapped_again`: writing
    from pages nothing has read is faster). Where timm loaded them unchanged, they are
    what is mapped: the timm model lets its own map go (to the meta device: its structure, and
    with it its data config, stay), and the pages of tensors the mapping replaced (DeiT III's
    folded ones) are handed back once read (`memory.release_pages`).
    """
    held = timm_model.state_dict()
    if weights is None or _shapes(weights) != _shapes(held):
        # no map, or timm's checkpoint filter renamed or resampled: convert what timm holds
        return mapping.timm_to_hf(held, spec)
    del held
    timm_model.to("meta")
    state_dict = mapping.timm_to_hf(weights, spec)
    kept = {v.untyped_storage().data_ptr() for v in state_dict.values()}
    memory.release_pages(v for v in weights.values() if v.untyped_storage().data_ptr() not in kept)
    return state_dict


def _shapes(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def _check_before_cast(
    state_dict: dict[str, torch.Tensor],
    config,
    spec: ArchSpec,
    reference: _Reference,
    dtype_name: str,
) -> parity.ParityReport:
    """The conversion itself, in float32 and in memory, at `DEFAULT_ATOL`: a cast's rounding
    must not hide a conversion error under its wider tolerance."""
    exact = parity.compare_outputs(
        reference.outputs,
        hf_folder.load_hf_state_dict(state_dict, config, spec),
        reference.inputs,
        atol=DEFAULT_ATOL,
        stages=reference.stages,
    )
    logger.info("before the cast to %s: %s", dtype_name, exact.summary())
    if not exact.passed:
        raise ParityError(exact)
    return exact


def _check_preprocessing(folder: Path, timm_model: nn.Module, batch: list[Image.Image]) -> None:
    """The written image processor against timm's eval transform, on the batch's images."""
    logger.info("verifying parity")
    report = preprocess.compare_preprocessing(folder, timm_model, batch)
    logger.info(report.summary())
    if not report.matches:
        raise PreprocessingError(report)


def _check_written(
    folder: Path, spec: ArchSpec, reference: _Reference, atol: float
) -> parity.ParityReport:
    """The written folder, loaded back with `from_pretrained` in float32, against timm."""
    hf_model = hf_folder.load_hf_folder(folder, spec, **hf_folder.float32_kwargs())
    report = parity.compare_outputs(
        reference.outputs, hf_model, reference.inputs, atol=atol, stages=reference.stages
    )
    logger.info(report.summary())
    if not report.passed:
        raise ParityError(report)
    return report


def _describe_inputs(images: int, total: int) -> str:
    noise = total - images
    return (
        f"{total} inputs: {images} image{'s' if images > 1 else ''} (a synthetic test image"
        f"{' and your own' if images > 1 else ''}) through timm's eval transform, and {noise} "
        "N(0, 1) tensors"
    )
