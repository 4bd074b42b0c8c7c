"""The `deit-port` command line. Exit codes: 0 ok, 1 parity failure, 2 bad input or usage."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

EXIT_OK, EXIT_PARITY, EXIT_BAD_INPUT = 0, 1, 2

logger = logging.getLogger("deit_port")


def _error(message: str) -> None:
    print(f"deit-port: error: {message}", file=sys.stderr)


def run_convert(model: str, output_dir: str, **kwargs) -> int:
    """Convert and report; map every failure to a one-line message and an exit code."""
    from .convert import (
        KeyMismatchError,
        OutputError,
        ParityError,
        WeightsUnavailableError,
        convert_deit_checkpoint,
    )

    try:
        report = convert_deit_checkpoint(model, output_dir, **kwargs)
    except ParityError as e:
        _error(f"{e}; nothing was written to {output_dir}")
        return EXIT_PARITY
    except (OutputError, WeightsUnavailableError, KeyMismatchError, ValueError, TypeError, OSError) as e:
        _error(str(e).splitlines()[0] if str(e) else type(e).__name__)
        return EXIT_BAD_INPUT
    print(f"wrote {output_dir}")
    if report is not None:
        print(report.summary())
    return EXIT_OK


def _cmd_convert(args: argparse.Namespace) -> int:
    model_kwargs = {}
    if args.num_classes is not None:
        model_kwargs["num_classes"] = args.num_classes
    if args.img_size is not None:
        model_kwargs["img_size"] = args.img_size
    return run_convert(
        args.model,
        args.output_dir,
        init=args.init,
        seed=args.seed,
        model_kwargs=model_kwargs,
        overwrite=args.overwrite,
        verify=not args.no_verify,
        max_shard_size=args.max_shard_size,
    )


def _cmd_list(args: argparse.Namespace) -> int:
    from .source import supported_models

    print("\n".join(supported_models()))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deit-port",
        description="Convert timm DeiT models to Hugging Face transformers, parity checked.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors on stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a timm model into a transformers folder")
    p.add_argument("model", help="timm model name, e.g. deit_tiny_patch16_224")
    p.add_argument("output_dir", help="folder to write (absent or empty, or --overwrite)")
    p.add_argument(
        "--init", choices=["pretrained", "random"], default="pretrained",
        help="pretrained: timm's weights (default); random: seeded random weights, offline",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for --init random")
    p.add_argument("--num-classes", type=int, help="classifier size (timm num_classes)")
    p.add_argument("--img-size", type=int, help="input resolution (timm img_size)")
    p.add_argument("--max-shard-size", default="5GB", help="safetensors shard size")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--no-verify", action="store_true", help="skip the parity check")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("list", help="list the supported timm model names")
    p.set_defaults(func=_cmd_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.ERROR if args.quiet else logging.INFO,
        format="deit-port: %(message)s",
    )
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
