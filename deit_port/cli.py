"""The `deit-port` command line: a table of commands (`COMMANDS`), each its arguments and
its handler; `main` runs one and turns every error into one line and its exit code (the codes:
README.md, "Exit codes"). Every error deit_port raises on purpose is a `DeitPortError` that
carries its exit code, and `_run` is the one place that turns it into a line and a code.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import NamedTuple

from .cli_options import (
    add_output_options,
    add_source_options,
    check_options,
    declare_convert,
    declare_export_onnx,
    declare_list,
    declare_to_timm,
    declare_verify,
    folder_options,
    weight_source_of,
)
from .errors import EXIT_BUG, EXIT_OK, EXIT_PARITY, DeitPortError, ParityFailure, first_line
from .progress import progress_bar
from .signals import interrupt_on_signals

__all__ = [
    "COMMANDS",
    "Command",
    "build_parser",
    "configure_logging",
    "main",
    "seed_main",
    "seed_parser",
]

logger = logging.getLogger("deit_port")


def _error(message: str) -> None:
    print(f"deit-port: error: {message}", file=sys.stderr)


def _print_table(report) -> None:
    """The per-stage table of a `--layers` report, or export-onnx's checks (else nothing)."""
    table = report.table() if hasattr(report, "table") else ""
    if table:
        print(table)


def _report_written(written, report) -> int:
    """What a writing command prints on success: where, the checks' table, the summary."""
    print(f"wrote {written}")
    _print_table(report)
    if report is not None:
        print(report.summary())
    return EXIT_OK


def _cmd_convert(args: argparse.Namespace) -> int:
    from .images import load_images
    from .labels import read_labels
    from .pipeline import STEPS, convert_deit_checkpoint

    images = load_images(args.image) if args.image else None
    labels = read_labels(args.labels) if args.labels is not None else None
    with progress_bar(args.quiet, STEPS) as progress:
        report = convert_deit_checkpoint(
            args.model,
            args.output_dir,
            weight_source_of(args),
            written=folder_options(args, labels),
            check=check_options(args, images),
            overwrite=args.overwrite,
            progress=progress,
        )
    return _report_written(args.output_dir, report)


def _cmd_verify(args: argparse.Namespace) -> int:
    """Check a folder against timm and print the report: exit 0 match, 1 mismatch."""
    from .pipeline import verify_hf_folder

    with progress_bar(args.quiet, ("loading", "verifying")) as progress:
        report = verify_hf_folder(
            args.hf_dir,
            args.model,
            weight_source_of(args),
            check=check_options(args),
            progress=progress,
        )
    _print_table(report)
    print(report.summary())
    if not report.passed:
        first = report.first_divergence
        where = "" if first is None else f" (first divergence: {first.stage})"
        _error(f"{args.hf_dir} does not compute what timm's {args.model} computes{where}")
        return EXIT_PARITY
    return EXIT_OK


def _cmd_to_timm(args: argparse.Namespace) -> int:
    """Write a transformers folder as a timm checkpoint: exit 0 ok, 1 parity, 2 bad input."""
    from .reverse import STEPS, convert_hf_folder

    with progress_bar(args.quiet, STEPS) as progress:
        result = convert_hf_folder(
            args.hf_dir, args.output_file, args.model, overwrite=args.overwrite, progress=progress
        )
    print(f"wrote {result.output} (timm {result.target.name})")
    print(result.report.summary())
    print(f"load with: {result.target.load_hint(result.output)}")
    return EXIT_OK


def _cmd_export_onnx(args: argparse.Namespace) -> int:
    """Export a folder to ONNX, checked with onnxruntime: exit 0 ok, 1 parity, 2 bad input."""
    from .errors import BadInputError
    from .onnx_export import export_onnx

    if args.output_file is None:
        return _cmd_export_onnx_folder(args)
    if args.no_quantize or args.image or args.min_q8_agreement:
        raise BadInputError(
            "--no-quantize, --image and --min-q8-agreement are for HF_DIR/onnx/ (give no "
            "OUT.onnx); an OUT.onnx is the float32 file alone"
        )
    with progress_bar(args.quiet):
        report = export_onnx(
            args.hf_dir,
            args.output_file,
            args.model,
            weight_source_of(args),
            overwrite=args.overwrite,
            external_data=args.external_data or None,
        )
    return _report_written(report.output, report)


def _cmd_export_onnx_folder(args: argparse.Namespace) -> int:
    """`export-onnx HF_DIR [MODEL]`: HF_DIR/onnx/ as transformers.js reads it."""
    from .images import load_images
    from .onnx_folder import Int8Check, export_onnx_folder

    images = tuple(load_images(args.image)) if args.image else ()
    with progress_bar(args.quiet):
        report = export_onnx_folder(
            args.hf_dir,
            args.model,
            weight_source_of(args),
            quantize=not args.no_quantize and Int8Check(images, args.min_q8_agreement),
            overwrite=args.overwrite,
            external_data=args.external_data or None,
        )
    return _report_written(report.folder, report)


def _cmd_list(args: argparse.Namespace) -> int:
    from .registry import supported_models

    if args.all or args.refused:  # the whole family, walked on the meta device
        from .family import print_family

        print_family(refused=args.refused)
        return EXIT_OK
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


class Command(NamedTuple):
    """A subcommand: its name, its one-line help, what it accepts, what it does."""

    name: str
    help: str
    declare: Callable[[argparse.ArgumentParser], None] | None
    run: Callable[[argparse.Namespace], int]


COMMANDS = (
    Command("convert", "convert a timm model into a transformers folder", declare_convert,
            _cmd_convert),
    Command("verify", "check an existing transformers folder against timm and print the parity "
            "report", declare_verify, _cmd_verify),
    Command("to-timm", "convert a transformers ViT/DeiT folder back into a timm safetensors "
            "checkpoint", declare_to_timm, _cmd_to_timm),
    Command("export-onnx", "export a transformers folder to ONNX (dynamic batch), checked with "
            "onnxruntime against transformers and, given MODEL, timm; needs the onnx extra",
            declare_export_onnx, _cmd_export_onnx),
    Command("doctor", "print library versions and where weights are looked up", None,
            _cmd_doctor),
    Command("list", "list the timm DeiT names (--all: every timm ViT it converts)",
            declare_list, _cmd_list),
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The `deit-port` parser: a subparser for each of `COMMANDS`."""
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
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="only errors on stderr (no progress, no log)",
    )
    for command in COMMANDS:
        parents = [common] if command.declare is not None else []
        p = sub.add_parser(command.name, parents=parents, help=command.help)
        if command.declare is not None:
            command.declare(p)
        p.set_defaults(func=command.run)
    return parser


def seed_parser() -> argparse.ArgumentParser:
    """`python -m deit_port.convert`: the options of transformers' `convert_deit_timm_to_pytorch.py`
    (`--deit_name`, `--pytorch_dump_folder_path`) and the same source and output options as
    `deit-port convert`."""
    parser = argparse.ArgumentParser(
        prog="python -m deit_port.convert",
        description="Convert a timm DeiT model to transformers (the interface of transformers' "
        "convert_deit_timm_to_pytorch.py), parity checked.",
    )
    parser.add_argument("--deit_name", dest="model", required=True, help="timm model name")
    parser.add_argument(
        "--pytorch_dump_folder_path", dest="output_dir", required=True, help="output folder"
    )
    add_source_options(parser)
    add_output_options(parser)
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty output folder"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors on stderr")
    parser.set_defaults(func=_cmd_convert, no_verify=False, image=None, layers=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`deit-port`: run a command; every error becomes one line and its exit code."""
    return _run(build_parser().parse_args(argv))


def seed_main(argv: Sequence[str] | None = None) -> int:
    """`python -m deit_port.convert --deit_name ... --pytorch_dump_folder_path ...`."""
    return _run(seed_parser().parse_args(argv))


def _run(args: argparse.Namespace) -> int:
    """The one place where errors become exit codes: a `DeitPortError` is one line on stderr
    and its `exit_code`; SIGINT or SIGTERM one line and 128 + the signal's number (130, 143);
    anything else is a bug in deit-port: its traceback, then `EXIT_BUG`."""
    configure_logging(args.quiet)
    if getattr(args, "prepare", None) is not None:  # arguments that argparse cannot tell apart
        args.prepare(args)
    written = getattr(args, "output_dir", None) or getattr(args, "output_file", None)
    before = _identity(written)
    restore_signals = interrupt_on_signals()
    try:
        return args.func(args)
    except KeyboardInterrupt as e:
        return _interrupted(e, written, before)
    except ParityFailure as e:
        _print_table(e.report)
        _error(f"{first_line(e)}; nothing was written to {written}" if written else first_line(e))
        return e.exit_code
    except DeitPortError as e:
        _error(first_line(e))
        return e.exit_code
    except Exception as e:  # noqa: BLE001 -- not raised on purpose: a bug, reported as one
        from .headroom import memory_error

        short = memory_error(e)  # an allocation failed: memory, not a bug
        if short is not None:
            _error(first_line(short))
            return short.exit_code
        traceback.print_exc()
        _error(
            "internal error (a bug in deit-port, not in your input): please report it with "
            "the traceback above"
        )
        return EXIT_BUG
    finally:  # after the error is reported: a second signal meanwhile is ignored
        restore_signals()


def _interrupted(e: KeyboardInterrupt, written: str | None, before) -> int:
    """Report an interruption in one line; exit 128 + the signal's number (the shell's code
    for a command a signal ended)."""
    signum = getattr(e, "signum", signal.SIGINT)
    if written is None:
        what = ""
    elif _identity(written) not in (None, before):  # published just before the signal
        what = f" after {written} was written"
    else:
        what = f"; nothing was written to {written}"
    _error(f"interrupted ({signal.Signals(signum).name}){what}")
    return 128 + signum


def _identity(path: str | None) -> tuple[int, int] | None:
    """(device, inode) of what is at `path`, or None: tells a newly published output apart."""
    try:
        st = os.lstat(path) if path else None
    except OSError:
        return None
    return None if st is None else (st.st_dev, st.st_ino)


def configure_logging(quiet: bool) -> None:
    """Our steps at INFO; the libraries' own chatter (file names, load reports) only from
    WARNING up; with `-q`, errors only."""
    logging.basicConfig(
        level=logging.ERROR if quiet else logging.WARNING, format="deit-port: %(message)s"
    )
    logger.setLevel(logging.ERROR if quiet else logging.INFO)


if __name__ == "__main__":
    raise SystemExit(main())
