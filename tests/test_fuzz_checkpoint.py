"""Corrupt checkpoints, fuzzed: whatever is wrong with the bytes, reading ends in a clean load
or in deit_port's own one-line bad-input error (exit 2), never in another exception: a
`CheckpointError`, or the `KeyMismatchError`/`BadInputError` of keys and shapes that do not fit.

A small DeiT (one block, embed_dim 32, 10 classes, 32x32 images) is saved as safetensors, as a
`torch.save` zip and as a legacy (non-zip) `torch.save` pickle; each example damages one copy
(truncated anywhere; bits flipped, a byte run zeroed or rewritten in the first 4 KB, where the
headers and the pickle are; bytes appended) and reads it through `load_timm_model`, the path
`deit-port convert --checkpoint` takes. Under `HYPOTHESIS_PROFILE=ci` (60 examples a test)
that is 3 x 120 = 360 files; the examples are derandomized (the same files on every run).
"""

import functools
import io
import itertools
import pickletools
import struct
import zipfile

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from deit_port.errors import BadInputError, CheckpointError
from deit_port.source import load_timm_model

from .util import TINY, cli_error_line, random_timm_model

KWARGS = {"depth": 1, "embed_dim": 32, "num_heads": 2, "num_classes": 10, "img_size": 32}
HEADER = 4096  # the region where bytes are flipped, zeroed or rewritten
FORMATS = {"safetensors": ".safetensors", "torch-zip": ".pth", "torch-pickle": ".pth"}
_names = itertools.count()


@functools.cache
def _intact(fmt: str) -> bytes:
    """The undamaged file of `fmt` (a training-style `{"model": ..., "epoch": ...}` for torch)."""
    model = random_timm_model(TINY, seed=3, **KWARGS)
    state_dict = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if fmt == "safetensors":
        return save(state_dict, metadata={"format": "pt"})
    buf = io.BytesIO()
    zipped = fmt == "torch-zip"
    torch.save({"model": state_dict, "epoch": 299}, buf, _use_new_zipfile_serialization=zipped)
    return buf.getvalue()


@st.composite
def damage(draw, size: int) -> tuple:
    """One mutation of a `size`-byte file, as data hypothesis can print and shrink."""
    region = min(HEADER, size)
    kind = draw(st.sampled_from(["truncate", "flip", "zero", "rewrite", "append"]))
    if kind == "truncate":
        return kind, draw(st.integers(1, size - 1))
    if kind == "flip":
        bits = st.tuples(st.integers(0, region - 1), st.integers(0, 7))
        return kind, draw(st.lists(bits, min_size=1, max_size=8))
    if kind == "append":
        return kind, draw(st.binary(min_size=1, max_size=256))
    start = draw(st.integers(0, region - 1))
    if kind == "zero":
        return kind, start, draw(st.integers(1, 64))
    return kind, start, draw(st.binary(min_size=1, max_size=64))


def _apply(data: bytes, mutation: tuple) -> bytes:
    kind, *args = mutation
    out = bytearray(data)
    if kind == "truncate":
        return data[: args[0]]
    if kind == "flip":
        for pos, bit in args[0]:
            out[pos] ^= 1 << bit
    elif kind == "append":
        out += args[0]
    else:
        start, run = args
        run = run if kind == "rewrite" else bytes(run)  # "zero": `run` zero bytes
        run = run[: len(out) - start]  # within the file: it keeps its size
        out[start : start + len(run)] = run
    return bytes(out)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def _write(folder, fmt: str, data: bytes):
    # a new file each time: a zip is memory-mapped, rewriting one in place would change
    # (or cut short) the tensors of an earlier load
    path = folder / f"ckpt{next(_names)}{FORMATS[fmt]}"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@settings(max_examples=2 * settings.default.max_examples, derandomize=True)
@given(data=st.data())
def test_damaged_checkpoint_loads_or_is_one_line_error(folder, fmt, data):
    intact = _intact(fmt)
    mutation = data.draw(damage(len(intact)), label="mutation")
    path = _write(folder, fmt, _apply(intact, mutation))
    try:
        load_timm_model(TINY, path, **KWARGS)
        event("loaded")
    except BadInputError as e:  # CheckpointError; KeyMismatchError for keys that do not fit
        assert e.exit_code == 2
        assert len(str(e).splitlines()) == 1, f"{mutation}: a message of several lines: {e}"
        event(type(e).__name__)
    finally:
        path.unlink()


def test_the_intact_files_load(folder):
    """The fuzzed files start from checkpoints that load (else every example is an error)."""
    expected = random_timm_model(TINY, seed=3, **KWARGS).state_dict()
    for fmt in FORMATS:
        model, ckpt = load_timm_model(TINY, _write(folder, fmt, _intact(fmt)), **KWARGS)
        assert ckpt.format == fmt
        for key, value in model.state_dict().items():
            assert torch.equal(value, expected[key]), f"{fmt}: {key}"


def _pickle_start(fmt: str, data: bytes) -> int:
    """Where the pickle of the state dict starts: a legacy file holds four pickles (magic
    number, protocol, system info, the object); a zip stores `data.pkl` uncompressed."""
    if fmt == "torch-pickle":
        stream = io.BytesIO(data)
        for _ in range(3):
            for _op in pickletools.genops(stream):
                pass
        return stream.tell()
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        (info,) = [i for i in archive.infolist() if i.filename.endswith("/data.pkl")]
    at = info.header_offset  # a local file header: 30 bytes, the name, the extra field
    name_len, extra_len = struct.unpack("<HH", data[at + 26 : at + 30])
    return at + 30 + name_len + extra_len


def _memo_miss(fmt: str) -> tuple:
    """Damage to the state dict's pickle: its first BINGET (a reference to an object pickled
    before) points to a memo slot that was never filled. torch's weights-only unpickler ended
    that in a bare `KeyError` on 0298799 (a zip's CRC is not checked either)."""
    data = _intact(fmt)
    stream = io.BytesIO(data)
    stream.seek(_pickle_start(fmt, data))
    ops = list(pickletools.genops(stream))
    used = {arg for op, arg, _ in ops if op.name in ("BINPUT", "LONG_BINPUT")}
    (pos,) = [pos for op, _, pos in ops if op.name == "BINGET"][:1]
    free = max(used) + 1
    assert free <= 255 and free not in used
    return "rewrite", pos + 1, bytes([free])


@pytest.mark.parametrize("fmt", ["torch-pickle", "torch-zip"])
def test_a_reference_to_a_missing_memo_entry_is_a_checkpoint_error(fmt, tmp_path):
    mutation = _memo_miss(fmt)
    assert mutation[1] < HEADER  # damage the fuzzer can make
    path = _write(tmp_path, fmt, _apply(_intact(fmt), mutation))
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        load_timm_model(TINY, path, **KWARGS)
    assert len(str(e.value).splitlines()) == 1


def test_a_dtype_rewritten_in_a_safetensors_header_is_a_checkpoint_error(tmp_path):
    """`F32` -> `I32` keeps every size right: the file reads, with integer weights."""
    data = _intact("safetensors")
    pos = data.index(b'"dtype":"F32"') + len(b'"dtype":"')
    path = _write(tmp_path, "safetensors", _apply(data, ("rewrite", pos, b"I")))
    with pytest.raises(CheckpointError, match="int32 values") as e:
        load_timm_model(TINY, path, **KWARGS)
    assert len(str(e.value).splitlines()) == 1


@pytest.mark.parametrize(
    "fmt, mutation",
    [
        pytest.param("safetensors", ("truncate", 4000), id="safetensors-truncated"),
        pytest.param("torch-zip", ("truncate", 4000), id="torch-zip-truncated"),
        pytest.param("torch-pickle", ("truncate", 4000), id="torch-pickle-truncated"),
        pytest.param("torch-pickle", None, id="torch-pickle-memo-miss"),
    ],
)
def test_convert_of_a_damaged_checkpoint_exits_2_with_one_line(fmt, mutation, tmp_path, capsys):
    path = _write(tmp_path, fmt, _apply(_intact(fmt), mutation or _memo_miss(fmt)))
    out = tmp_path / "out"
    argv = [
        "-q",
        "convert",
        TINY,
        str(out),
        "--checkpoint",
        str(path),
        "--num-classes",
        "10",
        "--img-size",
        "32",
    ]
    line = cli_error_line(argv, capsys, unchanged=tmp_path)
    assert "truncated" in line  # "is truncated", "truncated or corrupt"
