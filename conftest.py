"""Test-suite set-up: the pytest `--runslow` recipe, hypothesis profiles, the shared
per-variant models (`converted_variant`, tests/variants.py)."""

import gc
import os

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


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run slow tests")


@pytest.hookimpl(trylast=True)  # after pytest's own reordering by fixture
def pytest_collection_modifyitems(config, items):
    from tests.variants import group_by_variant

    group_by_variant(items)
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


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Print the measured parity per variant (recorded by the tests with record_property)."""
    rows = []
    for report in terminalreporter.stats.get("passed", []):
        props = dict(report.user_properties)
        if report.when == "call" and "max_abs_diff" in props:
            rows.append((props["variant"], props["max_abs_diff"], props["mean_abs_diff"]))
    if rows:
        terminalreporter.section("measured parity (max / mean |diff| of logits)")
        for variant, mx, mean in sorted(rows):
            terminalreporter.write_line(f"{variant:40s} {mx:.3g} {mean:.3g}")
