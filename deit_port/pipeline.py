"""The conversion pipeline: a timm model in, a parity-checked transformers folder out; and the
check of an existing folder against timm.

`convert_deit_checkpoint` is a list of steps, each done by the module that owns it:

1. the output path is checked (`io`), before any work;
2. the timm model and its weights are had (`source`: pretrained, seeded random or a checkpoint);
3. timm's outputs on the parity batch are computed (`parity`), so the timm model can be freed
   before the written folder is loaded back;
4. the state dict is mapped (`mapping`), cast to the written dtype where asked;
5. the folder is written beside its final name (`io`, `preprocess`), loaded back with
   `from_pretrained` and compared with timm's outputs (`parity`, `preprocess`), given its
   model card (`card`) and only then moved into place.

    >>> report = convert_deit_checkpoint("deit_tiny_patch16_224", "out", init="random")
    >>> report.passed
    True
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image
from torch import nn

from . import hf_folder, mapping, memory, output, parity, preprocess, publish
from .arch import ArchSpec, with_head
from .card import write_model_card
from .errors import ParityError, PreprocessingError
from .hf_config import build_config
from .progress import Steps
from .source import timm_source
from .tolerances import DEFAULT_ATOL, DTYPE_ATOL

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
) -> parity.ParityReport | None:
    """Convert the timm model `deit_name` and write a transformers folder, parity checked.

    The folder (config, safetensors weights, image processor, model card `README.md`) is built
    beside `pytorch_dump_folder_path` and moved into place only after the written folder,
    loaded back with `from_pretrained`, matched the timm model.

    Args:
        deit_name: a timm model name (tags and legacy `vit_deit_*` names accepted); `auto`
            with `checkpoint`: the registered DeiT its tensors fit.
        pytorch_dump_folder_path: the output folder; must be absent or empty unless `overwrite`.
        init, seed, model_kwargs, checkpoint, ema: the timm model and its weights
            (`source.timm_source`): timm's pretrained weights, seeded random ones, or a
            checkpoint file (`model_kwargs` go to `timm.create_model`).
        labels: class names.
        max_shard_size: safetensors shard size.
        overwrite: replace an existing folder.
        verify: run the parity check (else return None).
        atol: the parity contract (default: `DTYPE_ATOL[dtype]`).
        images: more images for the parity batch (any mode; added to the synthetic one). The
            written `preprocessor_config.json` is also checked against timm's transform on them.
        dtype: `float32`, `float16` or `bfloat16`: the written weights. For the other two the
            conversion is checked in float32 first, then the written folder at `DTYPE_ATOL`.
        head: for a distilled model, `teacher` (default): both heads, averaged, as timm's eval
            forward (`DeiTForImageClassificationWithTeacher`, for inference); or `cls`: the
            class-token head only (`DeiTForImageClassification`, which transformers trains
            with `labels`), checked against `model.head(model.forward_features(x)[:, 0])`.
            A model without distillation head has only the class-token head: `cls` changes
            nothing there and `teacher` is an error, as is either without a classifier.
        progress: called with the name of each step as it starts (`STEPS`); their times are
            logged at INFO (`time per step: ...`).
        layers: compare every stage too (`check_parity(..., layers=True)`): the report's
            `table()` and, on failure, `first_divergence` say where the models part.

    Returns:
        The `ParityReport` of the written folder (None without `verify`).

    Raises:
        ParityError: the check failed; nothing was written.
        PreprocessingError: the written image processor does not reproduce timm's eval
            transform (`compare_preprocessing`); nothing was written.
        BadInputError (OutputError, CheckpointError, WeightsUnavailableError, ...): bad input;
            nothing was written.

    Example:
        >>> convert_deit_checkpoint("deit_small_patch16_224", "out", checkpoint="ckpt.pth", ema=False)
    """
    step = Steps(progress)
    dtype_name, cast = hf_folder.resolve_dtype(dtype)
    atol = DTYPE_ATOL[dtype_name] if atol is None else atol
    protect = () if checkpoint is None else (checkpoint,)
    output.check_output_dir(pytorch_dump_folder_path, overwrite, protect)

    step("loading")
    source = timm_source(
        deit_name, init=init, seed=seed, model_kwargs=model_kwargs, checkpoint=checkpoint, ema=ema
    )
    timm_model = source.model
    card = {"timm_name": source.name, "source": source.weights, "notes": source.notes}
    spec = with_head(ArchSpec.from_timm(timm_model), head)
    config = build_config(spec, labels)
    batch = [parity.synthetic_image(0), *(images or [])]
    reference = None
    if verify:
        step("timm outputs")
        reference = _timm_reference(timm_model, spec, batch, layers)

    step("converting")
    weights = source.mapped_again()
    del source  # its checkpoint's tensors are the timm model's, freed below when not needed
    state_dict = _hf_state_dict(timm_model, weights, spec)
    del weights
    exact = None
    if cast is not torch.float32:
        if reference is not None:
            step("verifying in float32")
            exact = _check_before_cast(state_dict, config, spec, reference, dtype_name)
        state_dict = {k: v.to(cast) if v.is_floating_point() else v for k, v in state_dict.items()}
        setattr(config, hf_folder.dtype_key(), dtype_name)

    report = None
    nbytes, files = hf_folder.hf_folder_size(state_dict, max_shard_size)
    files += 2  # the image processor's config and the model card
    with publish.atomic_folder(
        pytorch_dump_folder_path, overwrite=overwrite, protect=protect, size=nbytes, files=files
    ) as tmp:
        step("writing")
        logger.info("writing %s", pytorch_dump_folder_path)
        hf_folder.save_hf_folder(tmp, state_dict, config, max_shard_size=max_shard_size)
        preprocess.save_preprocessor(tmp, timm_model)
        if reference is not None:
            step("verifying")
            _check_preprocessing(tmp, timm_model, batch)
            del timm_model, state_dict
            memory.release_freed()  # the folded tensors' memory, before the folder is loaded
            report = _check_written(tmp, spec, reference, atol)
        step("model card")
        write_model_card(
            tmp,
            **card,
            spec=spec,
            dtype=dtype_name,
            report=report,
            inputs=_describe_inputs(len(batch), 0 if reference is None else len(reference.inputs)),
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
) -> parity.ParityReport:
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
        BadInputError: `hf_dir` is not a model folder; (KeyMismatchError) its weights are not
            those of the timm model's architecture; (CheckpointError, WeightsUnavailableError,
            ...) bad input for the timm model.

    Example:
        >>> verify_hf_folder("deit-tiny-hf", "deit_tiny_patch16_224").passed
        True
    """
    step = Steps(progress)
    folder = Path(hf_dir)
    folder_config = hf_folder.read_folder_config(folder)
    step("loading")
    timm_model = timm_source(
        deit_name, init=init, seed=seed, model_kwargs=model_kwargs, checkpoint=checkpoint, ema=ema
    ).model
    spec = ArchSpec.from_timm(timm_model)
    if spec.distilled and folder_config.get("architectures") == ["DeiTForImageClassification"]:
        spec = with_head(spec, "cls")  # a `--head cls` folder
    if atol is None:
        atol = DTYPE_ATOL.get(hf_folder.folder_dtype(folder_config), DEFAULT_ATOL)
    step("verifying")
    hf_model = hf_folder.load_hf_folder(folder, spec, **hf_folder.float32_kwargs())
    inputs = parity.parity_inputs(timm_model, images=[parity.synthetic_image(0), *(images or [])])
    return parity.check_parity(
        timm_model, hf_model, inputs, atol=atol, layers=layers, cls_head_only=spec.cls_head_only
    )


class _Reference(NamedTuple):
    """timm's side of the parity check: the inputs, the outputs, and (with `layers`) the
    output of every stage."""

    inputs: torch.Tensor
    outputs: torch.Tensor
    stages: dict[str, torch.Tensor] | None


def _timm_reference(
    timm_model: nn.Module, spec: ArchSpec, batch: list[Image.Image], layers: bool
) -> _Reference:
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
