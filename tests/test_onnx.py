"""`deit-port export-onnx`: the exported file, run by onnxruntime, computes what timm computes.

The three families (DeiT, distilled, DeiT III) and a headless model (num_classes=0) are exported at
depth 2 (the structure exported is that of 12 blocks, at a fraction of the export's time) and
checked here on their own, outside `export_onnx`: the written file is loaded with onnxruntime
and run on batches of 1 and 5, against timm at `ATOL_MEASURED` (1e-4). The fast set exports
DeiT tiny only (each export pays torch.export's tracing, whatever the depth); the other
families and a full-depth DeiT tiny through the command line run with `--runslow`; a bigger
model changes nothing the export does below the size where its weights go beside the graph,
which a small model is forced through in tests/test_onnx_external_data.py. Without the onnx extra these skip locally and fail under CI=true
(`need_module`): CI installs it.
"""

import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import deit_port.onnx_export
from deit_port import cli
from deit_port.convert import convert_deit_checkpoint
from deit_port.errors import ParityError
from deit_port.onnx_export import export_onnx
from deit_port.parity import parity_inputs

from .util import (
    ATOL_MEASURED,
    TINY,
    TINY_DISTILLED,
    cli_error_line,
    model_output,
    need_module,
    random_timm_model,
)

SEED = 31
RANDOM = ["--init", "random", "--seed", str(SEED)]
EXTRA_HINT = "pip install 'deit-port[onnx]'"

# (id, timm name, model kwargs): depth 2 keeps each export short
CASES = {
    TINY: (TINY, {"depth": 2}),
    TINY_DISTILLED: (TINY_DISTILLED, {"depth": 2}),
    "deit3_small_patch16_224": ("deit3_small_patch16_224", {"depth": 2}),
    f"{TINY}-headless": (TINY, {"depth": 2, "num_classes": 0}),
}
FAST = [TINY]


@pytest.fixture(scope="module")
def ort():
    return need_module("onnxruntime")


@dataclass
class Exported:
    """One case: the timm model, its converted folder, the ONNX file and the export report."""

    timm_model: torch.nn.Module
    folder: Path
    onnx_file: Path
    report: deit_port.onnx_export.OnnxReport


def build_export(case: str, root: Path) -> Exported:
    """The one place a case's timm model, folder and ONNX file are made."""
    name, kwargs = CASES[case]
    folder = root / case
    convert_deit_checkpoint(name, folder, init="random", seed=SEED, model_kwargs=kwargs)
    onnx_file = root / f"{case}.onnx"
    report = export_onnx(folder, onnx_file, name, init="random", seed=SEED, model_kwargs=kwargs)
    return Exported(random_timm_model(name, seed=SEED, **kwargs), folder, onnx_file, report)


@pytest.fixture(scope="module")
def exported(ort, tmp_path_factory):
    cache: dict[str, Exported] = {}
    root = tmp_path_factory.mktemp("onnx")

    def get(case: str) -> Exported:
        if case not in cache:
            cache[case] = build_export(case, root)
        return cache[case]

    return get


def _case_params():
    return [
        pytest.param(case, marks=() if case in FAST else pytest.mark.slow, id=case)
        for case in sorted(CASES)
    ]


@pytest.mark.parametrize("batch", [1, 5], ids=["batch1", "batch5"])
@pytest.mark.parametrize("case", _case_params())
def test_onnxruntime_matches_timm(case, batch, exported, ort, record_property):
    e = exported(case)
    session = ort.InferenceSession(str(e.onnx_file), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "pixel_values" and not isinstance(inp.shape[0], int), inp.shape  # dynamic
    x = parity_inputs(e.timm_model, n=batch, seed=SEED + 1)  # not the batch export_onnx used
    (y,) = session.run(None, {"pixel_values": x.numpy()})
    actual, expected = torch.from_numpy(y), model_output(e.timm_model, x)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    diff = (actual - expected).abs()
    record_property(
        "measured",
        [
            (
                f"onnxruntime vs timm, batch {batch}",
                case,
                f"max {diff.max():.3g}, mean {diff.mean():.3g}; export {e.report.export_seconds:.1f} s",
            ),
        ],
    )
    torch.testing.assert_close(
        actual,
        expected,
        atol=ATOL_MEASURED,
        rtol=0,
        msg=lambda m: f"{case}, batch {batch}: onnxruntime vs timm beyond {ATOL_MEASURED}: {m}",
    )


@pytest.mark.parametrize("case", _case_params())
def test_the_report_covers_both_references_and_batches(case, exported):
    report = exported(case).report
    assert report.passed, report.table()
    compared = [(c.compared, c.batch) for c in report.checks]
    assert compared == [
        ("transformers vs timm", 5),
        ("onnxruntime vs transformers", 1),
        ("onnxruntime vs timm", 1),
        ("onnxruntime vs transformers", 5),
        ("onnxruntime vs timm", 5),
    ]
    for c in report.checks[1:]:
        assert c.report.atol == ATOL_MEASURED and c.report.max_abs_diff <= ATOL_MEASURED, c
    assert report.output_name == ("last_hidden_state" if "headless" in case else "logits")


# --- the command line ------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[TINY])  # the param puts the variant in the test ids
def tiny(request, converted_variant):
    """The session's shared full-depth conversion of DeiT tiny (tests/variants.py, read only)."""
    return converted_variant(request.param)


@pytest.fixture
def tiny_folder(tiny):
    return tiny.folder


def _left(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


@pytest.mark.slow  # a 12-block export: the depth-2 cases above cover -k tiny
def test_cli_exports_a_full_deit_tiny(tiny, ort, tmp_path, capsys, record_property):
    out = tmp_path / "deit-tiny.onnx"
    source = ["--checkpoint", str(tiny.checkpoint)]  # the timm weights the folder was made from
    assert cli.main(["export-onnx", str(tiny.folder), str(out), TINY, *source, "-q"]) == 0
    printed = capsys.readouterr().out
    assert "ONNX parity PASS: onnxruntime vs transformers and timm on batches of 1 and 5" in printed
    assert re.search(r"^onnxruntime vs timm +5 ", printed, re.MULTILINE), printed
    summary = re.search(r"max \|diff\| (\S+) .*exported in (\S+) s", printed)
    value = f"max {float(summary.group(1)):.3g} over both batches and references"
    record_property(
        "measured",
        [
            ("export-onnx (CLI, 12 blocks)", TINY, f"{value}; export {summary.group(2)} s"),
        ],
    )
    assert _left(tmp_path) == ["deit-tiny.onnx"]  # no partial file left beside it
    timm_model = tiny.timm_model
    x = parity_inputs(timm_model, n=3, seed=SEED + 2)  # a third batch size
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"pixel_values": x.numpy()})
    torch.testing.assert_close(
        torch.from_numpy(y), model_output(timm_model, x), atol=ATOL_MEASURED, rtol=0
    )


def test_cli_parity_failure_exits_1_and_writes_nothing(tiny_folder, ort, tmp_path, capsys):
    """The folder holds the shared model's weights; timm's seed 32 model is another model."""
    out = tmp_path / "m.onnx"
    other = ["--init", "random", "--seed", str(SEED + 1)]
    argv = ["export-onnx", str(tiny_folder), str(out), TINY, *other, "-q"]
    error = cli_error_line(argv, capsys, code=1, unchanged=tmp_path)
    assert "ONNX parity FAIL: transformers vs timm" in error and "nothing was written" in error


@pytest.mark.parametrize("case", [TINY])
def test_an_onnx_mismatch_after_the_export_writes_nothing(case, exported, tmp_path, monkeypatch):
    """onnxruntime's outputs shifted by 1e-3 (as a wrong export would): ParityError, and the
    exported file is removed with its temporary folder. The export itself is the fixture's
    (torch's `export` replaced by one whose `save` writes that file): what is tested here is
    what follows an export."""
    e = exported(case)
    monkeypatch.setattr(torch.onnx, "export", lambda *args, **kwargs: _Saved(e.onnx_file))
    run = deit_port.onnx_export.run_onnx
    monkeypatch.setattr(deit_port.onnx_export, "run_onnx", lambda s, x: run(s, x) + 1e-3)
    out = tmp_path / "m.onnx"
    with pytest.raises(ParityError) as exc:
        export_onnx(e.folder, out, TINY, init="random", seed=SEED, model_kwargs={"depth": 2})
    bad = exc.value.report.first_failure
    assert (bad.compared, bad.batch) == ("onnxruntime vs transformers", 1)
    assert "ONNX parity FAIL: onnxruntime vs transformers, batch 1" in str(exc.value)
    assert _left(tmp_path) == []


class _Saved:
    """Stands in for torch's `ONNXProgram`: `save(path)` writes a file exported before."""

    def __init__(self, onnx_file: Path) -> None:
        self.onnx_file = onnx_file

    def save(self, path) -> None:
        shutil.copyfile(self.onnx_file, path)


@pytest.mark.parametrize("case", [TINY])
def test_weights_beside_the_file_are_published_too(case, exported, tmp_path, monkeypatch, ort):
    """Past 1.5 GB of weights torch writes them beside the .onnx, as NAME.onnx.data (here
    forced with torch's threshold at 0): both files are published, and the published .onnx
    runs from where it lies. Exported without MODEL (checked against the folder's transformers
    model only): this case compares the published file with timm itself, and the folder with
    timm was checked by the fixture's export."""
    from torch.onnx._internal.exporter import _onnx_program

    monkeypatch.setattr(_onnx_program, "_LARGE_MODEL_THRESHOLD", 0)
    e = exported(case)
    out = tmp_path / "m.onnx"
    export_onnx(e.folder, out)
    assert _left(tmp_path) == ["m.onnx", "m.onnx.data"]
    assert out.stat().st_size < (tmp_path / "m.onnx.data").stat().st_size
    x = parity_inputs(e.timm_model, n=2, seed=SEED)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"pixel_values": x.numpy()})
    torch.testing.assert_close(
        torch.from_numpy(y), model_output(e.timm_model, x), atol=ATOL_MEASURED, rtol=0
    )


def test_without_the_extra_it_says_which_to_install(tiny_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` fails
    out = tmp_path / "m.onnx"
    argv = ["export-onnx", str(tiny_folder), str(out), TINY, *RANDOM, "-q"]
    error = cli_error_line(argv, capsys, unchanged=tmp_path)
    assert "onnxruntime" in error and EXTRA_HINT in error, error


@pytest.mark.parametrize(
    "args, message",
    [
        (["{out}.txt"], "must end in .onnx"),
        (["{existing}"], "--overwrite"),
        (["{out}", "--checkpoint", "w.pth"], "give MODEL"),
        (["{out}", "--init", "random"], "give MODEL"),
    ],
    ids=["not-onnx", "exists", "checkpoint-without-model", "init-without-model"],
)
def test_bad_input_exits_2_and_writes_nothing(tiny_folder, ort, tmp_path, capsys, args, message):
    existing = tmp_path / "old.onnx"
    existing.write_bytes(b"mine")
    paths = {"out": tmp_path / "m.onnx", "existing": existing}
    argv = [a.format(**paths) for a in args]
    error = cli_error_line(
        ["export-onnx", str(tiny_folder), *argv, "-q"], capsys, unchanged=tmp_path
    )
    assert message in error


def test_not_a_model_folder_exits_2(ort, tmp_path, capsys):
    argv = ["export-onnx", str(tmp_path), str(tmp_path / "m.onnx"), "-q"]
    error = cli_error_line(argv, capsys, unchanged=tmp_path)
    assert "not a transformers model folder" in error
