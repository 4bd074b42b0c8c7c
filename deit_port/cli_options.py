"""What each command of the command line accepts (`declare_*`), the options they share, and the
values those make: where the weights come from
(`WeightSource`), what a folder is written with (`FolderOptions`), how it is checked
(`CheckOptions`). Each value is built here once, from the parsed arguments."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: `deit-port --help` does not load torch's stack
    from .pipeline import CheckOptions, FolderOptions
    from .source import WeightSource

__all__ = [
    "add_layers_option",
    "add_onnx_folder_options",
    "add_output_options",
    "add_source_options",
    "check_options",
    "declare_convert",
    "declare_export_onnx",
    "declare_list",
    "declare_to_timm",
    "declare_verify",
    "export_onnx_positionals",
    "folder_options",
    "weight_source_of",
]


def weight_source_of(args: argparse.Namespace) -> WeightSource:
    """The `WeightSource` of `convert`, `verify`, `export-onnx` (`add_source_options`)."""
    from .source import WeightSource

    model_kwargs = {}
    if args.num_classes is not None:
        model_kwargs["num_classes"] = args.num_classes
    if args.img_size is not None:
        model_kwargs["img_size"] = args.img_size
    return WeightSource(args.init, args.seed, args.checkpoint, args.ema, model_kwargs)


def folder_options(args: argparse.Namespace, labels) -> FolderOptions:
    """The `FolderOptions` of `convert` (`add_output_options`), with the labels read."""
    from .pipeline import FolderOptions

    return FolderOptions(labels, args.dtype, args.head, args.max_shard_size)


def check_options(args: argparse.Namespace, images=None) -> CheckOptions:
    """The `CheckOptions` of `convert` and `verify` (`--no-verify`, `--layers`, `--image`)."""
    from .pipeline import CheckOptions

    return CheckOptions(
        verify=not getattr(args, "no_verify", False), images=images or (), layers=args.layers
    )


def add_onnx_folder_options(p: argparse.ArgumentParser) -> None:
    """`export-onnx HF_DIR` (no OUT.onnx): the int8 file and its check."""
    p.add_argument(
        "--no-quantize",
        action="store_true",
        help="HF_DIR/onnx/: write model.onnx only, not the int8 model_quantized.onnx "
        "(transformers.js's default in the browser; load with dtype 'fp32' then)",
    )
    p.add_argument(
        "--image",
        action="append",
        metavar="PATH_OR_URL",
        help="HF_DIR/onnx/: add your own image to the batch the int8 model is checked on; "
        "repeatable",
    )
    p.add_argument(
        "--min-q8-agreement",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="HF_DIR/onnx/: refuse (exit 1, nothing written) an int8 model whose top-1 "
        "agreement with the float32 one is below FRACTION, e.g. 0.98 (default: report only)",
    )


def add_source_options(p: argparse.ArgumentParser) -> None:
    """Where the timm model's weights come from: `--checkpoint`, `--init`, `--ema`, ..."""
    from .source import INITS

    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="weights from this file: .safetensors or torch.save (.pth/.pt/.bin), format read "
        "from its bytes; pickles only with weights_only=True",
    )
    source.add_argument(
        "--init",
        choices=INITS,
        default=INITS[0],
        help="pretrained: timm's weights (default); random: seeded random weights, offline",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for --init random")
    ema = p.add_mutually_exclusive_group()
    ema.add_argument(
        "--ema",
        dest="ema",
        action="store_true",
        default=None,
        help="use the checkpoint's EMA weights (state_dict_ema / model_ema)",
    )
    ema.add_argument(
        "--no-ema",
        dest="ema",
        action="store_false",
        help="use the checkpoint's plain weights (model / state_dict)",
    )
    p.add_argument("--num-classes", type=int, help="classifier size (timm num_classes)")
    p.add_argument("--img-size", type=int, help="input resolution (timm img_size)")


def add_layers_option(p) -> None:
    """`--layers`: compare every stage and print the per-stage table."""
    p.add_argument(
        "--layers",
        action="store_true",
        help="compare every stage (embeddings, each block, final norm, pooled tokens, logits), "
        "print the table and name the first stage past the tolerance",
    )


def add_output_options(p: argparse.ArgumentParser) -> None:
    """What is written: `--labels`, `--dtype`, `--head`, `--max-shard-size`."""
    from .arch import HEADS
    from .hf_folder import DTYPES

    p.add_argument(
        "--labels",
        metavar="FILE",
        help="class names: a JSON list or {index: name}, or one name a line (default: "
        "ImageNet-1k for 1000 classes)",
    )
    p.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="float32",
        help="dtype of the written weights (default float32)",
    )
    p.add_argument(
        "--head",
        choices=HEADS,
        help="distilled models: teacher (default) keeps both heads, averaged "
        "(DeiTForImageClassificationWithTeacher, inference only); cls keeps the class-token "
        "head (DeiTForImageClassification, trainable with labels)",
    )
    p.add_argument(
        "--max-shard-size",
        default="5GB",
        help="safetensors shard size, e.g. 5GB or 500MB; larger models get an index",
    )


def declare_convert(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        help="timm model name, e.g. deit_tiny_patch16_224; `auto` with --checkpoint: the DeiT "
        "its tensors fit",
    )
    p.add_argument("output_dir", help="folder to write (absent or empty, or --overwrite)")
    add_source_options(p)
    add_output_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    check = p.add_mutually_exclusive_group()
    check.add_argument("--no-verify", action="store_true", help="skip the parity check")
    add_layers_option(check)
    p.add_argument(
        "--image",
        action="append",
        metavar="PATH_OR_URL",
        help="add your own image (file or http(s) URL) to the parity batch; repeatable",
    )


def declare_verify(p: argparse.ArgumentParser) -> None:
    p.add_argument("hf_dir", help="the transformers folder (ours or one from the hub)")
    p.add_argument("model", help="timm model name, e.g. deit_tiny_patch16_224")
    add_source_options(p)
    add_layers_option(p)


def declare_to_timm(p: argparse.ArgumentParser) -> None:
    p.add_argument("hf_dir", help="the transformers folder (config.json + safetensors)")
    p.add_argument("output_file", help="the .safetensors file to write (absent, or --overwrite)")
    p.add_argument(
        "--model",
        metavar="NAME",
        help="timm name to write for, e.g. deit3_small_patch16_224 (default: found from the config)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def declare_export_onnx(p: argparse.ArgumentParser) -> None:
    p.add_argument("hf_dir", help="the transformers folder (ours or one from the hub)")
    p.add_argument(
        "output_file",
        nargs="?",
        metavar="OUT.onnx",
        help="the .onnx file to write (absent, or --overwrite; a word ending in .onnx or "
        "holding a /, else it is MODEL); without it, HF_DIR/onnx/ is written, the layout "
        "transformers.js reads (model.onnx, model_quantized.onnx)",
    )
    p.add_argument(
        "model",
        nargs="?",
        metavar="MODEL",
        help="the timm model name the folder came from: the ONNX file is compared with it too",
    )
    add_source_options(p)
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing output file or HF_DIR/onnx"
    )
    add_onnx_folder_options(p)
    p.add_argument(
        "--external-data",
        action="store_true",
        help="write the weights beside the graph whatever their size (done past 2 GB anyway); "
        "in HF_DIR/onnx/ as model.onnx_data, recorded in config.json for transformers.js",
    )
    p.set_defaults(prepare=export_onnx_positionals)


def declare_list(p: argparse.ArgumentParser) -> None:
    shown = p.add_mutually_exclusive_group()
    shown.add_argument(
        "--all", action="store_true", help="every timm ViT-family name it converts, with its class"
    )
    shown.add_argument(
        "--refused", action="store_true", help="why each other vit_*/deit* name is refused"
    )


def export_onnx_positionals(args: argparse.Namespace) -> None:
    """`export-onnx HF_DIR [OUT.onnx] [MODEL]`: a lone second word is OUT.onnx when it ends in
    `.onnx` or names a path (a `/` in it), else MODEL (timm names have neither)."""
    word = args.output_file
    looks_like_a_file = word is not None and (
        word.endswith(".onnx") or "/" in word or os.sep in word
    )
    if word is not None and args.model is None and not looks_like_a_file:
        args.output_file, args.model = None, word
    if args.output_file is None:
        args.output_dir = os.path.join(args.hf_dir, "onnx")  # what `_run` names as not written
