"""What a conversion is asked besides the model and its weights: what the folder is written
with (`FolderOptions`) and how it is checked against timm (`CheckOptions`); and the loose
keywords of the calls before these values (`OPTION_KEYWORDS`, folded in by `fold_options`).
A new tolerance goes in `tolerances`, not here."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from .source import WEIGHT_KEYWORDS, WeightSource, weight_source
from .tolerances import DEFAULT_ATOL, DTYPE_ATOL

__all__ = [
    "OPTION_KEYWORDS",
    "VERIFY_KEYWORDS",
    "CheckOptions",
    "FolderOptions",
    "fold_options",
]


@dataclass(frozen=True)
class FolderOptions:
    """What `convert_deit_checkpoint` writes, besides the weights' values.

    Attributes:
        labels: class names (default: ImageNet-1k for 1000 classes).
        dtype: `float32`, `float16` or `bfloat16`: the written weights. For the other two the
            conversion is checked in float32 first, then the written folder at `DTYPE_ATOL`.
        head: for a distilled model, `teacher` (default): both heads, averaged, as timm's eval
            forward (`DeiTForImageClassificationWithTeacher`, for inference); or `cls`: the
            class-token head only (`DeiTForImageClassification`, which transformers trains
            with `labels`), checked against `model.head(model.forward_features(x)[:, 0])`.
            A model without distillation head has only the class-token head: `cls` changes
            nothing there and `teacher` is an error, as is either without a classifier.
        max_shard_size: safetensors shard size; past one shard, an index.
    """

    labels: Sequence[str] | None = None
    dtype: str = "float32"
    head: str | None = None
    max_shard_size: int | str = "5GB"


@dataclass(frozen=True)
class CheckOptions:
    """How a folder is checked against timm.

    Attributes:
        verify: run the parity check (`convert_deit_checkpoint` returns None without it).
        atol: the parity contract (default: `DTYPE_ATOL` of the written dtype).
        images: more images for the parity batch (any mode; added to the synthetic one). The
            written `preprocessor_config.json` is also checked against timm's transform on them.
        layers: compare every stage too (`check_parity(..., layers=True)`): the report's
            `table()` and, on failure, `first_divergence` say where the models part.
    """

    verify: bool = True
    atol: float | None = None
    images: Sequence[Image.Image] = ()
    layers: bool = False

    def atol_for(self, dtype: str) -> float:
        """The parity bound for weights written in `dtype`: `atol`, else `DTYPE_ATOL[dtype]`."""
        return DTYPE_ATOL.get(dtype, DEFAULT_ATOL) if self.atol is None else self.atol


# The keyword arguments of the calls before `FolderOptions` and `CheckOptions`, still accepted.
OPTION_KEYWORDS = (
    *WEIGHT_KEYWORDS,
    *(f.name for f in dataclasses.fields(FolderOptions)),
    *(f.name for f in dataclasses.fields(CheckOptions)),
)


# The loose keywords `verify_hf_folder` takes: the weights' and the check's bound and inputs.
VERIFY_KEYWORDS = (*WEIGHT_KEYWORDS, "atol", "images", "layers")


def fold_options(
    weights: WeightSource | None,
    written: FolderOptions | None,
    check: CheckOptions | None,
    loose: dict[str, Any],
    keywords: tuple[str, ...] = OPTION_KEYWORDS,
) -> tuple[WeightSource, FolderOptions, CheckOptions]:
    """The three values (defaults where None) with the loose keywords applied to each.

    Raises:
        TypeError: a keyword that is not one of `keywords` (default `OPTION_KEYWORDS`).

    Example:
        >>> fold_options(None, None, None, {"init": "random", "dtype": "float16"})[1].dtype
        'float16'
    """
    unknown = sorted(set(loose) - set(keywords))
    if unknown:
        raise TypeError(f"unexpected keyword argument {unknown[0]!r}")
    if loose.get("images", ()) is None:
        loose["images"] = ()

    def of(value, cls):
        names = {f.name for f in dataclasses.fields(cls)}
        return dataclasses.replace(value or cls(), **{k: loose[k] for k in names & set(loose)})

    weights = weight_source(weights, **{k: loose[k] for k in WEIGHT_KEYWORDS if k in loose})
    return weights, of(written, FolderOptions), of(check, CheckOptions)
