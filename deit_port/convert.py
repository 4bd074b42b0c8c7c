"""Convert timm DeiT models to transformers: the importable API.

The pieces live in their own modules (`arch`, `mapping`, `hf_config`, `io`, `parity`,
`source`); this module puts them together and re-exports them:

    >>> from deit_port.convert import ArchSpec, timm_to_hf, convert_timm_model
    >>> hf_model = convert_timm_model(timm.create_model("deit_tiny_patch16_224"))

Run as `python -m deit_port.convert --deit_name NAME --pytorch_dump_folder_path DIR`, the
interface of transformers' `convert_deit_timm_to_pytorch.py`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from torch import nn

from .arch import ArchSpec
from .hf_config import build_config, hf_model_class, imagenet_labels
from .io import OutputError, atomic_folder, load_hf_folder, load_hf_state_dict, save_hf_folder
from .mapping import (
    KeyMismatchError,
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
from .parity import DEFAULT_ATOL, ParityReport, check_parity, parity_inputs
from .source import WeightsUnavailableError, create_timm_model, randomize_, resolve_model_name

__all__ = [
    "ArchSpec",
    "KeyMismatchError",
    "OutputError",
    "ParityError",
    "ParityReport",
    "WeightsUnavailableError",
    "build_config",
    "check_parity",
    "convert_deit_checkpoint",
    "convert_timm_model",
    "create_rename_keys",
    "create_timm_model",
    "hf_model_class",
    "hf_to_timm",
    "imagenet_labels",
    "merge_qkv",
    "qkv_pairs",
    "randomize_",
    "read_in_q_k_v",
    "rename_key",
    "rename_pairs",
    "resolve_model_name",
    "split_qkv",
    "timm_to_hf",
]

logger = logging.getLogger(__name__)


class ParityError(RuntimeError):
    """The converted model does not compute what the timm model computes."""

    def __init__(self, report: ParityReport) -> None:
        self.report = report
        super().__init__(report.summary())


def convert_timm_model(model: nn.Module, labels: Sequence[str] | None = None) -> nn.Module:
    """Convert a timm DeiT model to the equivalent transformers model, in memory.

    Args:
        model: a timm `VisionTransformer` / `VisionTransformerDistilled`.
        labels: class names (default: ImageNet-1k for 1000 classes).

    Returns:
        The transformers model (`hf_model_class(spec)`), in eval mode.

    Example:
        >>> hf = convert_timm_model(timm.create_model("deit_tiny_patch16_224"))
    """
    spec = ArchSpec.from_timm(model)
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
    atol: float = DEFAULT_ATOL,
) -> ParityReport | None:
    """Convert the timm model `deit_name` and write a transformers folder, parity checked.

    The folder is built beside `pytorch_dump_folder_path` and moved into place only after the
    written folder, loaded back with `from_pretrained`, matched the timm model.

    Args:
        deit_name: a timm DeiT name (tags and legacy `vit_deit_*` names accepted).
        pytorch_dump_folder_path: the output folder; must be absent or empty unless `overwrite`.
        init: `pretrained` (timm's weights) or `random` (seeded, see `randomize_`).
        seed: seed for `random`.
        model_kwargs: passed to `timm.create_model` (e.g. `num_classes`, `img_size`).
        labels: class names.
        max_shard_size: safetensors shard size.
        overwrite: replace an existing folder.
        verify: run the parity check (else return None).
        atol: the parity contract.

    Returns:
        The `ParityReport` (None without `verify`).

    Raises:
        ParityError: the check failed; nothing was written.
        OutputError, WeightsUnavailableError, ValueError: bad input; nothing was written.
    """
    timm_model = create_timm_model(deit_name, init=init, seed=seed, **(model_kwargs or {}))
    spec = ArchSpec.from_timm(timm_model)
    state_dict = timm_to_hf(timm_model.state_dict(), spec)
    config = build_config(spec, labels)
    report = None
    with atomic_folder(pytorch_dump_folder_path, overwrite=overwrite) as tmp:
        logger.info("writing %s", pytorch_dump_folder_path)
        save_hf_folder(tmp, state_dict, config, max_shard_size=max_shard_size)
        if verify:
            logger.info("verifying parity")
            hf_model = load_hf_folder(tmp, spec)
            report = check_parity(timm_model, hf_model, parity_inputs(timm_model), atol=atol)
            logger.info(report.summary())
            if not report.passed:
                raise ParityError(report)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m deit_port.convert`: the interface of transformers' conversion script."""
    import argparse

    from .cli import run_convert

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deit_name", required=True, help="timm model name")
    parser.add_argument("--pytorch_dump_folder_path", required=True, help="output folder")
    parser.add_argument("--init", choices=["pretrained", "random"], default="pretrained")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    return run_convert(
        args.deit_name, args.pytorch_dump_folder_path,
        init=args.init, seed=args.seed, overwrite=args.overwrite,
    )


if __name__ == "__main__":
    raise SystemExit(main())
