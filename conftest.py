"""Test-suite set-up: the pytest `--runslow` recipe, hypothesis profiles, the shared
per-variant models (`converted_variant`, tests/variants.py). Two plugins hold the rest: how the
suite runs fast (tests/suite_speed.py) and the measured-parity table (tests/parity_table.py)."""

import os

import pytest
from hypothesis import HealthCheck, settings

# tests/suite_speed.py sets torch's threads per xdist worker, so it is imported before torch.
pytest_plugins = ["tests.suite_speed", "tests.parity_table"]

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


@pytest.fixture(scope="session")
def converted_variant(tmp_path_factory):
    """`get(name) -> tests.variants.Converted`: each timm variant of the suite as a seeded
    random model, converted once per session (across xdist workers), loaded and run once per
    worker; the API is in tests/variants.py's docstring."""
    from tests.build_once import session_root
    from tests.variants import variant_store

    return variant_store(session_root(tmp_path_factory) / "variants")


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """`get() -> tests.digits.DigitsRun`: examples/train_convert_pipeline.py's training run on
    scikit-learn's digits, done once per session (across xdist workers) and shared by
    tests/test_real_training.py and tests/test_browser.py; the API is in tests/digits.py."""
    from tests.build_once import session_root
    from tests.digits import digits_store

    return digits_store(session_root(tmp_path_factory) / "digits")
