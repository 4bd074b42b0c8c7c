"""Test-suite set-up: the pytest `--runslow` recipe, hypothesis profiles, the torch device."""

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


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


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
    # other measurements: a test records ("measured", [(what, variant, value in words), ...])
    measured = []
    for report in terminalreporter.stats.get("passed", []):
        props = dict(report.user_properties)
        if report.when == "call" and "measured" in props:
            measured += [tuple(row) for row in props["measured"]]
    if measured:
        terminalreporter.section("measured (recorded by the tests)")
        for what, variant, value in sorted(measured):
            terminalreporter.write_line(f"{what:28s} {variant:32s} {value}")
