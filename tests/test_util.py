"""The shared checks of tests/util.py fail when they should: a check that cannot fail would
pass every test that relies on it."""

import sys

import pytest

from deit_port import cli

from .util import cli_error_line, nothing_written, one_error_line

LINE = "deit-port: error: no such file: w.pth (give a checkpoint file)"


def test_one_error_line_returns_the_line():
    assert one_error_line(LINE + "\n") == LINE


@pytest.mark.parametrize(
    "err",
    [
        "",
        LINE,  # no newline: not a whole line
        LINE + "\n\n",
        "\n" + LINE + "\n",
        LINE + "\nTraceback (most recent call last):\n",
        LINE.replace(": no such", ":\rno such") + "\n",
        "deit-port: warning: " + LINE + "\n",
        "usage: deit-port ...\n",
    ],
    ids=[
        "empty",
        "no-newline",
        "blank-line-after",
        "blank-line-before",
        "two-lines",
        "carriage-return",
        "other-prefix",
        "usage",
    ],
)
def test_one_error_line_refuses_anything_else(err):
    with pytest.raises(AssertionError):
        one_error_line(err)


def test_nothing_written_passes_when_nothing_changes(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_bytes(b"x")
    with nothing_written(tmp_path), nothing_written(tmp_path / "a" / "f"):
        (tmp_path / "a" / "f").read_bytes()
    with nothing_written(tmp_path / "absent"):
        pass


@pytest.mark.parametrize(
    "change",
    ["add-file", "add-folder", "remove", "rewrite", "replace-by-link", "create-the-absent-root"],
)
def test_nothing_written_sees_every_change(tmp_path, change):
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "f").write_bytes(b"x")
    root = tmp_path / "absent" if change == "create-the-absent-root" else kept
    with pytest.raises(AssertionError, match="written or lost"), nothing_written(root):
        if change == "add-file":
            (kept / "new").write_bytes(b"")
        elif change == "add-folder":
            (kept / "new").mkdir()
        elif change == "remove":
            (kept / "f").unlink()
        elif change == "rewrite":
            (kept / "f").write_bytes(b"y")  # same size, other bytes
        elif change == "replace-by-link":
            (kept / "f").unlink()
            (kept / "f").symlink_to(tmp_path / "elsewhere")
        else:
            root.write_text("")


def test_cli_error_line_refuses_another_exit_code(tmp_path, capsys):
    """`deit-port list` succeeds (exit 0): not the error the caller expects."""
    with pytest.raises(AssertionError, match="exit 0, not 2"):
        cli_error_line(["list"], capsys, unchanged=tmp_path)


def test_cli_error_line_refuses_a_run_that_wrote(tmp_path, capsys, monkeypatch):
    """A run that fails as it should but leaves a file behind (a stand-in for `main`: no real
    run is known to do that)."""

    def leaves_a_file(argv):
        (tmp_path / "half.safetensors").write_bytes(b"half")
        print(LINE, file=sys.stderr)
        return 2

    monkeypatch.setattr(cli, "main", leaves_a_file)
    with pytest.raises(AssertionError, match=r"added \['half.safetensors'\]"):
        cli_error_line(["convert"], capsys, unchanged=tmp_path)
    assert cli_error_line(["convert"], capsys, unchanged=None) == LINE  # the same run, unchecked
