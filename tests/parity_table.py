"""pytest plugin (loaded by conftest.py): the measured parity, printed at the end of a run and,
with `--parity-table PATH`, written as the markdown table docs/parity-variants.md is; with
`--browser-table PATH`, what tests/test_browser.py measured, written as docs/browser.md is.

The tests record what they measured with `record_property`: `variant`, `max_abs_diff` and
`mean_abs_diff` for a parity case; `mutation` and `mutation_max_abs_diff` for a mutation caught
(tests/test_mutations.py); `measured`, a list of `(what, variant, value in words)`, for
anything else.
"""

import os
from pathlib import Path

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--parity-table",
        metavar="PATH",
        help="write the measured parity of every passed case as a markdown table to PATH "
        "(docs/parity-variants.md is written this way)",
    )
    parser.addoption(
        "--browser-table",
        metavar="PATH",
        help="write what tests/test_browser.py measured (transformers.js in node and Chromium) "
        "as markdown to PATH (docs/browser.md is written this way)",
    )


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """Print the measured parity per case, and with `--parity-table PATH` write the table."""
    rows, mutations, measured = [], [], []
    for report in terminalreporter.stats.get("passed", []):
        props = dict(report.user_properties)
        if report.when != "call":
            continue
        if "max_abs_diff" in props:
            rows.append((props["variant"], props["max_abs_diff"], props["mean_abs_diff"]))
        if "mutation_max_abs_diff" in props:
            mutations.append((props["mutation"], props["mutation_max_abs_diff"]))
        measured += [tuple(row) for row in props.get("measured", ())]
    if measured:
        terminalreporter.section("measured (recorded by the tests)")
        for what, variant, value in sorted(measured):
            terminalreporter.write_line(f"{what:36s} {variant:32s} {value}")
    if config.getoption("--browser-table"):
        from tests.web import write_browser_table

        path = config.getoption("--browser-table")
        write_browser_table(Path(path), measured, config.invocation_params.args)
        terminalreporter.write_line(f"browser table written to {path}")
    if not rows:
        return
    rows.sort()
    terminalreporter.section("measured parity (max / mean |diff| of logits)")
    for variant, mx, mean in rows:
        terminalreporter.write_line(f"{variant:40s} {mx:.3g} {mean:.3g}")
    path = config.getoption("--parity-table")
    if path:
        _write_parity_table(Path(path), rows, sorted(mutations), config)
        terminalreporter.write_line(f"parity table written to {path}")


def _write_parity_table(path: Path, rows: list, mutations: list, config) -> None:
    import platform

    import timm
    import torch
    import transformers

    args = " ".join(config.invocation_params.args)
    lines = [
        "# Parity per variant, measured",
        "",
        "Written by the test run that measured it (do not edit by hand):",
        "",
        "```sh",
        f"HYPOTHESIS_PROFILE=ci pytest {args}",
        "```",
        "",
        (
            f"Device {os.environ.get('TORCH_DEVICE', 'cpu')}, float32; python "
            f"{platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}, "
            f"transformers {transformers.__version__}. Each case: seeded random weights of a "
            "realistic scale, converted, written, loaded back with `from_pretrained`, 4 inputs (a "
            "preprocessed synthetic image and 3 N(0, 1) tensors). Asserted: allclose at the "
            "contract 1e-3 and max |diff| <= 1e-4 (the other cases: the bound their test names, "
            "e.g. a written dtype's DTYPE_ATOL)."
        ),
        "",
        "| case | max abs diff | mean abs diff |",
        "|---|---|---|",
        *(f"| {variant} | {mx:.3g} | {mean:.3g} |" for variant, mx, mean in rows),
        "",
    ]
    if mutations:
        lines += [
            "## Mutations caught",
            "",
            (
                "A correct conversion with one deliberate mistake (tests/test_mutations.py); each "
                "must fail parity at 1e-4. Max |diff| of the logits:"
            ),
            "",
            "| mutation | max abs diff |",
            "|---|---|",
            *(f"| {name} | {mx:.3g} |" for name, mx in mutations),
            "",
        ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
