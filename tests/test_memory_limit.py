"""Memory checked before the work, under a real limit (issue 27): `prlimit --as` on a real
`deit-port` process, not a patched function.

RLIMIT_AS counts address space, and importing torch, timm and transformers maps a lot of it;
so each limit is a measured baseline (the `VmSize` of a process that imported what the
command has imported when it checks) plus `_ROOM`, less than the model needs."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deit_port.convert import convert_deit_checkpoint

from .util import need_module, nothing_written, one_error_line

_ROOM = 384 * 1024**2  # what the limit leaves above the baseline
# a verified conversion of DeiT III large needs some 1.7 GiB: far above _ROOM
_BIG = "deit3_large_patch16_224"
_NEEDS = re.compile(
    r"needs about (\d+\.\d) GiB of memory for (.+?), (\d+\.\d) GiB available \(the "
    r"address-space limit \(ulimit -v\)\)"
)
_BASELINE = """
import resource, sys
import torch, timm, transformers
from deit_port import cli, pipeline
from deit_port.registry import build_on_meta
build_on_meta("deit_tiny_patch16_224")
if sys.argv[1] == "onnx":
    from deit_port.onnx_export import require_onnx
    require_onnx()
status = open("/proc/self/status").read()
print(int(re.search(r"VmSize:\\s+(\\d+) kB", status).group(1)) * 1024)
""".replace("import resource, sys", "import re, resource, sys")


@functools.cache
def _baseline(kind: str) -> int:
    """VmSize, bytes, of a process that imported what `deit-port` has when it checks memory."""
    r = subprocess.run(
        [sys.executable, "-c", _BASELINE, kind], capture_output=True, text=True, check=False
    )
    assert r.returncode == 0, r.stderr
    return int(r.stdout)


def _deit_port_limited(limit: int, *argv: str) -> subprocess.CompletedProcess:
    if shutil.which("prlimit") is None:
        pytest.skip("prlimit (util-linux) not found")
    return subprocess.run(
        ["prlimit", f"--as={limit}", sys.executable, "-m", "deit_port.cli", *argv],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def _figures(line: str) -> tuple[float, str, float]:
    found = _NEEDS.search(line)
    assert found, f"no 'needs about X GiB ..., Y GiB available': {line!r}"
    need, what, have = found.groups()
    return float(need), what, float(have)


def test_convert_under_a_too_low_limit_is_refused_before_loading(tmp_path):
    limit = _baseline("convert") + _ROOM
    out = tmp_path / "out"
    with nothing_written(tmp_path):
        r = _deit_port_limited(limit, "convert", _BIG, str(out), "--init", "random")
    assert r.returncode == 2, r.stderr
    line = one_error_line(r.stderr)
    need, what, have = _figures(line)
    assert what == "a verified conversion" and need > have, line
    assert have <= _ROOM / 1024**3 + 0.1, f"more available than the limit leaves: {line}"
    no_verify = re.search(r"; --no-verify needs about (\d+\.\d) GiB", line)
    assert no_verify and float(no_verify.group(1)) < need, line


@pytest.mark.slow
def test_export_onnx_under_a_too_low_limit_is_refused_before_loading(converted_variant):
    need_module("onnxruntime")
    # the suite's DeiT base folder: 346 MB of weights, an export needs some 1.2 GiB
    folder = converted_variant("deit_base_patch16_224").folder
    limit = _baseline("onnx") + _ROOM
    with nothing_written(folder):
        r = _deit_port_limited(limit, "export-onnx", str(folder))
    assert r.returncode == 2, r.stderr
    need, what, have = _figures(one_error_line(r.stderr))
    assert what == "an ONNX export" and need > have, r.stderr


@pytest.mark.slow
def test_an_allocation_that_fails_anyway_is_one_line(tmp_path):
    """`verify` checks no memory first: a 98304 px DeiT tiny (a 30 GB position embedding)
    under the limit fails in torch's allocator, and that is one line, exit 2, not a bug."""
    folder = tmp_path / "hf"
    convert_deit_checkpoint("deit_tiny_patch16_224", folder, init="random", verify=False)
    limit = _baseline("convert") + _ROOM
    with nothing_written(tmp_path):
        r = _deit_port_limited(
            limit,
            "verify",
            str(folder),
            "deit_tiny_patch16_224",
            "--init",
            "random",
            "--img-size",
            "98304",
        )
    assert r.returncode == 2, r.stderr
    line = one_error_line(r.stderr)
    assert line.startswith("deit-port: error: ran out of memory ("), line
    assert Path(folder).is_dir()
