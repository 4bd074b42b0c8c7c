"""Progress on the terminal: the tqdm bar, none when quiet or not a terminal, step times logged."""

import fcntl
import logging
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading
import time

import pytest

from deit_port import cli
from deit_port.convert import convert_deit_checkpoint

from .util import TINY, random_init_args

SEED = 5
RANDOM = random_init_args(SEED)


# --- progress ------------------------------------------------------------------------------


def test_progress_bar_on_a_terminal(tmp_path):
    """stderr on a pseudo-terminal: a tqdm bar names the steps."""
    master, slave = pty.openpty()
    # a terminal of 100 columns (a fresh pty has 0, where tqdm draws an empty bar)
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    chunks = []

    def read():
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    proc = subprocess.run(
        [sys.executable, "-m", "deit_port.cli", "convert", TINY, str(tmp_path / "out"), *RANDOM],
        stdout=subprocess.PIPE,
        stderr=slave,
        timeout=600,
        check=False,
    )
    os.close(slave)
    reader.join(timeout=10)
    os.close(master)
    shown = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, shown
    for step in ("loading", "writing", "verifying"):  # tqdm's "{desc}: {percentage}%|{bar}|"
        assert re.search(rf"\rdeit-port: {step}: +\d+%\|", shown), shown
    assert "parity PASS" in proc.stdout.decode()


@pytest.mark.parametrize("quiet", [True, False], ids=["-q on a terminal", "not a terminal"])
def test_no_progress_bar_when_quiet_or_not_a_terminal(tmp_path, capsys, monkeypatch, quiet):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: quiet)  # a terminal only with -q
    argv = ["convert", TINY, str(tmp_path / "out"), *RANDOM] + (["-q"] if quiet else [])
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "%|" not in err and "step/s" not in err
    if quiet:
        assert err == ""


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no-verify"])
def test_step_times_are_logged(tmp_path, caplog, verify):
    """One INFO line names every step that ran, in order, with times that fit in the call."""
    caplog.set_level(logging.INFO, logger="deit_port")
    start = time.perf_counter()
    convert_deit_checkpoint(TINY, tmp_path / "out", init="random", seed=SEED, verify=verify)
    wall = time.perf_counter() - start
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("time per step: ")]
    assert len(lines) == 1, lines
    steps = re.findall(r"([a-z][a-z ]*) (\d+\.\d\d) s", lines[0].removeprefix("time per step: "))
    names = ["loading", "timm outputs", "converting", "writing", "verifying", "model card"]
    if not verify:
        names = [n for n in names if n not in ("timm outputs", "verifying")]
    assert [name for name, _ in steps] == names, lines[0]
    assert 0 < sum(float(t) for _, t in steps) <= wall + 0.005 * len(steps)  # printed rounded
