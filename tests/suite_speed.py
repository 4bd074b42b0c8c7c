"""pytest plugin (loaded by conftest.py): how the suite runs fast, not what it checks.

Under pytest-xdist each worker gets its share of the cores for torch, and `-n N` steals work
instead of handing out fixed chunks; the queue is grouped by variant (tests/variants.py) with
the longest case first; what collecting made is frozen out of the garbage collector's reach.
Imported before torch in each worker: the thread count is set at import.
"""

import gc
import os

import pytest


def _share_the_cores() -> int | None:
    """Under pytest-xdist, give each worker its share of the cores for torch's intra-op threads.

    Left alone, every worker (and every `deit-port` subprocess a test starts) runs as many
    threads as the machine has cores, so `-n auto` on 2 cores runs 4 busy threads on 2 cores,
    and torch's OpenMP threads spin waiting for each other (docs/measurements.md, "Threads
    under xdist"). Set before torch is imported (OMP_NUM_THREADS, inherited by subprocesses);
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
    """Put what importing and collecting made (torch, timm, transformers: some 450 000 objects
    that live as long as the process) out of the cyclic garbage collector's reach: a full
    collection then scans only what the tests made, 0.4 s less each (pytest runs two at the
    end of the session, Python its own while tests run). Nothing made by a test is frozen."""
    gc.freeze()
