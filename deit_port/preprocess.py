"""Preprocessing parity: the transformers image processor that reproduces timm's eval transform.

timm evaluates DeiT with `resolve_data_config` + `create_transform`: resize the shortest edge to
`floor(S / crop_pct)` (bicubic), center crop S, scale to [0, 1], normalize with timm's mean/std.
transformers' `BitImageProcessor` (resize, center crop, rescale, normalize; the processor of
DINOv2 and BiT) expresses exactly that with `size={"shortest_edge": floor(S / crop_pct)}`, in
transformers 4.x and 5.x alike. (`DeiTImageProcessor` would not do: in 4.x it only resizes to a
fixed height x width.)

    >>> save_preprocessor(folder, timm.create_model("deit_tiny_patch16_224"))
    >>> AutoImageProcessor.from_pretrained(folder, backend="pil")  # timm's pixels, exactly

What matches (measured: docs/measurements.md, "Preprocessing"):
- the PIL backend (`backend="pil"`, 4.x's default) gives timm's tensors bit for bit, except on
  images whose resized edge minus the crop is 3 mod 4: there transformers floors the half-pixel
  crop offset and torchvision's `CenterCrop` (used by timm) rounds it half to even, one pixel
  apart (`crop_offset_differs`);
- the default backend transformers 5.x picks (torchvision, on uint8 tensors) resizes with its
  own bicubic kernel: most values equal or one uint8 level apart, single values up to a dozen.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from .errors import BadInputError, PreprocessingError
from .parity import data_config
from .tolerances import PIXEL_ATOL
from .versions import transformers_major

__all__ = [
    "PreprocessReport",
    "PreprocessingError",
    "build_image_processor",
    "compare_preprocessing",
    "crop_offset_differs",
    "load_image_processor",
    "processor_kwargs",
    "save_preprocessor",
]

logger = logging.getLogger(__name__)

PREPROCESSOR_FILE = "preprocessor_config.json"


_DEFAULT_CROP_PCT = 0.875  # timm.data.transforms_factory: `crop_pct or DEFAULT_CROP_PCT`
# The processor fields that decide the pixels (compared field by field by compare_preprocessing).
_FIELDS = (
    "do_resize",
    "size",
    "resample",
    "do_center_crop",
    "crop_size",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
)


def processor_kwargs(config: dict) -> dict:
    """The `BitImageProcessor` arguments equivalent to a timm eval data config.

    Args:
        config: timm's data config (`resolve_data_config`): `input_size`, `interpolation`,
            `mean`, `std`, `crop_pct`, `crop_mode`.

    Returns:
        Keyword arguments for `BitImageProcessor` (and its PIL / fast siblings).

    Raises:
        BadInputError: the config asks for something the processor cannot express (a non-square
            center crop, `crop_mode="border"`, trimmed borders, other than 3 channels).

    Example:
        >>> processor_kwargs({"input_size": (3, 224, 224), "crop_pct": 0.9, ...})["size"]
        {'shortest_edge': 248}
    """
    from transformers.image_utils import PILImageResampling

    channels, height, width = config["input_size"]
    if channels != 3:
        raise BadInputError(f"cannot write an image processor for {channels}-channel input")
    if config.get("crop_border_pixels"):
        raise BadInputError("timm's crop_border_pixels has no image processor equivalent")
    crop_pct = config.get("crop_pct") or _DEFAULT_CROP_PCT
    crop_mode = config.get("crop_mode") or "center"
    if crop_mode == "center":
        if height != width:
            raise BadInputError(
                f"timm resizes a {height}x{width} center crop keeping the ratio of the target; "
                "the image processor cannot express it"
            )
        size = {"shortest_edge": math.floor(height / crop_pct)}
    elif crop_mode == "squash":
        size = {"height": math.floor(height / crop_pct), "width": math.floor(width / crop_pct)}
    else:
        raise BadInputError(f"timm crop_mode {crop_mode!r} has no image processor equivalent")
    interpolation = config.get("interpolation", "bilinear")
    try:
        resample = PILImageResampling.__members__[interpolation.upper()]
    except KeyError:
        raise BadInputError(f"timm interpolation {interpolation!r} has no PIL equivalent") from None
    return {
        "do_resize": True,
        "size": size,
        "resample": int(resample),
        "do_center_crop": True,
        "crop_size": {"height": height, "width": width},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [float(v) for v in config["mean"]],
        "image_std": [float(v) for v in config["std"]],
        "do_convert_rgb": True,
    }


def build_image_processor(timm_model: nn.Module, backend: str = "pil"):
    """The transformers image processor equivalent to timm's eval transform for `timm_model`.

    Args:
        timm_model: the timm model; its data config is `deit_port.parity.data_config`.
        backend: `pil` (timm's pixels exactly) or `torchvision` (transformers 5.x's default).
            Both save the same file.

    Returns:
        A `BitImageProcessor` (or its PIL / fast sibling, per backend and transformers major).
    """
    return _processor_class(backend)(**processor_kwargs(data_config(timm_model)))


def save_preprocessor(folder: str | os.PathLike, timm_model: nn.Module) -> Path:
    """Write `preprocessor_config.json` for `timm_model` into `folder` (`save_pretrained`).

    Args:
        folder: an existing folder (the converted model's).
        timm_model: the timm model whose eval transform the processor reproduces.

    Returns:
        The path of the written file.

    Example:
        >>> save_preprocessor("out/", timm.create_model("deit3_small_patch16_384"))
    """
    processor = build_image_processor(timm_model, backend="pil")
    processor.save_pretrained(folder)
    path = Path(folder) / PREPROCESSOR_FILE
    logger.debug("wrote %s", path)
    return path


def crop_offset_differs(image_size: tuple[int, int], config: dict) -> bool:
    """Whether transformers and timm center-crop `image_size` (w, h) one pixel apart.

    timm's `CenterCrop` (torchvision) places the crop at `round((edge - crop) / 2)`, rounding
    half to even; transformers at `(edge - crop) // 2`. They differ where the resized edge minus
    the crop is odd and its half rounds up (3 mod 4). Only for `crop_mode="center"`.
    """
    _, crop_h, crop_w = config["input_size"]
    if (config.get("crop_mode") or "center") != "center":
        return False
    short = math.floor(crop_h / (config.get("crop_pct") or _DEFAULT_CROP_PCT))
    w, h = image_size
    if w <= h:  # torchvision's Resize(int): the long edge truncated, as int()
        new_w, new_h = short, int(short * h / w)
    else:
        new_w, new_h = int(short * w / h), short
    return any(
        edge > crop and round((edge - crop) / 2) != (edge - crop) // 2
        for edge, crop in ((new_h, crop_h), (new_w, crop_w))
    )


@dataclass(frozen=True)
class PreprocessReport:
    """How closely a folder's image processor reproduces timm's eval transform."""

    images: int
    backend: str
    max_abs_diff: float
    per_image: tuple[float, ...]
    crop_offset_images: tuple[int, ...]
    mismatched_fields: dict
    atol: float

    @property
    def matches(self) -> bool:
        """Same processor settings as timm's, and every image within `atol` (images cropped a
        pixel apart by transformers' crop rounding, `crop_offset_images`, are not counted)."""
        counted = [d for i, d in enumerate(self.per_image) if i not in self.crop_offset_images]
        return not self.mismatched_fields and all(d <= self.atol for d in counted)

    def summary(self) -> str:
        verdict = "PASS" if self.matches else "FAIL"
        text = (
            f"preprocessing {verdict}: {self.backend} backend vs timm on {self.images} images, "
            f"max |diff| {self.max_abs_diff:.3g} (atol {self.atol:g})"
        )
        if self.crop_offset_images:
            text += (
                f"; images {list(self.crop_offset_images)} cropped one pixel apart "
                "(transformers floors the crop offset, timm rounds half to even)"
            )
        if self.mismatched_fields:
            fields = ", ".join(
                f"{k}={v['folder']!r} (timm: {v['timm']!r})"
                for k, v in sorted(self.mismatched_fields.items())
            )
            text += f"; differs from timm's data config: {fields}"
        return text


def compare_preprocessing(
    folder: str | os.PathLike,
    timm_model: nn.Module,
    images: Sequence[Image.Image],
    *,
    backend: str = "pil",
    atol: float | None = None,
) -> PreprocessReport:
    """Run the folder's image processor and timm's eval transform on `images` and compare.

    Each image is first converted to RGB as timm's loader does (`img.convert("RGB")`). The
    processor's settings are also compared with the ones timm's data config implies.

    Args:
        folder: a folder with `preprocessor_config.json` (loaded with `AutoImageProcessor`).
        timm_model: the timm model; its data config is `deit_port.parity.data_config`.
        images: PIL images, any mode and size.
        backend: the transformers backend to load: `pil` (exact) or `torchvision` (what
            `AutoImageProcessor` and `pipeline` pick in transformers 5.x).
        atol: largest |diff| of normalized pixels that matches (default `tolerances.PIL_ATOL` or
            `tolerances.TORCHVISION_ATOL`).

    Returns:
        A `PreprocessReport`; nothing is raised on a mismatch, callers decide.

    Example:
        >>> compare_preprocessing("out/", timm_model, [synthetic_image(0)]).matches
        True
    """
    from timm.data import create_transform

    if backend not in PIXEL_ATOL:
        raise BadInputError(f"backend must be one of {sorted(PIXEL_ATOL)}, not {backend!r}")
    atol = PIXEL_ATOL[backend] if atol is None else atol
    config = data_config(timm_model)
    transform = create_transform(**config)
    processor = load_image_processor(folder, backend)

    per_image, offset_images = [], []
    for i, image in enumerate(images):
        rgb = image.convert("RGB")
        expected = transform(rgb)
        actual = torch.as_tensor(processor(rgb, return_tensors="pt")["pixel_values"][0])
        if actual.shape != expected.shape:
            per_image.append(float("inf"))
        else:
            per_image.append(float((actual.float() - expected).abs().max()))
        if crop_offset_differs(rgb.size, config):
            offset_images.append(i)

    return PreprocessReport(
        images=len(per_image),
        backend=backend,
        max_abs_diff=max(per_image, default=0.0),
        per_image=tuple(per_image),
        crop_offset_images=tuple(offset_images),
        mismatched_fields=_mismatched_fields(processor.to_dict(), processor_kwargs(config)),
        atol=atol,
    )


def load_image_processor(folder: str | os.PathLike, backend: str = "pil"):
    """`AutoImageProcessor.from_pretrained(folder)` with the given backend, in transformers
    5.x (`backend=`) and 4.x (the slow class is PIL; `use_fast=True` for torchvision)."""
    from transformers import AutoImageProcessor

    if transformers_major() >= 5:
        return AutoImageProcessor.from_pretrained(folder, backend=backend)
    if backend == "pil":
        return AutoImageProcessor.from_pretrained(folder)
    return AutoImageProcessor.from_pretrained(folder, use_fast=True)


def _processor_class(backend: str):
    import transformers

    names = {
        5: {"pil": "BitImageProcessorPil", "torchvision": "BitImageProcessor"},
        4: {"pil": "BitImageProcessor", "torchvision": "BitImageProcessorFast"},
    }[min(transformers_major(), 5)]
    if backend not in names:
        raise BadInputError(f"backend must be one of {sorted(names)}, not {backend!r}")
    return getattr(transformers, names[backend])


def _mismatched_fields(actual: dict, expected: dict) -> dict:
    """The pixel-deciding processor fields that differ, as {field: {"folder", "timm"}}."""
    out = {}
    for key in _FIELDS:
        a, e = _plain(actual.get(key)), _plain(expected[key])
        same = (
            math.isclose(a, e, rel_tol=1e-9)
            if isinstance(a, float) and isinstance(e, float)
            else a == e
        )
        if not same:
            out[key] = {"folder": a, "timm": e}
    return out


def _plain(value):
    """JSON-like value, None-valued dict entries dropped (SizeDict), tuples as lists."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return int(value)
    return value
