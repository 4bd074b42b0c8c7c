"""The `deit-port` command line. Exit codes: 0 ok, 1 parity failure, 2 bad input or usage."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Callable, Iterator, Sequence

EXIT_OK, EXIT_PARITY, EXIT_BAD_INPUT = 0, 1, 2

logger = logging.getLogger("deit_port")


def _error(message: str) -> None:
    print(f"deit-port: error: {message}", file=sys.stderr)


STEPS = ("loading", "timm outputs", "converting", "writing", "verifying", "model card")


@contextlib.contextmanager
def _progress(quiet: bool) -> Iterator[Callable[[str], None] | None]:
    """A tqdm bar over the long steps when stderr is a terminal and not `-q`; else nothing.

    Without the bar, transformers' and huggingface_hub's own progress bars are off too, and
    with `-q` their warnings."""
    import huggingface_hub.utils
    import transformers

    show = not quiet and sys.stderr.isatty()
    if not show:
        transformers.utils.logging.disable_progress_bar()
        huggingface_hub.utils.disable_progress_bars()
    if quiet:
        transformers.utils.logging.set_verbosity_error()
    if not show:
        yield None
        return
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    # log lines are printed above the bar (tqdm.write), not through it
    with logging_redirect_tqdm(), tqdm(
        total=len(STEPS), file=sys.stderr, leave=False, unit="step"
    ) as bar:

        def step(name: str) -> None:
            bar.n = STEPS.index(name) if name in STEPS else bar.n
            bar.set_description_str(f"deit-port: {name}")

        yield step
        bar.n = len(STEPS)
        bar.refresh()


def run_convert(
    model: str, output_dir: str, *, labels_file: str | None = None, quiet: bool = False, **kwargs
) -> int:
    """Convert and report; map every failure to a one-line message and an exit code."""
    from .convert import (
        KeyMismatchError,
        OutputError,
        ParityError,
        PreprocessingError,
        WeightsUnavailableError,
        convert_deit_checkpoint,
        read_labels,
    )

    try:
        if labels_file is not None:
            kwargs["labels"] = read_labels(labels_file)
        with _progress(quiet) as progress:
            report = convert_deit_checkpoint(model, output_dir, progress=progress, **kwargs)
    except (ParityError, PreprocessingError) as e:
        _error(f"{e}; nothing was written to {output_dir}")
        return EXIT_PARITY
    except (OutputError, WeightsUnavailableError, KeyMismatchError, ValueError, TypeError, OSError) as e:
        _error(str(e).splitlines()[0] if str(e) else type(e).__name__)
        return EXIT_BAD_INPUT
    print(f"wrote {output_dir}")
    if report is not None:
        print(report.summary())
    return EXIT_OK


def run_verify(hf_dir: str, model: str, *, quiet: bool = False, **kwargs) -> int:
    """Check a folder against timm and print the report: exit 0 match, 1 mismatch, 2 bad input."""
    from .convert import (
        KeyMismatchError,
        OutputError,
        WeightsUnavailableError,
        verify_hf_folder,
    )

    try:
        with _progress(quiet) as progress:
            report = verify_hf_folder(hf_dir, model, progress=progress, **kwargs)
    except (OutputError, WeightsUnavailableError, KeyMismatchError, ValueError, TypeError, OSError) as e:
        _error(str(e).splitlines()[0] if str(e) else type(e).__name__)
        return EXIT_BAD_INPUT
    print(report.summary())
    if not report.passed:
        _error(f"{hf_dir} does not compute what timm's {model} computes")
        return EXIT_PARITY
    return EXIT_OK


def _source_kwargs(args: argparse.Namespace) -> dict:
    """The timm-model keywords shared by `convert` and `verify`."""
    model_kwargs = {}
    if args.num_classes is not None:
        model_kwargs["num_classes"] = args.num_classes
    if args.img_size is not None:
        model_kwargs["img_size"] = args.img_size
    return {
        "init": args.init,
        "seed": args.seed,
        "model_kwargs": model_kwargs,
        "checkpoint": args.checkpoint,
        "ema": args.ema,
    }


def _cmd_verify(args: argparse.Namespace) -> int:
    return run_verify(args.hf_dir, args.model, quiet=args.quiet, **_source_kwargs(args))


def _cmd_to_timm(args: argparse.Namespace) -> int:
    """Write a transformers folder as a timm checkpoint: exit 0 ok, 1 parity, 2 bad input."""
    from .convert import KeyMismatchError, OutputError, ParityError
    from .reverse import convert_hf_folder

    try:
        with _progress(args.quiet):
            result = convert_hf_folder(
                args.hf_dir, args.output_file, args.model, overwrite=args.overwrite
            )
    except ParityError as e:
        _error(f"{e}; nothing was written to {args.output_file}")
        return EXIT_PARITY
    except (OutputError, KeyMismatchError, ValueError, TypeError, OSError) as e:
        _error(str(e).splitlines()[0] if str(e) else type(e).__name__)
        return EXIT_BAD_INPUT
    print(f"wrote {result.output} (timm {result.target.name})")
    print(result.report.summary())
    print(f"load with: {result.target.load_hint(result.output)}")
    return EXIT_OK


def add_source_options(p: argparse.ArgumentParser) -> None:
    """Where the timm model's weights come from: `--checkpoint`, `--init`, `--ema`, ..."""
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--checkpoint", metavar="PATH",
        help="weights from this file: .safetensors or torch.save (.pth/.pt/.bin), format read "
        "from its bytes; pickles only with weights_only=True",
    )
    source.add_argument(
        "--init", choices=["pretrained", "random"], default="pretrained",
        help="pretrained: timm's weights (default); random: seeded random weights, offline",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for --init random")
    ema = p.add_mutually_exclusive_group()
    ema.add_argument(
        "--ema", dest="ema", action="store_true", default=None,
        help="use the checkpoint's EMA weights (state_dict_ema / model_ema)",
    )
    ema.add_argument(
        "--no-ema", dest="ema", action="store_false",
        help="use the checkpoint's plain weights (model / state_dict)",
    )
    p.add_argument("--num-classes", type=int, help="classifier size (timm num_classes)")
    p.add_argument("--img-size", type=int, help="input resolution (timm img_size)")


def add_output_options(p: argparse.ArgumentParser) -> None:
    """What is written: `--labels`, `--dtype`, `--max-shard-size`."""
    p.add_argument(
        "--labels", metavar="FILE",
        help="class names: a JSON list or {index: name}, or one name a line (default: "
        "ImageNet-1k for 1000 classes)",
    )
    p.add_argument(
        "--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
        help="dtype of the written weights (default float32)",
    )
    p.add_argument(
        "--head", choices=["teacher", "cls"],
        help="distilled models: teacher (default) keeps both heads, averaged "
        "(DeiTForImageClassificationWithTeacher, inference only); cls keeps the class-token "
        "head (DeiTForImageClassification, trainable with labels)",
    )
    p.add_argument(
        "--max-shard-size", default="5GB",
        help="safetensors shard size, e.g. 5GB or 500MB; larger models get an index",
    )


def _cmd_convert(args: argparse.Namespace) -> int:
    from .images import ImageLoadError, load_images

    try:
        images = load_images(args.image) if args.image else None
    except ImageLoadError as e:
        _error(str(e))
        return EXIT_BAD_INPUT
    return run_convert(
        args.model,
        args.output_dir,
        **_source_kwargs(args),
        labels_file=args.labels,
        dtype=args.dtype,
        quiet=args.quiet,
        overwrite=args.overwrite,
        verify=not args.no_verify,
        max_shard_size=args.max_shard_size,
        head=args.head,
        images=images,
    )


def _cmd_list(args: argparse.Namespace) -> int:
    from .source import supported_models

    print("\n".join(supported_models()))
    return EXIT_OK


def _version_line() -> str:
    from .versions import library_versions

    return " ".join(f"{k} {v}" for k, v in library_versions().items())


def _cmd_doctor(args: argparse.Namespace) -> int:
    from .versions import weights_lookup

    print(_version_line())
    print(f"pretrained weights: {weights_lookup()}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deit-port",
        description="Convert timm DeiT models to Hugging Face transformers, parity checked.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors on stderr")
    parser.add_argument(
        "--version", action="version", version=_version_line(), help="print versions and exit"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    # -q after the subcommand too; SUPPRESS keeps `deit-port -q convert ...` quiet
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
        help="only errors on stderr (no progress, no log)",
    )

    p = sub.add_parser(
        "convert", parents=[common], help="convert a timm model into a transformers folder"
    )
    p.add_argument("model", help="timm model name, e.g. deit_tiny_patch16_224")
    p.add_argument("output_dir", help="folder to write (absent or empty, or --overwrite)")
    add_source_options(p)
    add_output_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--no-verify", action="store_true", help="skip the parity check")
    p.add_argument(
        "--image", action="append", metavar="PATH_OR_URL",
        help="add your own image (file or http(s) URL) to the parity batch; repeatable",
    )
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser(
        "verify", parents=[common],
        help="check an existing transformers folder against timm and print the parity report",
    )
    p.add_argument("hf_dir", help="the transformers folder (ours or one from the hub)")
    p.add_argument("model", help="timm model name, e.g. deit_tiny_patch16_224")
    add_source_options(p)
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser(
        "to-timm", parents=[common],
        help="convert a transformers ViT/DeiT folder back into a timm safetensors checkpoint",
    )
    p.add_argument("hf_dir", help="the transformers folder (config.json + safetensors)")
    p.add_argument("output_file", help="the .safetensors file to write (absent, or --overwrite)")
    p.add_argument(
        "--model", metavar="NAME",
        help="timm name to write for, e.g. deit3_small_patch16_224 (default: found from the config)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=_cmd_to_timm)

    p = sub.add_parser("doctor", help="print library versions and where weights are looked up")
    p.set_defaults(func=_cmd_doctor)

    p = sub.add_parser("list", help="list the supported timm model names")
    p.set_defaults(func=_cmd_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.quiet)
    return args.func(args)


def configure_logging(quiet: bool) -> None:
    """Our steps at INFO; the libraries' own chatter (file names, load reports) only from
    WARNING up; with `-q`, errors only."""
    logging.basicConfig(
        level=logging.ERROR if quiet else logging.WARNING, format="deit-port: %(message)s"
    )
    logger.setLevel(logging.ERROR if quiet else logging.INFO)


if __name__ == "__main__":
    raise SystemExit(main())
