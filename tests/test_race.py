"""Concurrent writers: without --overwrite, an output another run published meanwhile is never
replaced. The loser fails with one line (exit 2) and leaves nothing; the winner's output is intact.

A real race between two `deit-port convert` processes is timing-dependent (either way the two
must not both succeed), so the same moment is also made deterministic: the destination is
created between the check before the work and the publish, for folders and for files, through
each way a file can be published without replacing (`renameat2`, `link`).
"""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import deit_port.hf_folder
import deit_port.publish
from deit_port.errors import OutputError
from deit_port.mapping import hf_to_timm
from deit_port.publish import atomic_file, atomic_folder

from .util import TINY, cli_error_line, dead_pid, one_error_line, random_timm_model


def _leftovers(root) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.endswith((".partial", ".old")))


def _theirs(out, folder: bool) -> None:
    """Another run's output appears at `out`."""
    if folder:
        out.mkdir(exist_ok=True)
        (out / "config.json").write_text("the other run's")
    else:
        out.write_text("the other run's")


@pytest.fixture(params=["renameat2", "link"])
def file_publish(request, monkeypatch):
    """Each way a file is published without replacing; `link` is what runs where the C
    library has no renameat2 (it is also the fallback where the file system refuses it)."""
    if request.param == "renameat2":
        if deit_port.publish.renameat2() is None:
            pytest.skip("this C library has no renameat2")
    else:
        monkeypatch.setattr(deit_port.publish, "renameat2", lambda: None)
    return request.param


def test_folder_that_appears_meanwhile_is_not_replaced(tmp_path):
    out = tmp_path / "out"
    with (
        pytest.raises(OutputError, match="appeared while converting.*--overwrite") as e,
        atomic_folder(out) as tmp,
    ):
        (tmp / "config.json").write_text("ours")
        _theirs(out, folder=True)
    assert len(str(e.value).splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    assert (out / "config.json").read_text() == "the other run's"
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("later", ["stays-empty", "filled"])
def test_an_empty_folder_is_used_only_while_it_stays_empty(tmp_path, later):
    """An existing empty folder is a valid output without --overwrite (as before); one that
    another run filled meanwhile is not."""
    out = tmp_path / "out"
    out.mkdir()
    if later == "stays-empty":
        with atomic_folder(out) as tmp:
            (tmp / "config.json").write_text("ours")
        assert (out / "config.json").read_text() == "ours"
    else:
        with pytest.raises(OutputError, match="appeared"), atomic_folder(out) as tmp:
            (tmp / "config.json").write_text("ours")
            _theirs(out, folder=True)
        assert (out / "config.json").read_text() == "the other run's"
    assert _leftovers(tmp_path) == []


def test_a_file_where_the_folder_goes_is_not_replaced(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="appeared while converting"), atomic_folder(out) as tmp:
        (tmp / "config.json").write_text("ours")
        _theirs(out, folder=False)
    assert out.read_text() == "the other run's"
    assert _leftovers(tmp_path) == []


def test_overwrite_replaces_a_folder_that_appeared_meanwhile(tmp_path):
    out = tmp_path / "out"
    with atomic_folder(out, overwrite=True) as tmp:
        (tmp / "config.json").write_text("ours")
        _theirs(out, folder=True)
    assert (out / "config.json").read_text() == "ours"
    assert _leftovers(tmp_path) == []


def test_file_that_appears_meanwhile_is_not_replaced(tmp_path, file_publish):
    out = tmp_path / "model.safetensors"
    with (
        pytest.raises(OutputError, match="appeared while converting.*--overwrite") as e,
        atomic_file(out) as tmp,
    ):
        assert tmp.name == out.name and tmp.parent != out.parent  # the name timm reads
        tmp.write_text("ours")
        _theirs(out, folder=False)
    assert len(str(e.value).splitlines()) == 1
    assert out.read_text() == "the other run's"
    assert _leftovers(tmp_path) == []


def test_a_symlink_that_appears_meanwhile_is_not_replaced(tmp_path, file_publish):
    out = tmp_path / "model.safetensors"
    with pytest.raises(OutputError), atomic_file(out) as tmp:
        tmp.write_text("ours")
        out.symlink_to(tmp_path / "elsewhere")  # dangling: exists() is False
    assert out.is_symlink() and not (tmp_path / "elsewhere").exists()
    assert _leftovers(tmp_path) == []


def test_file_is_published_with_ordinary_permissions(tmp_path, file_publish):
    out = tmp_path / "model.safetensors"
    with atomic_file(out) as tmp:
        tmp.write_text("ours")
        tmp.chmod(0o600)  # as safetensors creates its files
    umask = os.umask(0)
    os.umask(umask)
    assert out.read_text() == "ours" and out.stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_overwrite_replaces_a_file_that_appeared_meanwhile(tmp_path):
    out = tmp_path / "model.safetensors"
    with atomic_file(out, overwrite=True) as tmp:
        tmp.write_text("ours")
        _theirs(out, folder=False)
    assert out.read_text() == "ours"
    assert _leftovers(tmp_path) == []


def test_file_writer_removes_leftovers_of_dead_runs_keeps_live_ones(tmp_path):
    name = "model.safetensors"
    stale = tmp_path / f".{name}.{dead_pid()}.abcdefgh.partial"
    stale.mkdir()
    (stale / name).write_bytes(b"half a checkpoint")
    running = tmp_path / f".{name}.{os.getpid()}.zyxwvuts.partial"  # a live process's
    running.mkdir()
    other = tmp_path / f".other.{name}.{dead_pid()}.abcdefgh.partial"  # another output's
    other.mkdir()
    with atomic_file(tmp_path / name) as tmp:
        tmp.write_text("ours")
    assert not stale.exists() and running.is_dir() and other.is_dir()
    assert (tmp_path / name).read_text() == "ours"


def test_convert_loses_to_a_folder_that_appeared_meanwhile(tmp_path, capsys, monkeypatch):
    """Through the CLI: exit 2, one line, the other run's folder untouched, nothing left."""
    out = tmp_path / "out"
    real = deit_port.hf_folder.save_hf_folder

    def save_while_another_run_publishes(folder, *args, **kwargs):
        real(folder, *args, **kwargs)
        _theirs(out, folder=True)

    monkeypatch.setattr(deit_port.hf_folder, "save_hf_folder", save_while_another_run_publishes)
    argv = ["-q", "convert", TINY, str(out), "--init", "random", "--no-verify"]
    line = cli_error_line(argv, capsys, unchanged=None)  # the other run's folder appears
    assert "appeared while converting" in line
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    assert (out / "config.json").read_text() == "the other run's"
    assert _leftovers(tmp_path) == []


def test_two_converts_into_one_new_folder_one_wins_intact(tmp_path):
    """Two `deit-port convert` processes started together into the same new folder."""
    out = tmp_path / "race"
    seeds = (1, 2)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "deit_port.cli",
                "convert",
                TINY,
                str(out),
                "--init",
                "random",
                "--seed",
                str(seed),
                "-q",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in seeds
    ]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    for p in procs:
        p.stderr.close()
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    (winner,) = [seed for seed, (code, _) in zip(seeds, results) if code == 0]
    (err,) = [err for code, err in results if code == 2]
    assert "--overwrite" in one_error_line(err)

    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]
    from deit_port.arch import ArchSpec

    written = load_file(out / "model.safetensors")
    for seed in seeds:
        timm_model = random_timm_model(TINY, seed=seed)
        expected = timm_model.state_dict()
        got = hf_to_timm(written, ArchSpec.from_timm(timm_model))
        same = sorted(got) == sorted(expected) and all(
            torch.equal(got[k], expected[k]) for k in expected
        )
        assert same == (seed == winner), f"seed {seed}: the folder is not the winner's weights"
    assert _leftovers(tmp_path) == []
