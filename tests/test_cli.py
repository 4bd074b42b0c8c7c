"""The command line: exit codes, one-line errors, nothing written on failure."""

import json
import os

import pytest
import timm

import deit_port.mapping
from deit_port import cli
from deit_port.mapping import timm_to_hf

from .util import TINY, TINY_DISTILLED, cli_error_line, one_error_line, run_python

TINY_ARGS = ["--init", "random", "--seed", "1"]


def test_convert_random_writes_a_loadable_folder(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["convert", TINY, str(out), *TINY_ARGS]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["ViTForImageClassification"]
    assert config["layer_norm_eps"] == 1e-6
    assert config["id2label"]["0"] == "tench, Tinca tinca"
    assert "parity PASS" in capsys.readouterr().out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp folder left"


def test_distilled_config_names_the_teacher_class(tmp_path):
    out = tmp_path / "out"
    assert cli.main(["convert", TINY_DISTILLED, str(out), *TINY_ARGS]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["DeiTForImageClassificationWithTeacher"]


def test_non_empty_output_is_refused_and_left_alone(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    line = cli_error_line(["convert", TINY, str(out), *TINY_ARGS], capsys, unchanged=tmp_path)
    assert "--overwrite" in line


def test_overwrite_replaces_the_whole_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model-00001-of-00009.safetensors").write_text("stale shard")
    assert cli.main(["convert", TINY, str(out), *TINY_ARGS, "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]


def test_unknown_model_suggests_names(capsys, tmp_path):
    argv = ["convert", "deit_tiny_patch16_244", str(tmp_path / "o"), *TINY_ARGS]
    line = cli_error_line(argv, capsys, unchanged=tmp_path)
    assert "unknown timm model" in line and "deit_tiny_patch16_224" in line


def test_non_deit_model_is_refused(capsys, tmp_path):
    argv = ["convert", "resnet18", str(tmp_path / "o"), *TINY_ARGS]
    line = cli_error_line(argv, capsys, unchanged=tmp_path)
    assert "not a timm VisionTransformer" in line


def test_parity_failure_exits_1_and_writes_nothing(tmp_path, monkeypatch, capsys):
    def swapped_norms(state_dict, spec, **kwargs):
        sd = timm_to_hf(state_dict, spec, **kwargs)
        a, b = (
            "vit.encoder.layer.0.layernorm_before.weight",
            "vit.encoder.layer.0.layernorm_after.weight",
        )
        sd[a], sd[b] = sd[b], sd[a]
        return sd

    monkeypatch.setattr(deit_port.mapping, "timm_to_hf", swapped_norms)
    argv = ["convert", TINY, str(tmp_path / "out"), *TINY_ARGS]
    line = cli_error_line(argv, capsys, code=1, unchanged=tmp_path)
    assert "parity FAIL" in line


def test_a_bug_keeps_its_traceback_and_exits_3(tmp_path, monkeypatch, capsys):
    """An exception deit_port did not raise on purpose is not reported as bad input."""

    def buggy(state_dict, spec, **kwargs):
        return state_dict.no_such_method()  # an AttributeError, as a bug would raise

    monkeypatch.setattr(deit_port.mapping, "timm_to_hf", buggy)
    out = tmp_path / "out"
    assert cli.main(["-q", "convert", TINY, str(out), *TINY_ARGS]) == 3
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "AttributeError" in err
    assert "internal error" in err.strip().splitlines()[-1]
    assert list(tmp_path.iterdir()) == []


def test_pretrained_offline_fails_clearly_without_fallback(tmp_path):
    out = tmp_path / "out"
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-cache")}
    r = run_python("-m", "deit_port.cli", "convert", TINY, str(out), env=env)
    assert r.returncode == 2, r.stderr
    line = one_error_line(r.stderr)
    assert line.startswith("deit-port: error: pretrained weights for deit_tiny_patch16_224")
    assert "--init random" in line
    assert not out.exists()


def test_seed_interface_runs_as_a_module(tmp_path):
    out = tmp_path / "out"
    r = run_python(
        "-m",
        "deit_port.convert",
        "--deit_name",
        "vit_deit_tiny_distilled_patch16_224",
        "--pytorch_dump_folder_path",
        str(out),
        "--init",
        "random",
    )
    assert r.returncode == 0, r.stderr
    assert (out / "model.safetensors").is_file()
    assert "parity PASS" in r.stdout


def test_list_prints_every_deit_name_timm_registers(capsys):
    """One name a line, sorted: exactly timm's DeiT names (however many this timm has), among
    them each family's (plain, distilled, DeiT III)."""
    registered = timm.list_models("deit*")
    assert {TINY, TINY_DISTILLED, "deit3_huge_patch14_224"} <= set(registered)
    assert cli.main(["list"]) == 0
    assert capsys.readouterr().out.splitlines() == sorted(set(registered))


@pytest.mark.parametrize("argv", [[], ["convert"], ["convert", TINY]])
def test_usage_errors_exit_2(argv):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2


def test_output_gets_ordinary_permissions(tmp_path):
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        assert cli.main(["convert", TINY, str(out), *TINY_ARGS, "--no-verify", "-q"]) == 0
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {
        p.name: 0o644 for p in out.iterdir()
    }
