"""Layer-by-layer parity: `check_parity(..., layers=True)`, `verify --layers`, `convert --layers`.

Every stage (embeddings, each block's output, the final norm, the tokens the heads read, the
logits) is compared; a failure names the first stage past the tolerance. The mutation tests
(tests/test_mutations.py) check the named stage for each single wrong step of a converter.
"""

import re
import shutil

import pytest
from safetensors.torch import load_file, save_file

import deit_port.mapping
from deit_port import cli
from deit_port.convert import convert_timm_model
from deit_port.parity import DEFAULT_ATOL, check_parity, parity_inputs

from .util import TINY, TINY_DISTILLED, nothing_written, one_error_line, random_timm_model

SEED = 11
RANDOM = ["--init", "random", "--seed", str(SEED)]
DEPTH = 12  # deit_tiny_patch16_224
STAGES = [
    "embeddings",
    *(f"block {i} output" for i in range(DEPTH)),
    "final norm",
    "class token",
    "logits",
]
# a table row: stage, max |diff|, mean |diff|, and the mark on the first divergence
ROW = re.compile(r"^(\S.*?)\s+(\S+)\s+(\S+)(  <- first divergence)?$")


@pytest.fixture(scope="module", params=[TINY])  # the param puts the variant in the test ids
def shared(request, converted_variant):
    """The session's shared conversion of the variant (tests/variants.py, read only): its
    folder, and its timm weights as the checkpoint `verify` compares with."""
    return converted_variant(request.param)


def _table(out: str) -> dict[str, tuple[float, float, bool]]:
    """The per-stage table printed by the CLI: stage -> (max, mean, marked first)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("stage "))
    rows = {}
    for line in lines[start + 1 :]:
        m = ROW.match(line)
        if not m or line.startswith("parity "):
            break
        rows[m.group(1)] = (float(m.group(2)), float(m.group(3)), bool(m.group(4)))
    return rows


def test_verify_layers_prints_every_stage(shared, capsys):
    source = ["--checkpoint", str(shared.checkpoint)]
    assert cli.main(["verify", str(shared.folder), TINY, *source, "--layers", "-q"]) == 0
    out = capsys.readouterr().out
    rows = _table(out)
    assert list(rows) == STAGES, out
    for stage, (mx, mean, marked) in rows.items():
        assert mx <= DEFAULT_ATOL and mean <= mx and not marked, (stage, out)
    assert "parity PASS" in out and "first divergence" not in out


def test_swapped_mlp_of_blocks_5_and_6_first_diverges_at_block_5(shared, tmp_path, capsys):
    """The acceptance case: block 5's MLP weights swapped with block 6's in the written file."""
    broken = tmp_path / "swapped"
    shutil.copytree(shared.folder, broken)
    weights = load_file(broken / "model.safetensors")
    for name in ("intermediate.dense.weight", "output.dense.weight"):
        a, b = f"vit.encoder.layer.5.{name}", f"vit.encoder.layer.6.{name}"
        weights[a], weights[b] = weights[b], weights[a]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})

    source = ["--checkpoint", str(shared.checkpoint)]
    with nothing_written(tmp_path):
        assert cli.main(["verify", str(broken), TINY, *source, "--layers", "-q"]) == 1
    captured = capsys.readouterr()
    rows = _table(captured.out)
    assert list(rows) == STAGES, captured.out
    # blocks 0-4 still match at the verify tolerance; block 5 is where the two models part
    for stage in STAGES[:6]:
        assert rows[stage][0] <= DEFAULT_ATOL, (stage, captured.out)
    assert rows["block 5 output"][0] > DEFAULT_ATOL and rows["block 5 output"][2], captured.out
    assert [s for s, row in rows.items() if row[2]] == ["block 5 output"], captured.out
    assert re.search(
        r"parity FAIL: .*; first divergence: block 5 output, max \|diff\| \S+", captured.out
    ), captured.out
    assert "first divergence: block 5 output" in one_error_line(captured.err)


@pytest.mark.parametrize("variant", [TINY])
def test_convert_layers_prints_the_table(variant, tmp_path, capsys):
    out = tmp_path / "hf"
    assert cli.main(["convert", variant, str(out), *RANDOM, "--layers", "-q"]) == 0
    printed = capsys.readouterr().out
    assert list(_table(printed)) == STAGES, printed
    assert "parity PASS" in printed


@pytest.mark.parametrize("variant", [TINY])
def test_convert_layers_names_the_first_divergence_and_writes_nothing(
    variant, tmp_path, capsys, monkeypatch
):
    """A converter bug in block 3 (its attention output projection zeroed) fails the
    conversion with exit 1; the message and the table name block 3."""
    right = deit_port.mapping.timm_to_hf

    def wrong(state_dict, spec, **kwargs):
        hf = right(state_dict, spec, **kwargs)
        key = "vit.encoder.layer.3.attention.output.dense.weight"
        hf[key] = hf[key] * 0
        return hf

    monkeypatch.setattr(deit_port.mapping, "timm_to_hf", wrong)
    with nothing_written(tmp_path):
        assert cli.main(["convert", variant, str(tmp_path / "hf"), *RANDOM, "--layers", "-q"]) == 1
    captured = capsys.readouterr()
    assert [s for s, row in _table(captured.out).items() if row[2]] == ["block 3 output"]
    assert "first divergence: block 3 output" in one_error_line(captured.err)


@pytest.mark.parametrize("variant", [TINY])
def test_layers_and_no_verify_exclude_each_other(variant, tmp_path, capsys):
    with nothing_written(tmp_path), pytest.raises(SystemExit) as exc:
        cli.main(["convert", variant, str(tmp_path / "hf"), *RANDOM, "--layers", "--no-verify"])
    assert exc.value.code == 2
    assert "not allowed with" in capsys.readouterr().err


@pytest.mark.parametrize(
    "variant, tokens",
    [
        pytest.param("deit3_small_patch16_224", ["class token"], id="deit3_small_patch16_224"),
        pytest.param(TINY_DISTILLED, ["class token", "distillation token"], id=TINY_DISTILLED),
    ],
)
def test_stages_of_each_family(variant, tokens):
    """DeiT III (position embedding added before the class token is prepended) and the
    distilled model (two tokens, two heads) match stage by stage, at depth 2."""
    timm_model = random_timm_model(variant, seed=SEED, depth=2)
    hf_model = convert_timm_model(random_timm_model(variant, seed=SEED, depth=2))
    report = check_parity(timm_model, hf_model, parity_inputs(timm_model), layers=True)
    stages = [s.stage for s in report.layers]
    assert stages == [
        "embeddings",
        "block 0 output",
        "block 1 output",
        "final norm",
        *tokens,
        "logits",
    ]
    assert report.passed and report.first_divergence is None, report.table()


@pytest.mark.parametrize("variant", [TINY])
def test_stages_of_a_base_model(variant):
    """num_classes=0: the output is the final norm's hidden states; no token or logit stage."""
    timm_model = random_timm_model(variant, seed=SEED, depth=2, num_classes=0)
    hf_model = convert_timm_model(random_timm_model(variant, seed=SEED, depth=2, num_classes=0))
    report = check_parity(timm_model, hf_model, parity_inputs(timm_model), layers=True)
    assert [s.stage for s in report.layers] == [
        "embeddings",
        "block 0 output",
        "block 1 output",
        "final norm",
    ]
    assert report.output == "hidden states" and report.passed, report.table()
