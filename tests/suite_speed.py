"""pytest plugin (loaded by conftest.py): how the suite runs fast, not what it checks, and
what each test file costs (`--time-table PATH`).

Under pytest-xdist each worker gets its share of the cores for torch, and `-n N` steals work
instead of handing out fixed chunks; the queue is grouped by variant (tests/variants.py) with
the longest case first; what collecting made is frozen out of the garbage collector's reach.
Imported before torch in each worker: the thread count is set at import.
"""

import ast
import gc
import os
import sys
from collections import defaultdict
from pathlib import Path

import pytest


def _share_the_cores() -> int | None:
    """Under pytest-xdist, give each worker its share of the cores for torch's intra-op threads.

    Left alone, every worker (and every `deit-port` subprocess a test starts) runs as many
    threads as the machine has cores, so `-n auto` on 2 cores runs 4 busy threads on 2 cores,
    and torch's OpenMP threads spin waiting for each other (docs/measurements.md, "Test-suite
    time"). Set before torch is imported (OMP_NUM_THREADS, inherited by subprocesses);
    a value the user set is kept."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers <= 1 or "OMP_NUM_THREADS" in os.environ:
        return None
    threads = max(1, (os.cpu_count() or 1) // workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    return threads


_WORKER_THREADS = _share_the_cores()


def pytest_configure(config: pytest.Config) -> None:
    if _WORKER_THREADS is not None:  # in case a plugin imported torch before this file
        import torch

        torch.set_num_threads(_WORKER_THREADS)
    _steal_work(config)


def _steal_work(config: pytest.Config) -> None:
    """`-n N` without `--dist`: xdist's `worksteal` instead of its default `load`.

    `load` hands each worker chunks of the queue that it must finish itself, so a worker can
    end minutes after the other when a long test is in its last chunk; `worksteal` splits the
    queue in two and lets an idle worker take half of what the other has not started. An
    explicit `--dist` is kept. (Set here, not in pytest.ini's addopts: `-p no:xdist` runs would
    not know the option.)"""
    if config.getoption("dist", "no") != "load":
        return
    given = config.invocation_params.args
    if any(a == "--dist" or a.startswith(("--dist=", "-d")) for a in given):
        return
    config.option.dist = "worksteal"


# Files whose cases each take minutes (a real training run): they run first.
_RUN_FIRST = ("test_real_training.py",)


@pytest.hookimpl(trylast=True)  # after pytest's own reordering by fixture
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from tests.variants import group_by_variant

    group_by_variant(items)
    # the longest single case first: started last, it would be one worker's tail alone
    items.sort(key=lambda item: item.path.name not in _RUN_FIRST)  # stable


def pytest_collection_finish(session: pytest.Session) -> None:
    """Put what importing and collecting made (torch, timm, transformers: objects that live as
    long as the process) out of the cyclic garbage collector's reach: a full collection (pytest
    runs two at the end of the session, Python its own while tests run) then scans only what
    the tests made. Nothing made by a test is frozen."""
    gc.freeze()


# --- what each file costs -------------------------------------------------------------------

_BEGIN, _END = "<!-- time-table -->", "<!-- /time-table -->"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--time-table",
        metavar="PATH",
        help="write, per test file, its cases and the sum of their durations (set-up, call, "
        "tear-down) as a markdown table into PATH, between the lines "
        f"{_BEGIN} and {_END} if PATH has them (docs/measurements.md is written this way)",
    )


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    path = config.getoption("--time-table")
    if not path:
        return
    seconds: dict[str, float] = defaultdict(float)
    outcomes: dict[str, dict[str, str]] = defaultdict(dict)
    for reports in terminalreporter.stats.values():
        for report in reports:
            nodeid = getattr(report, "nodeid", "")
            if not nodeid.startswith("tests/") or not hasattr(report, "duration"):
                continue
            file = nodeid.split("::")[0]
            seconds[file] += report.duration
            if report.when == "call" or report.outcome != "passed":
                outcomes[file][nodeid] = report.outcome
    rows = []
    for file in sorted(seconds, key=lambda f: -seconds[f]):
        counts = defaultdict(int)
        for outcome in outcomes[file].values():
            counts[outcome] += 1
        cases = ", ".join(f"{n} {o}" for o, n in sorted(counts.items()))
        rows.append(f"| {file} | {cases} | {seconds[file]:.0f} | {_first_line(file)} |")
    total = sum(seconds.values())
    args = " ".join(config.invocation_params.args)
    table = "\n".join(
        [
            "```sh",
            f"HYPOTHESIS_PROFILE=ci python -m pytest {args}",
            "```",
            "",
            (
                f"Python {sys.version.split()[0]}, {os.cpu_count()} cores; seconds: the sum of "
                f"each case's set-up, call and tear-down durations, {total:.0f} s in all."
            ),
            "",
            "| file | cases | seconds | what it proves (its docstring's first sentence) |",
            "|---|---|---|---|",
            *rows,
        ]
    )
    target = Path(path)
    text = target.read_text() if target.is_file() else ""
    if _BEGIN in text and _END in text:
        head, rest = text.split(_BEGIN, 1)
        text = f"{head}{_BEGIN}\n{table}\n{_END}{rest.split(_END, 1)[1]}"
    else:
        text = f"{_BEGIN}\n{table}\n{_END}\n"
    target.write_text(text)
    terminalreporter.write_line(f"time table written to {path}")


def _first_line(file: str) -> str:
    """The first sentence of a test file's module docstring, as a table cell."""
    doc = ast.get_docstring(ast.parse(Path(file).read_text())) or ""
    sentence = doc.split("\n\n")[0].replace("\n", " ").split(". ")[0].rstrip(".")
    return sentence.replace("|", "\\|") + "."
