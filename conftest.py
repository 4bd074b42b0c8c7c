"""Test-suite set-up: the pytest `--runslow` recipe, hypothesis profiles, the shared
per-variant models (`converted_variant`, tests/variants.py)."""

import gc
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "dev", max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "ci",
    max_examples=60,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def _share_the_cores() -> int | None:
    """Under pytest-xdist, give each worker its share of the cores for torch's intra-op threads.

    Left alone, every worker (and every `deit-port` subprocess a test starts) runs as many
    threads as the machine has cores, so `-n auto` on 2 cores runs 4 busy threads on 2 cores,
    and torch's OpenMP threads spin waiting for each other: measured here, `pytest -k tiny -n 2`
    took 90 s that way and 27 s with one thread a worker, and a training step ran ~20x slower.
    Set before torch is imported (OMP_NUM_THREADS, inherited by subprocesses); a value the user
    set is kept."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers <= 1 or "OMP_NUM_THREADS" in os.environ:
        return None
    threads = max(1, (os.cpu_count() or 1) // workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    return threads


_WORKER_THREADS = _share_the_cores()


def pytest_configure(config):
    if _WORKER_THREADS is not None:  # in case a plugin imported torch before this file
        import torch

        torch.set_num_threads(_WORKER_THREADS)
    _steal_work(config)


def _steal_work(config) -> None:
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


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run slow tests")
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


# Files whose cases each take minutes (a real training run): they run first.
_RUN_FIRST = ("test_real_training.py",)


@pytest.hookimpl(trylast=True)  # after pytest's own reordering by fixture
def pytest_collection_modifyitems(config, items):
    from tests.variants import group_by_variant

    group_by_variant(items)
    # the longest single case first: started last, it would be one worker's tail alone
    items.sort(key=lambda item: item.path.name not in _RUN_FIRST)  # stable
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


def pytest_collection_finish(session):
    """Put what importing and collecting made (torch, timm, transformers: some 450 000 objects
    that live as long as the process) out of the cyclic garbage collector's reach: a full
    collection then scans only what the tests made, 0.4 s less each (pytest runs two at the
    end of the session, Python its own while tests run). Nothing made by a test is frozen."""
    gc.freeze()


@pytest.fixture(scope="session")
def converted_variant(tmp_path_factory):
    """`get(name) -> tests.variants.Converted`: each timm DeiT variant as a seeded random model,
    converted once per session (across xdist workers) and loaded once per worker; the API is
    in tests/variants.py's docstring."""
    from tests.variants import session_root, variant_store

    return variant_store(session_root(tmp_path_factory))


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """`get() -> tests.digits.DigitsRun`: examples/train_convert_pipeline.py's training run on
    scikit-learn's digits, done once per session (across xdist workers) and shared by
    tests/test_real_training.py and tests/test_browser.py; the API is in tests/digits.py."""
    from tests.digits import digits_store
    from tests.variants import session_root

    return digits_store(session_root(tmp_path_factory).parent / "digits")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Print the measured parity per case (recorded by the tests with record_property), and
    with `--parity-table PATH` write it as the markdown table docs/parity-variants.md is."""
    rows, mutations, measured = [], [], []
    for report in terminalreporter.stats.get("passed", []):
        props = dict(report.user_properties)
        if report.when != "call":
            continue
        if "max_abs_diff" in props:
            rows.append((props["variant"], props["max_abs_diff"], props["mean_abs_diff"]))
        if "mutation_max_abs_diff" in props:
            mutations.append((props["mutation"], props["mutation_max_abs_diff"]))
        # other measurements: a test records ("measured", [(what, variant, value in words), ...])
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
