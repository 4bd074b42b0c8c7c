"""`deit-port verify`, the model card, and progress on the terminal."""

import fcntl
import importlib.metadata
import json
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
from pathlib import Path

import huggingface_hub
import pytest
import torch
import yaml
from safetensors.torch import save_file
from transformers import AutoModelForImageClassification

from deit_port import cli
from deit_port.convert import convert_deit_checkpoint, verify_hf_folder
from deit_port.parity import parity_inputs

from .util import (
    TINY,
    TINY_DISTILLED,
    cli_error_line,
    model_output,
    nothing_written,
    one_error_line,
    random_timm_model,
)

SEED = 5
RANDOM = ["--init", "random", "--seed", str(SEED)]
SUMMARY = re.compile(r"max \|diff\| ([^\s,]+), mean \|diff\| ([^\s,]+).*\(atol ([^\s)]+)\)")


@pytest.fixture(scope="module")
def timm_model():
    return random_timm_model(TINY, seed=SEED)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("verify") / "hf"
    convert_deit_checkpoint(TINY, out, init="random", seed=SEED)
    return out


@pytest.fixture(scope="module")
def half_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("verify16") / "hf16"
    convert_deit_checkpoint(TINY, out, init="random", seed=SEED, dtype="float16")
    return out


# --- verify --------------------------------------------------------------------------------


def test_verify_passes_on_the_same_weights(folder, capsys):
    assert cli.main(["verify", str(folder), TINY, *RANDOM, "-q"]) == 0
    out = capsys.readouterr().out
    assert "parity PASS" in out and "top-1 agreement 100%" in out


def test_verify_fails_on_other_weights(folder, capsys):
    with nothing_written(folder):
        assert cli.main(["verify", str(folder), TINY, "--init", "random", "--seed", "6", "-q"]) == 1
    captured = capsys.readouterr()
    assert "parity FAIL" in captured.out
    assert "does not compute what timm's" in one_error_line(captured.err)


def test_verify_against_a_checkpoint(folder, timm_model, tmp_path, capsys):
    ckpt = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in timm_model.state_dict().items()}, ckpt)
    assert cli.main(["verify", str(folder), TINY, "--checkpoint", str(ckpt), "-q"]) == 0
    assert "parity PASS" in capsys.readouterr().out


@pytest.mark.parametrize("what", ["missing", "no-config", "other-architecture"])
def test_verify_bad_input_exits_2(folder, tmp_path, capsys, what):
    args = [str(tmp_path / "nothing-here"), TINY, *RANDOM]
    if what == "no-config":
        (tmp_path / "empty").mkdir()
        args[0] = str(tmp_path / "empty")
    elif what == "other-architecture":
        args = [str(folder), TINY_DISTILLED, *RANDOM]
    line = cli_error_line(["verify", *args, "-q"], capsys, unchanged=Path(args[0]))
    if what == "other-architecture":
        assert "does not match the architecture" in line
    else:
        assert "no config.json" in line


def test_verify_a_half_precision_folder_with_its_tolerance(half_folder, timm_model, capsys):
    assert cli.main(["verify", str(half_folder), TINY, *RANDOM, "-q"]) == 0
    mx, _, atol = (float(v) for v in SUMMARY.search(capsys.readouterr().out).groups())
    hf = AutoModelForImageClassification.from_pretrained(half_folder, dtype=torch.float32)
    x = parity_inputs(timm_model)
    measured = (model_output(hf, x) - model_output(timm_model, x)).abs().max().item()
    assert measured > 1e-3, "float16 rounding should exceed the float32 tolerance here"
    assert mx == pytest.approx(measured, rel=1e-2) and measured <= atol
    # with the float32 tolerance the same folder fails: the dtype tolerance is what passed it
    assert not verify_hf_folder(half_folder, TINY, init="random", seed=SEED, atol=1e-3).passed


# --- the model card ------------------------------------------------------------------------


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_model_card_metadata(folder):
    card = huggingface_hub.ModelCard.load(folder / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "image-classification"
    assert {"timm", "deit"} <= set(card.data.tags)
    meta = _front_matter((folder / "README.md").read_text())
    assert "license" in meta and meta["license"] is None, "the license is the publisher's to set"


def test_model_card_parity_report(half_folder, timm_model):
    text = (half_folder / "README.md").read_text()
    rows = dict(re.findall(r"^\| ([a-z0-9 -]+) \| (.+) \|$", text, re.MULTILINE))
    hf = AutoModelForImageClassification.from_pretrained(half_folder, dtype=torch.float32)
    x = parity_inputs(timm_model)
    a, b = model_output(timm_model, x), model_output(hf, x)
    diff = (a - b).abs()
    assert float(rows["max abs diff"]) == pytest.approx(diff.max().item(), rel=1e-2)
    assert float(rows["mean abs diff"]) == pytest.approx(diff.mean().item(), rel=1e-2)
    top1 = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    assert rows["top-1 agreement"] == f"{top1:.0%}"
    assert re.fullmatch(
        r"max abs diff <= \S+ \(float16 weights, loaded as float32\)", rows["tolerance"]
    )
    assert rows["result"] == "PASS"
    assert "4 inputs" in text and "synthetic" in text and "N(0, 1)" in text
    for lib in ("torch", "timm", "transformers"):
        assert f"{lib} {importlib.metadata.version(lib)}" in text  # as pip installed it
    assert "weights dtype: float16" in text


def test_model_card_names_the_ema_weights(timm_model, tmp_path):
    ckpt = tmp_path / "checkpoint.pth"
    sd = timm_model.state_dict()
    torch.save({"model": sd, "model_ema": sd, "epoch": 1}, ckpt)
    out = tmp_path / "out"
    assert cli.main(["-q", "convert", TINY, str(out), "--checkpoint", str(ckpt), "--ema"]) == 0
    assert (
        "weights: entry 'model_ema' (EMA) of checkpoint.pth (torch zip)"
        in (out / "README.md").read_text()
    )


def test_model_card_without_verification_says_so(tmp_path):
    out = tmp_path / "out"
    assert cli.main(["-q", "convert", TINY, str(out), *RANDOM, "--no-verify"]) == 0
    text = (out / "README.md").read_text()
    assert "Not checked" in text and "| max abs diff |" not in text


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


def test_written_config_is_a_transformers_config(folder):
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["ViTForImageClassification"]
    assert (config["image_size"], config["patch_size"], config["layer_norm_eps"]) == (224, 16, 1e-6)
    assert config["id2label"]["0"].startswith("tench")
