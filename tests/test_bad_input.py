"""Bad input: each one a one-line error, exit 2, nothing written and nothing lost.

"Nothing written or lost" is checked on the whole temp folder (`cli_error_line`'s
`unchanged=tmp_path`): every file in it (the checkpoint, an earlier output) has the same bytes
afterwards and no file or folder was added or removed.
"""

import errno
import fractions
import os
import pickle
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors.torch import save_file

from deit_port import cli

from .util import TINY, cli_error_line, dead_pid, nothing_written, random_timm_model

CONVERT = ["-q", "convert"]


@pytest.fixture(scope="module")
def tiny_sd():
    model = random_timm_model(TINY, seed=11)
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _ckpt_args(path: Path, out: Path, model: str = TINY) -> list[str]:
    """`deit-port -q convert MODEL OUT --checkpoint PATH`."""
    return [*CONVERT, model, str(out), "--checkpoint", str(path)]


# --- pickles that would run code or need other globals -------------------------------------


class _RunsCode:
    """Unpickling this calls os.system(cmd): what a malicious checkpoint does."""

    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


@pytest.mark.parametrize("how", ["torch-zip", "torch-legacy", "raw-pickle"])
def test_pickle_that_would_run_code_is_refused(tiny_sd, tmp_path, capsys, how):
    sentinel = tmp_path / "sentinel"
    payload = {"model": {"cls_token": tiny_sd["cls_token"]}, "x": _RunsCode(f"touch {sentinel}")}
    path = tmp_path / "evil.pth"
    if how == "torch-zip":
        torch.save(payload, path)
    elif how == "torch-legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:  # no tensors: a raw pickle of one would need torch.storage._load_from_bytes first
        path.write_bytes(pickle.dumps({"model": _RunsCode(f"touch {sentinel}")}, protocol=2))
    line = cli_error_line(_ckpt_args(path, tmp_path / "out"), capsys, unchanged=tmp_path)
    assert "posix.system" in line and "weights-only" in line
    assert not sentinel.exists(), "the pickle's code ran"
    # the control: loading it unsafely does run the code, so the check above means something
    if how == "raw-pickle":
        pickle.loads(path.read_bytes())
    else:
        torch.load(path, weights_only=False)
    assert sentinel.exists()


def test_pickle_needing_a_non_allowlisted_global_names_it(tiny_sd, tmp_path, capsys):
    path = tmp_path / "ckpt.pth"
    torch.save({"model": tiny_sd, "best_acc": fractions.Fraction(3, 4)}, path)
    line = cli_error_line(_ckpt_args(path, tmp_path / "out"), capsys, unchanged=tmp_path)
    assert "fractions.Fraction" in line


# --- damaged files ---------------------------------------------------------------------------


def _safetensors_bytes(sd) -> bytes:
    return safetensors.torch.save(sd)


def _damaged(kind: str, sd) -> tuple[str, bytes, str]:
    """(file name, bytes, what the error must say)."""
    st = _safetensors_bytes(sd)
    if kind == "truncated-pth":
        import io

        buf = io.BytesIO()
        torch.save(sd, buf)
        data = buf.getvalue()
        return "w.pth", data[: len(data) // 2], "truncated"
    if kind == "truncated-legacy-pth":
        import io

        buf = io.BytesIO()
        torch.save(sd, buf, _use_new_zipfile_serialization=False)
        data = buf.getvalue()
        return "w.pth", data[: len(data) // 2], "truncated"
    if kind == "truncated-safetensors":
        return "w.safetensors", st[:-1000], "truncated"
    if kind == "trailing-junk":
        return "w.safetensors", st + b"\0junk", "trailing data"
    if kind == "zero-bytes":
        return "w.safetensors", b"", "empty"
    if kind == "header-claims-too-much":
        (n,) = struct.unpack("<Q", st[:8])
        return "w.safetensors", struct.pack("<Q", n + 10**9) + st[8:], "header"
    if kind == "not-a-checkpoint":
        return "w.pth", b"<html>404 Not Found</html>", "not safetensors"
    raise AssertionError(kind)


DAMAGED = [
    "truncated-pth",
    "truncated-legacy-pth",
    "truncated-safetensors",
    "trailing-junk",
    "zero-bytes",
    "header-claims-too-much",
    "not-a-checkpoint",
]


@pytest.mark.parametrize("kind", DAMAGED)
def test_damaged_file(tiny_sd, tmp_path, capsys, kind):
    name, data, says = _damaged(kind, tiny_sd)
    path = tmp_path / name
    path.write_bytes(data)
    line = cli_error_line(_ckpt_args(path, tmp_path / "out"), capsys, unchanged=tmp_path)
    assert says in line and str(path) in line


@pytest.mark.parametrize(
    ("kind", "name"), [("truncated-pth", "w.safetensors"), ("truncated-safetensors", "w.pth")]
)
def test_renamed_damaged_file_is_judged_by_its_content(tiny_sd, tmp_path, capsys, kind, name):
    """A pickle renamed .safetensors (and the reverse) is read as what it is (a whole one
    converts, see test_checkpoint.py::test_a_renamed_file_is_read_by_its_content); a damaged
    one gets the error of its real format."""
    _, data, says = _damaged(kind, tiny_sd)
    path = tmp_path / name
    path.write_bytes(data)
    line = cli_error_line(_ckpt_args(path, tmp_path / "out"), capsys, unchanged=tmp_path)
    assert says in line
    real = "torch zip" if kind == "truncated-pth" else "safetensors"
    assert real in line


# --- the wrong weights ----------------------------------------------------------------------


def test_checkpoint_of_another_variant_names_the_variant_it_fits(tmp_path, capsys):
    import timm

    with torch.device("meta"):
        small = timm.create_model("deit_small_patch16_224").state_dict()
    path = tmp_path / "small.safetensors"
    save_file({k: torch.full(v.shape, 0.01) for k, v in small.items()}, path)
    line = cli_error_line(_ckpt_args(path, tmp_path / "out"), capsys, unchanged=tmp_path)
    # deit_small: width 384 (cls_token (1, 1, 384)), 12 blocks; deit_tiny: width 192
    assert f"does not fit {TINY} (embed dim 192, depth 12)" in line
    assert "its tensors have embed dim 384, depth 12, which fits deit_small_patch16_224" in line


def test_a_tensor_of_another_shape_is_named_with_both_shapes(tiny_sd, tmp_path, capsys):
    """Widths, depth, classes and resolution fit; one tensor inside a block does not."""
    sd = dict(tiny_sd)
    sd["blocks.3.mlp.fc2.weight"] = torch.full((192, 700), 0.01)
    path = tmp_path / "w.safetensors"
    save_file(sd, path)
    line = cli_error_line(_ckpt_args(path, tmp_path / "out"), capsys, unchanged=tmp_path)
    assert "'blocks.3.mlp.fc2.weight' has shape (192, 700)" in line and "(192, 768)" in line


def test_num_classes_contradicting_the_checkpoint_names_both(tmp_path, capsys):
    """The class count is read from the checkpoint; a flag that says otherwise is an error."""
    model = random_timm_model(TINY, seed=1, num_classes=10)
    path = tmp_path / "ft.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    argv = [*_ckpt_args(path, tmp_path / "out"), "--num-classes", "1000"]
    line = cli_error_line(argv, capsys, unchanged=tmp_path)
    assert "--num-classes 1000 contradicts the checkpoint: its head has 10 classes" in line


def test_missing_and_unexpected_keys_are_listed_sorted(tiny_sd, tmp_path, capsys):
    sd = dict(tiny_sd)
    del sd["norm.bias"], sd["blocks.3.mlp.fc2.weight"]
    sd["zz.extra"] = torch.ones(1)
    sd["aa.extra"] = torch.ones(1)
    path = tmp_path / "w.safetensors"
    save_file(sd, path)
    line = cli_error_line(_ckpt_args(path, tmp_path / "out"), capsys, unchanged=tmp_path)
    assert "missing 2 keys [blocks.3.mlp.fc2.weight, norm.bias]" in line
    assert "unexpected 2 keys [aa.extra, zz.extra]" in line


@pytest.mark.parametrize("value", ["a string", 3, [1.0, 2.0]], ids=["str", "int", "list"])
def test_non_tensor_entry(tiny_sd, tmp_path, capsys, value):
    sd = dict(tiny_sd)
    sd["blocks.0.norm1.weight"] = value
    path = tmp_path / "w.pth"
    torch.save({"model": sd}, path)
    line = cli_error_line(_ckpt_args(path, tmp_path / "out"), capsys, unchanged=tmp_path)
    assert "'blocks.0.norm1.weight'" in line and "not a tensor" in line


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=str)
def test_nan_or_inf_in_weights(tiny_sd, tmp_path, capsys, bad):
    sd = dict(tiny_sd)
    w = sd["blocks.5.attn.qkv.weight"].clone()
    w[7, 3] = bad
    sd["blocks.5.attn.qkv.weight"] = w
    path = tmp_path / "w.safetensors"
    save_file(sd, path)
    line = cli_error_line(_ckpt_args(path, tmp_path / "out"), capsys, unchanged=tmp_path)
    assert "'blocks.5.attn.qkv.weight'" in line and "1 NaN/Inf value" in line


def test_ema_and_plain_weights_need_a_choice(tiny_sd, tmp_path, capsys):
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": tiny_sd, "model_ema": tiny_sd, "epoch": 3}, path)
    line = cli_error_line(_ckpt_args(path, tmp_path / "out"), capsys, unchanged=tmp_path)
    assert "--ema or --no-ema" in line


def test_labels_of_the_wrong_count(tiny_sd, tmp_path, capsys):
    path = tmp_path / "w.safetensors"
    save_file(tiny_sd, path)
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n")
    line = cli_error_line(
        [*_ckpt_args(path, tmp_path / "out"), "--labels", str(labels)], capsys, unchanged=tmp_path
    )
    assert "2 labels" in line and "1000 classes" in line


# --- the wrong model ------------------------------------------------------------------------


def test_unknown_model_name(tiny_sd, tmp_path, capsys):
    path = tmp_path / "w.safetensors"
    save_file(tiny_sd, path)
    line = cli_error_line(
        _ckpt_args(path, tmp_path / "out", "deit_tiny_patch16_244"), capsys, unchanged=tmp_path
    )
    assert "unknown timm model" in line and "deit_tiny_patch16_224" in line


def test_non_deit_model(tiny_sd, tmp_path, capsys):
    path = tmp_path / "w.safetensors"
    save_file(tiny_sd, path)
    line = cli_error_line(
        _ckpt_args(path, tmp_path / "out", "resnet18"), capsys, unchanged=tmp_path
    )
    assert "not a timm VisionTransformer" in line and "DeiT" in line


def test_unsupported_vit_feature_is_named(tiny_sd, tmp_path, capsys):
    path = tmp_path / "w.safetensors"
    save_file(tiny_sd, path)
    line = cli_error_line(
        _ckpt_args(path, tmp_path / "out", "vit_small_patch14_reg4_dinov2"),
        capsys,
        unchanged=tmp_path,
    )
    assert "register tokens" in line


# --- the wrong output -----------------------------------------------------------------------


@pytest.fixture
def ckpt(tiny_sd, tmp_path) -> Path:
    path = tmp_path / "ckpts" / "model.safetensors"
    path.parent.mkdir()
    save_file(tiny_sd, path)
    return path


def test_output_is_an_existing_file(ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("not a folder")
    line = cli_error_line([*_ckpt_args(ckpt, out), "--overwrite"], capsys, unchanged=tmp_path)
    assert "existing file" in line


def test_output_is_the_checkpoint_itself(ckpt, tmp_path, capsys):
    line = cli_error_line([*_ckpt_args(ckpt, ckpt), "--overwrite"], capsys, unchanged=tmp_path)
    assert "is the checkpoint itself" in line


def test_output_folder_holding_the_checkpoint(ckpt, tmp_path, capsys):
    """Writing ckpts/ (which would get a model.safetensors of its own) would delete the
    checkpoint ckpts/model.safetensors: refused even with --overwrite."""
    line = cli_error_line(
        [*_ckpt_args(ckpt, ckpt.parent), "--overwrite"], capsys, unchanged=tmp_path
    )
    assert "holds the checkpoint" in line


def test_output_under_a_file(ckpt, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    line = cli_error_line(_ckpt_args(ckpt, tmp_path / "afile" / "out"), capsys, unchanged=tmp_path)
    assert "is a file, not a folder" in line


def test_output_not_writable(ckpt, tmp_path, capsys, monkeypatch):
    """As root chmod does not stop a write, so the folder creation is made to fail as it does
    for a user without permission."""
    import tempfile

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", denied)
    line = cli_error_line(_ckpt_args(ckpt, tmp_path / "out"), capsys, unchanged=tmp_path)
    assert "permission denied" in line


def test_interrupted_write_leaves_no_folder_under_the_final_name(ckpt, tmp_path):
    """SIGKILL mid-write: the final name never appears; the next run removes the leftover."""
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "deit_port.cli",
        "-q",
        "convert",
        TINY,
        str(out),
        "--checkpoint",
        str(ckpt),
        "--max-shard-size",
        "200KB",
        "--no-verify",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        partial = None
        while time.monotonic() < deadline and proc.poll() is None:
            found = [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
            if found and any(found[0].glob("model-*.safetensors")):
                partial = found[0]
                break
            time.sleep(0.005)
        assert partial is not None, f"no write was seen: {proc.poll()} {proc.stderr.read()}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, "the process ended before it could be killed"
    assert not out.exists(), "a partial folder is under the final name"
    assert partial.exists() and partial.name.startswith(".out.")  # hidden, named as temporary

    assert (
        cli.main(["-q", "convert", TINY, str(out), "--checkpoint", str(ckpt), "--no-verify"]) == 0
    )
    assert (out / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith((".partial", ".old"))]


def test_leftovers_of_dead_runs_are_removed_those_of_live_ones_kept(ckpt, tmp_path):
    stale = tmp_path / f".out.{dead_pid()}.abcdefgh.partial"
    stale.mkdir()
    (stale / "model-00001-of-00009.safetensors").write_bytes(b"half a shard")
    running = tmp_path / f".out.{os.getpid()}.zyxwvuts.partial"  # a live process's
    running.mkdir()
    other = tmp_path / f".out.v2.{dead_pid()}.abcdefgh.partial"  # "out.v2"'s, not ours
    other.mkdir()
    assert (
        cli.main(
            ["-q", "convert", TINY, str(tmp_path / "out"), "--checkpoint", str(ckpt), "--no-verify"]
        )
        == 0
    )
    assert not stale.exists() and running.is_dir() and other.is_dir()


def test_output_moved_aside_by_a_killed_overwrite_is_restored(ckpt, tmp_path, capsys):
    """Killed between moving the earlier output aside and moving the new one in: the next run
    puts the earlier output back (and, without --overwrite, leaves it there)."""
    aside = tmp_path / f".out.{dead_pid()}.abcdefgh.old" / "x"
    aside.mkdir(parents=True)
    (aside / "config.json").write_text("the earlier conversion")
    out = tmp_path / "out"
    line = cli_error_line([*_ckpt_args(ckpt, out), "--no-verify"], capsys, unchanged=None)
    assert "--overwrite" in line
    assert (out / "config.json").read_text() == "the earlier conversion"
    assert not aside.parent.exists()


@pytest.mark.parametrize(
    "extra",
    [["--init", "random"], ["--ema", "--no-ema"], ["--dtype", "float64"]],
    ids=["checkpoint-and-init", "ema-and-no-ema", "unknown-dtype"],
)
def test_contradictory_options_are_usage_errors(ckpt, tmp_path, capsys, extra):
    with nothing_written(tmp_path), pytest.raises(SystemExit) as e:
        cli.main(["convert", TINY, str(tmp_path / "out"), "--checkpoint", str(ckpt), *extra])
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_ema_flag_without_a_checkpoint(tmp_path, capsys):
    line = cli_error_line(
        [*CONVERT, TINY, str(tmp_path / "out"), "--init", "random", "--ema"],
        capsys,
        unchanged=tmp_path,
    )
    assert "--checkpoint" in line
