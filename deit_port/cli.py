"""The `deit-port` command line.

Exit codes (`deit_port.errors`): 0 ok; 1 parity failure (the converted model or its
preprocessing differs from timm; nothing written); 2 bad input or usage (one line on stderr;
nothing written); 3 a bug in deit-port itself (its traceback is printed; please report it);
130 / 143 interrupted by SIGINT (Ctrl-C) / SIGTERM (one line; nothing written).
Every error deit_port raises on purpose is a `DeitPortError` that carries its exit code, and
`main` is the one place that turns it into a line and a code.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence

from .errors import EXIT_BUG, EXIT_OK, EXIT_PARITY, DeitPortError, ParityFailure, first_line

logger = logging.getLogger("deit_port")


def _error(message: str) -> None:
    print(f"deit-port: error: {message}", file=sys.stderr)


@contextlib.contextmanager
def _progress(quiet: bool, steps: Sequence[str] = ()) -> Iterator[Callable[[str], None] | None]:
    """A tqdm bar over the long `steps` when stderr is a terminal and not `-q`; else nothing.

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
    with (
        logging_redirect_tqdm(),
        tqdm(total=len(steps), file=sys.stderr, leave=False, unit="step") as bar,
    ):

        def step(name: str) -> None:
            bar.n = steps.index(name) if name in steps else bar.n
            bar.set_description_str(f"deit-port: {name}")

        yield step
        bar.n = len(steps)
        bar.refresh()


def _cmd_convert(args: argparse.Namespace) -> int:
    from .images import load_images
    from .labels import read_labels
    from .pipeline import STEPS, convert_deit_checkpoint

    images = load_images(args.image) if args.image else None
    labels = read_labels(args.labels) if args.labels is not None else None
    with _progress(args.quiet, STEPS) as progress:
        report = convert_deit_checkpoint(
            args.model,
            args.output_dir,
            **_source_kwargs(args),
            labels=labels,
            dtype=args.dtype,
            overwrite=args.overwrite,
            verify=not args.no_verify,
            max_shard_size=args.max_shard_size,
            images=images,
            progress=progress,
            layers=args.layers,
            head=args.head,
        )
    print(f"wrote {args.output_dir}")
    if report is not None:
        _print_table(report)
        print(report.summary())
    return EXIT_OK


def _print_table(report) -> None:
    """The per-stage table of a `--layers` report, or export-onnx's checks (else nothing)."""
    table = report.table() if hasattr(report, "table") else ""
    if table:
        print(table)


def _cmd_verify(args: argparse.Namespace) -> int:
    """Check a folder against timm and print the report: exit 0 match, 1 mismatch."""
    from .pipeline import verify_hf_folder

    with _progress(args.quiet, ("loading", "verifying")) as progress:
        report = verify_hf_folder(
            args.hf_dir, args.model, progress=progress, layers=args.layers, **_source_kwargs(args)
        )
    _print_table(report)
    print(report.summary())
    if not report.passed:
        first = report.first_divergence
        where = "" if first is None else f" (first divergence: {first.stage})"
        _error(f"{args.hf_dir} does not compute what timm's {args.model} computes{where}")
        return EXIT_PARITY
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
    with _progress(args.quiet):
        report = export_onnx(
            args.hf_dir,
            args.output_file,
            args.model,
            overwrite=args.overwrite,
            **_source_kwargs(args),
        )
    return _report_written(report.output, report)


def _report_written(written, report) -> int:
    """What a writing command prints on success: where, the checks' table, the summary."""
    print(f"wrote {written}")
    _print_table(report)
    print(report.summary())
    return EXIT_OK


def _export_onnx_positionals(args: argparse.Namespace) -> None:
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


def _cmd_export_onnx_folder(args: argparse.Namespace) -> int:
    """`export-onnx HF_DIR [MODEL]`: HF_DIR/onnx/ as transformers.js reads it."""
    from .images import load_images
    from .onnx_folder import export_onnx_folder

    images = load_images(args.image) if args.image else None
    kwargs = _source_kwargs(args)
    with _progress(args.quiet):
        report = export_onnx_folder(
            args.hf_dir,
            args.model,
            quantize=not args.no_quantize,
            images=images,
            min_top1=args.min_q8_agreement,
            overwrite=args.overwrite,
            **kwargs,
        )
    return _report_written(report.folder, report)


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


def _source_kwargs(args: argparse.Namespace) -> dict:
    """The timm-model keywords (`source.timm_source`) of `convert`, `verify`, `export-onnx`."""
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


def _cmd_to_timm(args: argparse.Namespace) -> int:
    """Write a transformers folder as a timm checkpoint: exit 0 ok, 1 parity, 2 bad input."""
    from .reverse import STEPS, convert_hf_folder

    with _progress(args.quiet, STEPS) as progress:
        result = convert_hf_folder(
            args.hf_dir, args.output_file, args.model, overwrite=args.overwrite, progress=progress
        )
    print(f"wrote {result.output} (timm {result.target.name})")
    print(result.report.summary())
    print(f"load with: {result.target.load_hint(result.output)}")
    return EXIT_OK


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


def _cmd_list(args: argparse.Namespace) -> int:
    from .registry import supported_models

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
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="only errors on stderr (no progress, no log)",
    )
    _add_convert(sub, common)
    _add_verify(sub, common)
    _add_to_timm(sub, common)
    _add_export_onnx(sub, common)
    p = sub.add_parser("doctor", help="print library versions and where weights are looked up")
    p.set_defaults(func=_cmd_doctor)
    p = sub.add_parser("list", help="list the supported timm model names")
    p.set_defaults(func=_cmd_list)
    return parser


def _add_convert(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "convert", parents=[common], help="convert a timm model into a transformers folder"
    )
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
    p.set_defaults(func=_cmd_convert)


def _add_verify(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "verify",
        parents=[common],
        help="check an existing transformers folder against timm and print the parity report",
    )
    p.add_argument("hf_dir", help="the transformers folder (ours or one from the hub)")
    p.add_argument("model", help="timm model name, e.g. deit_tiny_patch16_224")
    add_source_options(p)
    add_layers_option(p)
    p.set_defaults(func=_cmd_verify)


def _add_to_timm(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "to-timm",
        parents=[common],
        help="convert a transformers ViT/DeiT folder back into a timm safetensors checkpoint",
    )
    p.add_argument("hf_dir", help="the transformers folder (config.json + safetensors)")
    p.add_argument("output_file", help="the .safetensors file to write (absent, or --overwrite)")
    p.add_argument(
        "--model",
        metavar="NAME",
        help="timm name to write for, e.g. deit3_small_patch16_224 (default: found from the config)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=_cmd_to_timm)


def _add_export_onnx(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "export-onnx",
        parents=[common],
        help="export a transformers folder to ONNX (dynamic batch), checked with onnxruntime "
        "against transformers and, given MODEL, timm; needs the onnx extra",
    )
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
    p.set_defaults(func=_cmd_export_onnx, prepare=_export_onnx_positionals)


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
    restore_signals = _interrupt_on_signals()
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
    except Exception:  # noqa: BLE001 -- not raised on purpose: a bug, reported as one
        traceback.print_exc()
        _error(
            "internal error (a bug in deit-port, not in your input): please report it with "
            "the traceback above"
        )
        return EXIT_BUG
    finally:  # after the error is reported: a second signal meanwhile is ignored
        restore_signals()


class _Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised where the command was: the clean-up on the way out removes
    what was half written."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _interrupt_on_signals() -> Callable[[], None]:
    """Make SIGINT and SIGTERM raise `_Interrupted` (SIGTERM's default would end the process
    with its partial folder in place); the first one only: later ones are ignored, so that the
    clean-up it starts runs to its end. Returns what restores the handlers before, unless a
    signal came: the process is ending then, and a second Ctrl-C in Python's own shutdown
    would print a traceback after the one line."""
    if threading.current_thread() is not threading.main_thread():  # only it handles signals
        return lambda: None
    came = []

    def interrupt(signum, frame) -> None:
        for s in _STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        came.append(signum)
        raise _Interrupted(signum)

    previous = {s: signal.signal(s, interrupt) for s in _STOP_SIGNALS}

    def restore() -> None:
        for s, handler in previous.items():  # None: set outside Python, whose default it is
            if not came:
                signal.signal(s, signal.SIG_DFL if handler is None else handler)

    return restore


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
