"""Faults of the machine, made for real: a full file system, one out of inodes, a read-only one,
a FIFO or a device given as the checkpoint, SIGINT and SIGTERM sent to a conversion as it writes.

Each fault is one line on stderr and its exit code (2; 130 / 143 for a signal), and leaves
nothing behind: the file system written to holds afterwards exactly what it held before, byte
for byte (an earlier output untouched). The disk faults run `deit-port` in this process
(`cli.main`, as tests/util.py's `cli_error_line`): the fault is the file system's, not the
process's, and a subprocess would only add the 5-10 s of importing torch, timm and
transformers to each case. The signals are sent to a real `deit-port convert` subprocess.

The small file systems are real tmpfs mounts (20 MiB: DeiT tiny's float32 weights are 21.8
MiB). Mounting needs root (CAP_SYS_ADMIN); without it these tests skip with the reason, except
under CI=true, where that is a failure: CI runs as root, and a skip there would hide the faults.

"The disk fills while writing" needs the up-front check out of the way: the test replaces
`deit_port.output.check_free_space` with a no-op for the run, as another writer filling the disk
after the check would make it, so that each writer (safetensors' for `convert` and `to-timm`,
the ONNX exporter's for `export-onnx`, Python's for the small files) meets the real ENOSPC.
"""

import errno
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from safetensors.torch import save_file

import deit_port.hf_folder
import deit_port.output
from deit_port import cli
from deit_port.checkpoint_format import detect_format
from deit_port.errors import CheckpointError, LabelsError, OutputError
from deit_port.labels import read_labels
from deit_port.output import write_error_cause
from deit_port.publish import atomic_folder

from .util import (
    TINY,
    cli_error_line,
    need_module,
    nothing_written,
    one_error_line,
    random_timm_model,
    skip_or_fail,
)

MiB = 1 << 20


def _cannot(reason: str):
    """Skip, or under CI=true fail: CI can make these faults, so they must be made there."""
    skip_or_fail(reason)


@pytest.fixture
def tmpfs(tmp_path):
    """`make(size="20m", nr_inodes=None, read_only=False, fill=None) -> Path`: a fresh tmpfs
    mounted under tmp_path; `fill(path)` writes into it before a read-only remount. Every
    mount is unmounted at teardown."""
    mounted: list[Path] = []

    def make(size="20m", nr_inodes=None, read_only=False, fill=None) -> Path:
        target = tmp_path / f"fs{len(mounted)}"
        target.mkdir()
        options = f"size={size}" + (f",nr_inodes={nr_inodes}" if nr_inodes else "")
        _mount(["-t", "tmpfs", "-o", options, "tmpfs", str(target)])
        mounted.append(target)
        if fill is not None:
            fill(target)
        if read_only:
            _mount(["-o", "remount,ro", str(target)])
        return target

    yield make
    for target in reversed(mounted):
        r = subprocess.run(["umount", str(target)], check=False, capture_output=True, text=True)
        if r.returncode:  # something still holds it open: detach it now, freed when released
            subprocess.run(["umount", "-l", str(target)], check=True)


def _mount(args: list[str]) -> None:
    try:
        r = subprocess.run(
            ["mount", *args], check=False, capture_output=True, text=True, timeout=60
        )
    except FileNotFoundError:
        _cannot("no `mount` command to make a small file system with")
    if r.returncode:
        _cannot(f"cannot mount a tmpfs (needs root, CAP_SYS_ADMIN): {r.stderr.strip()}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A DeiT tiny checkpoint (seeded random weights) and the folder converted from it, on the
    ordinary temporary disk; the byte count of its tensors in float32."""
    root = tmp_path_factory.mktemp("faults")
    state_dict = random_timm_model(TINY, seed=0).state_dict()
    ckpt = root / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in state_dict.items()}, ckpt)
    folder = root / "tiny-hf"
    assert (
        cli.main(["-q", "convert", TINY, str(folder), "--checkpoint", str(ckpt), "--no-verify"])
        == 0
    )
    nbytes = sum(v.nbytes for v in state_dict.values())
    return ckpt, folder, nbytes


# What each writing command writes into `fs` (a folder or a file), and its command line.
WRITERS = ["convert", "to-timm", "export-onnx"]


def _argv(command: str, tiny, fs: Path, *extra: str) -> list[str]:
    ckpt, folder, _ = tiny
    if command == "convert":
        return ["convert", TINY, str(fs / "out"), "--checkpoint", str(ckpt), "--no-verify", *extra]
    if command == "to-timm":
        return ["to-timm", str(folder), str(fs / "out.safetensors"), *extra]
    return ["export-onnx", str(folder), str(fs / "out.onnx"), *extra]


def _earlier_output(command: str, fs: Path) -> None:
    """An earlier output where `command` writes (replaced only if the new one is complete)."""
    if command == "convert":
        (fs / "out").mkdir()
        (fs / "out" / "config.json").write_text('{"an": "earlier conversion"}')
        (fs / "out" / "model.safetensors").write_bytes(b"earlier weights" * 100)
    else:
        name = "out.safetensors" if command == "to-timm" else "out.onnx"
        (fs / name).write_bytes(b"an earlier output" * 100)


def _fails(argv: list[str], fs: Path, capsys, code: int = 2) -> str:
    """Run `deit-port -q ARGV` in this process and assert that it exits with `code`, says one
    `deit-port: error:` line, and that nothing at or under `fs` was written, changed or
    removed (`cli_error_line`)."""
    return cli_error_line(["-q", *argv], capsys, code=code, unchanged=fs)


def _without_space_check(monkeypatch) -> None:
    """Turn the up-front free-space check off, as another writer filling the disk after the
    check would: the command's own writer meets the real ENOSPC."""
    monkeypatch.setattr(deit_port.output, "check_free_space", lambda *args, **kwargs: None)


def _one_error_line(code: int, returncode: int, stderr: str) -> str:
    """Assert the exit code and that stderr is exactly one `deit-port: error:` line."""
    assert returncode == code, f"exit {returncode}, not {code}:\n{stderr}"
    return one_error_line(stderr)


def _mib(line: str, pattern: str) -> float:
    """The figure in MiB that `pattern` (with an `N` for it) finds in `line`."""
    m = re.search(pattern.replace("N", r"(\d+\.\d)"), line)
    assert m, f"no '{pattern}' in: {line}"
    return float(m.group(1))


# --- in process: a real full disk under each kind of writer (fast) ------------------------


def _write_2_mib(writer: str, path: Path) -> None:
    """Write 2 MiB of weights into `path` with `writer`'s own code."""
    import torch

    weights = torch.ones(1 << 19)  # 2 MiB of float32
    if writer == "safetensors":  # a Rust writer: SafetensorError, "... (os error 28)"
        save_file({"w": weights}, path / "model.safetensors")
    elif writer == "onnx":  # onnx.save_model: Python's file writes
        onnx = need_module("onnx")
        from onnx import helper, numpy_helper

        init = numpy_helper.from_array(weights.numpy(), "w")
        out = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1 << 19])
        node = helper.make_node("Identity", ["w"], ["y"])
        onnx.save_model(
            helper.make_model(helper.make_graph([node], "g", [], [out], [init])), path / "m.onnx"
        )
    else:  # json, config files: Python's own
        (path / "config.json").write_bytes(b"{}" + b" " * (2 << 20))


@pytest.mark.parametrize("writer", ["safetensors", "onnx", "python"])
def test_full_disk_under_each_writer_is_one_output_error(tmpfs, writer):
    fs = tmpfs(size="1m")
    with nothing_written(fs), pytest.raises(OutputError) as e, atomic_folder(fs / "out") as tmp:
        _write_2_mib(writer, tmp)
    assert "no space left on device" in str(e.value) and "nothing was written" in str(e.value)


def test_up_front_check_on_a_small_disk(tmpfs):
    fs = tmpfs(size="1m")
    with (
        nothing_written(fs),
        pytest.raises(OutputError) as e,
        atomic_folder(fs / "out", size=2 * MiB, files=1),
    ):
        pytest.fail("the block ran: nothing should be written")
    line = str(e.value)
    assert f"not enough space for {fs / 'out'}: needs " in line and f"free on {fs}" in line
    assert _mib(line, "N MiB free") == 1.0, line  # all of it: nothing was written
    assert _mib(line, "needs N MiB") >= 2.0, line


# --- too little space, known before the first byte --------------------------------------------


@pytest.mark.parametrize("command", WRITERS)
def test_too_little_space_is_refused_up_front(tiny, tmpfs, command, capsys):
    fs = tmpfs(size="20m")
    line = _fails(_argv(command, tiny, fs), fs, capsys)
    assert "not enough space" in line and str(fs) in line, line
    st = os.statvfs(fs)
    free = st.f_bavail * st.f_frsize / MiB  # all of it: nothing was left
    assert _mib(line, "N MiB free") == pytest.approx(free, abs=0.05), line
    _, _, nbytes = tiny  # the float32 weights, whatever else is written
    assert _mib(line, "needs N MiB") >= nbytes / MiB, line


@pytest.mark.parametrize("command", WRITERS)
def test_too_few_inodes_are_refused_up_front(tiny, tmpfs, command, capsys):
    """A file system with room for the bytes but not for the files (1 or 2 free inodes: the
    root folder takes one of nr_inodes)."""
    fs = tmpfs(size="200m", nr_inodes=4 if command == "convert" else 2)
    line = _fails(_argv(command, tiny, fs), fs, capsys)
    free = os.statvfs(fs).f_ffree
    assert "not enough inodes" in line and f"{free} free on {fs}" in line, line


# --- the disk fills while writing (another writer) ----------------------------------------


@pytest.fixture(scope="module")
def shallow(tmp_path_factory) -> Path:
    """DeiT tiny at depth 2 (5.1 MiB of float32 weights), converted from seeded random weights:
    for the ONNX writer's full disk, where a 12-block export would add 10 s of tracing."""
    from deit_port.convert import convert_deit_checkpoint

    folder = tmp_path_factory.mktemp("faults-shallow") / "tiny-depth-2"
    model_kwargs = {"depth": 2}
    convert_deit_checkpoint(TINY, folder, init="random", model_kwargs=model_kwargs, verify=False)
    return folder


@pytest.mark.parametrize("command", ["convert", "to-timm"])
def test_disk_that_fills_while_writing(tiny, tmpfs, command, capsys, monkeypatch):
    """With the up-front check off, each command's own writer meets the real ENOSPC (convert
    on its 10th 2 MB shard); an earlier output stays as it was."""
    fs = tmpfs(size="20m", fill=lambda fs: _earlier_output(command, fs))
    extra = ["--overwrite"] + (["--max-shard-size", "2MB"] if command == "convert" else [])
    _without_space_check(monkeypatch)
    _fills_the_disk(_argv(command, tiny, fs, *extra), fs, capsys)


@pytest.mark.slow
def test_disk_that_fills_while_exporting_onnx(shallow, tmpfs, capsys, monkeypatch):
    """The same for export-onnx's writer (onnx's), DeiT tiny at depth 2 on 4 MiB."""
    fs = tmpfs(size="4m", fill=lambda fs: _earlier_output("export-onnx", fs))
    _without_space_check(monkeypatch)
    argv = ["export-onnx", str(shallow), str(fs / "out.onnx"), "--overwrite"]
    _fills_the_disk(argv, fs, capsys)


def _fills_the_disk(argv: list[str], fs: Path, capsys) -> None:
    line = _fails(argv, fs, capsys)
    assert "no space left on device" in line and "nothing was written" in line, line
    assert "the earlier output is untouched" in line, line


@pytest.mark.parametrize("command", ["convert", "to-timm"])
def test_inodes_that_run_out_while_writing(tiny, tmpfs, command, capsys, monkeypatch):
    """convert: its third file (transformers' writer of preprocessor_config.json) finds no
    inode; to-timm: safetensors' writer finds none for the checkpoint."""
    fs = tmpfs(size="200m", nr_inodes=4 if command == "convert" else 2)
    _without_space_check(monkeypatch)
    line = _fails(_argv(command, tiny, fs), fs, capsys)
    assert "no space left on device" in line and "nothing was written" in line, line


# --- a read-only file system --------------------------------------------------------------


@pytest.mark.parametrize("command", WRITERS)
def test_read_only_file_system_is_named(tiny, tmpfs, command, capsys):
    fs = tmpfs(fill=lambda fs: _earlier_output(command, fs), read_only=True)
    line = _fails(_argv(command, tiny, fs, "--overwrite"), fs, capsys)
    assert f"{fs} is on a read-only file system" in line, line
    assert "permission" not in line, line


# --- a checkpoint that is not a regular file ----------------------------------------------


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_checkpoint_that_is_not_a_regular_file(tmp_path, kind, capsys):
    """Named for what it is, never opened: a FIFO without a writer would block the read (a
    thread opens it for writing after 60 s, so that a command that wrongly opened it fails
    instead of waiting forever); /dev/zero would feed it zeros."""
    unblock = None
    if kind == "fifo":
        path = tmp_path / "model.safetensors"
        os.mkfifo(path)
        words = "is a named pipe (FIFO), not a regular file"
        unblock = threading.Timer(60, lambda: os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK)))
        unblock.start()
    else:
        path = Path("/dev/zero")
        words = "is a character device, not a regular file"
    out = tmp_path / "out"  # beside the FIFO: the check of what was written must not open it
    try:
        line = _fails(["convert", TINY, str(out), "--checkpoint", str(path)], out, capsys)
    finally:
        if unblock is not None:
            unblock.cancel()
    assert f"checkpoint {path} {words}" in line, line


def test_socket_or_fifo_is_not_a_checkpoint_or_labels_file(tmp_path):
    """In process, the readers themselves: a socket, and a FIFO (a thread opens it for writing
    after 30 s, so that a reader that wrongly opened it fails instead of waiting forever)."""
    sock_path = tmp_path / "model.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_path))
        with pytest.raises(CheckpointError, match="is a socket, not a regular file"):
            detect_format(sock_path)
    fifo = tmp_path / "labels.txt"
    os.mkfifo(fifo)
    unblock = threading.Timer(30, lambda: os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)))
    unblock.start()
    try:
        with pytest.raises(LabelsError, match=r"is a named pipe \(FIFO\), not a regular file"):
            read_labels(fifo)
        with pytest.raises(CheckpointError, match=r"is a named pipe \(FIFO\)"):
            detect_format(fifo)
        with pytest.raises(LabelsError, match="is a character device"):
            read_labels("/dev/zero")
    finally:
        unblock.cancel()


# --- SIGINT and SIGTERM while writing -----------------------------------------------------


def _convert_and_signal(tiny, tmp_path: Path, signals: list[int], *extra: str):
    """Start `deit-port convert` writing 200 KB shards (75 files); once its hidden
    `.out.PID.*.partial` folder holds a shard (20 for two signals), send `signals`: a second
    one as soon as the first has begun to empty that folder (seen by polling it, so it may
    come a little later: the outcome must be the same whenever it comes)."""
    ckpt, _, _ = tiny
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "deit_port.cli", "-q", "convert", TINY, str(out)]
    cmd += ["--checkpoint", str(ckpt), "--max-shard-size", "200KB", "--no-verify", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        pattern = re.compile(rf"\.out\.{proc.pid}\.[^.]+\.partial")
        deadline = time.monotonic() + 300
        partial = []
        while time.monotonic() < deadline and proc.poll() is None:
            partial = [p for p in tmp_path.iterdir() if pattern.fullmatch(p.name)]
            shards = len(list(partial[0].glob("model-*.safetensors"))) if partial else 0
            if shards >= (20 if len(signals) > 1 else 1):
                break
            time.sleep(0.005)
        assert proc.poll() is None, f"no write was seen: {proc.returncode} {proc.stderr.read()}"
        proc.send_signal(signals[0])
        if len(signals) > 1:
            written = _count_files(partial[0])
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and _count_files(partial[0]) >= written:
                pass  # no sleep: the clean-up takes milliseconds
            proc.send_signal(signals[1])
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, err


def _count_files(folder: Path) -> int:
    """Files in `folder`; -1 once it is gone."""
    try:
        return len(os.listdir(folder))
    except FileNotFoundError:
        return -1


@pytest.mark.slow
@pytest.mark.parametrize(
    "signals", [[signal.SIGINT], [signal.SIGINT, signal.SIGINT]], ids=["sigint", "double-sigint"]
)
def test_signal_while_writing(tiny, tmp_path, signals):
    """One line, exit 130 (128 + SIGINT), nothing left: the partial folder is removed, even
    when a second Ctrl-C comes during that removal."""
    with nothing_written(tmp_path):
        returncode, err = _convert_and_signal(tiny, tmp_path, signals)
    line = _one_error_line(130, returncode, err)
    out = tmp_path / "out"
    assert line == f"deit-port: error: interrupted (SIGINT); nothing was written to {out}"


@pytest.mark.slow
def test_sigterm_while_overwriting_leaves_the_earlier_output(tiny, tmp_path):
    """SIGTERM (a service manager, `kill`): exit 143 (128 + 15), one line, and the earlier
    output that `--overwrite` was replacing is left as it was."""
    out = tmp_path / "out"
    _earlier_output("convert", tmp_path)
    with nothing_written(tmp_path):
        returncode, err = _convert_and_signal(tiny, tmp_path, [signal.SIGTERM], "--overwrite")
    line = _one_error_line(143, returncode, err)
    assert line == f"deit-port: error: interrupted (SIGTERM); nothing was written to {out}"


# --- the steps a signal must not cut short (a real signal, sent at the chosen moment) -----


@pytest.fixture
def sigint_raises():
    """SIGINT raises KeyboardInterrupt in this process (whatever a test runner set)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _send_sigint_on_first(monkeypatch, module, name: str, when=lambda *args: True) -> list:
    """Make the first call of `module.name` that `when` accepts send this process a SIGINT
    right after it returns (where Python would raise KeyboardInterrupt next)."""
    real = getattr(module, name)
    sent = []

    def call(*args, **kwargs):
        result = real(*args, **kwargs)
        if not sent and when(*args):
            sent.append(args)
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(module, name, call)
    return sent


def test_sigint_while_replacing_a_folder_waits_until_the_new_one_is_in_place(
    tmp_path, monkeypatch, sigint_raises
):
    """The moment the earlier output has been moved aside and the new one is not yet in its
    place: the signal waits, the new output is published whole, then KeyboardInterrupt."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("earlier")
    sent = _send_sigint_on_first(monkeypatch, os, "rename", lambda src, dst: Path(src) == out)
    with pytest.raises(KeyboardInterrupt), atomic_folder(out, overwrite=True) as tmp:
        (tmp / "config.json").write_text("new")
    assert sent, "the earlier output was not moved aside"
    assert (out / "config.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_sigint_while_removing_the_partial_folder_lets_it_finish(
    tmp_path, monkeypatch, sigint_raises
):
    """A failed write's clean-up: a Ctrl-C at its first file removed does not leave the rest."""
    out = tmp_path / "out"
    sent = _send_sigint_on_first(monkeypatch, os, "unlink")
    with pytest.raises(KeyboardInterrupt), atomic_folder(out) as tmp:
        for i in range(20):
            (tmp / f"model-{i:05d}.safetensors").write_bytes(b"x" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert sent, "nothing was removed"
    assert list(tmp_path.iterdir()) == [], "the partial folder was left half removed"


# --- what is a failed write and what is a bug ---------------------------------------------


def test_a_library_error_counts_as_a_failed_write_only_with_the_os_error_in_it():
    from safetensors import SafetensorError

    full = SafetensorError(
        "Error while serializing: I/O error: No space left on device (os error 28)"
    )
    assert write_error_cause(full) == "no space left on device (disk full)"
    assert (
        write_error_cause(RuntimeError("[Errno 122] Disk quota exceeded")) == "disk quota exceeded"
    )
    assert write_error_cause(OSError(errno.EROFS, "")) == "read-only file system"
    # not the file system refusing a write: a missing file, a corrupt header
    assert write_error_cause(RuntimeError("cannot find the graph (os error 2)")) is None
    assert write_error_cause(SafetensorError("invalid header")) is None
    try:
        try:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        except OSError as io_error:
            raise RuntimeError("saving the model failed") from io_error
    except RuntimeError as wrapped:
        assert write_error_cause(wrapped) == write_error_cause(wrapped.__cause__) is not None
    assert write_error_cause(OutputError("No space left on device")) is None


def test_an_unrelated_error_while_writing_is_still_a_bug(tmp_path, capsys, monkeypatch):
    """Not a blanket catch: a RuntimeError from the writing step (an injected bug, which no
    real fault makes) keeps its traceback and exit 3, and still leaves nothing."""

    def buggy_writer(folder, *args, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("a bug in the writer")

    monkeypatch.setattr(deit_port.hf_folder, "save_hf_folder", buggy_writer)
    argv = ["-q", "convert", TINY, str(tmp_path / "out"), "--init", "random", "--no-verify"]
    with nothing_written(tmp_path):
        assert cli.main(argv) == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: a bug in the writer" in err, err


def test_space_check_without_a_mount(tmp_path):
    """In process, on the ordinary disk (no root needed): asking for more than the file system
    has is refused with the folder named; nothing is created, not even the missing parents."""
    st = os.statvfs(tmp_path)
    size = st.f_blocks * st.f_frsize  # the whole file system: more than is free
    out = tmp_path / "new" / "out"
    with pytest.raises(OutputError, match=rf"not enough space for {re.escape(str(out))}: needs"):
        deit_port.output.check_free_space(out, size, folder=True)
    assert list(tmp_path.iterdir()) == []
