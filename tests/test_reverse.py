"""`deit-port to-timm`: a transformers folder back to a timm checkpoint that timm loads offline.

Each folder is written by the forward converter from a seeded random timm model; the
checkpoint written back is loaded the way a user loads it,
`timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": ...})`, with the
network switched off, and compared with the original timm model tensor by tensor.
"""

import io
import json
import re
import socket
import sys

import pytest
import safetensors.torch
import timm
import torch
import transformers
from safetensors.torch import load_file, save_file

import deit_port.hf_folder
import deit_port.mapping
import deit_port.reverse
from deit_port import cli
from deit_port.convert import convert_deit_checkpoint
from deit_port.mapping import hf_to_timm
from deit_port.parity import parity_inputs

from .util import (
    ATOL_MEASURED,
    TINY,
    TINY_DISTILLED,
    assert_state_dicts_equal,
    cli_error_line,
    model_output,
    random_timm_model,
)

SEED = 11
SMALL = {"num_classes": 10, "img_size": 64}  # 16 patches: fast, and not the names' defaults
# Not a registered size: written for `deit_tiny_patch16_224` with architecture kwargs.
SHALLOW = {"num_classes": 7, "img_size": 32, "depth": 2}


@pytest.fixture(scope="module")
def folders(tmp_path_factory, converted_variant):
    """Transformers folders written by `convert_deit_checkpoint`, built once per module (a
    registered variant as it is: the session's shared one, tests/variants.py). Read only."""
    root = tmp_path_factory.mktemp("hf")
    made = {}

    def get(name: str, **kwargs) -> tuple:
        if not kwargs:
            shared = converted_variant(name)
            return shared.folder, shared.timm_model
        key = (name, tuple(sorted(kwargs.items())))
        if key not in made:
            out = root / f"{name}-{len(made)}"
            convert_deit_checkpoint(
                name, out, init="random", seed=SEED, model_kwargs=kwargs, verify=False
            )
            made[key] = out
        return made[key], random_timm_model(name, seed=SEED, **kwargs)

    return get


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _to_timm_argv(*args) -> list[str]:
    """`deit-port -q to-timm ARGS...`."""
    return ["-q", "to-timm", *map(str, args)]


def _to_timm(*args) -> int:
    return cli.main(_to_timm_argv(*args))


@pytest.mark.parametrize(
    "variant, kwargs",
    [
        pytest.param(TINY, {}, id="deit_tiny"),
        pytest.param(TINY_DISTILLED, SMALL, id="deit_tiny_distilled-10-classes"),
        pytest.param(TINY, SHALLOW | {"num_classes": 0}, id="deit_tiny-depth2-headless"),
    ],
)
def test_round_trip_gives_back_the_timm_model_bit_for_bit(
    variant, kwargs, folders, offline, tmp_path, capsys
):
    hf_dir, original = folders(variant, **kwargs)
    out = tmp_path / "back.safetensors"
    assert _to_timm(hf_dir, out) == 0
    stdout = capsys.readouterr().out
    assert f"(timm {variant})" in stdout and "parity PASS" in stdout
    assert "load with: timm.create_model(" in stdout

    overlay = {"file": str(out)} | (
        {"num_classes": kwargs["num_classes"]} if "num_classes" in kwargs else {}
    )
    loaded = timm.create_model(
        variant, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs
    ).eval()
    assert_state_dicts_equal(loaded.state_dict(), original.state_dict(), "timm -> HF -> timm")
    assert_state_dicts_equal(load_file(out), original.state_dict(), "written file")
    assert [p.name for p in tmp_path.iterdir()] == ["back.safetensors"], "temp file left"


def test_deit3_is_written_for_a_deit3_name_and_computes_the_same(folders, offline, tmp_path):
    """A DeiT III folder goes back to DeiT III with `--model`: layer scale as ones (the scale
    stays folded in the weights), position embedding without the class-token row; the same
    logits. Without `--model` it is a plain DeiT (transformers cannot tell them apart)."""
    hf_dir, original = folders("deit3_small_patch16_224", **SMALL)
    out = tmp_path / "deit3.safetensors"
    assert _to_timm(hf_dir, out, "--model", "deit3_small_patch16_224") == 0
    overlay = {"file": str(out), "num_classes": 10}
    loaded = timm.create_model(
        "deit3_small_patch16_224", pretrained=True, pretrained_cfg_overlay=overlay, **SMALL
    ).eval()
    sd, source = loaded.state_dict(), original.state_dict()
    assert torch.equal(sd["blocks.3.ls2.gamma"], torch.ones(384))
    assert not torch.equal(sd["blocks.3.mlp.fc2.weight"], source["blocks.3.mlp.fc2.weight"])
    assert torch.equal(sd["pos_embed"], source["pos_embed"])
    x = parity_inputs(original, n=4, seed=SEED)
    torch.testing.assert_close(
        model_output(loaded, x), model_output(original, x), atol=ATOL_MEASURED, rtol=0
    )

    spec = deit_port.hf_folder.read_hf_folder(hf_dir)[2]
    assert not spec.layer_scale
    assert deit_port.reverse.timm_target(spec).name == "deit_small_patch16_224"


def _native_vit(folder, **config_kwargs):
    """A ViT trained in transformers (not converted): eps 1e-12, not a registered DeiT size."""
    settings = {
        "hidden_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 3,
        "intermediate_size": 96,
        "image_size": 32,
        "patch_size": 8,
        "num_labels": 5,
    }
    config = transformers.ViTConfig(**(settings | config_kwargs))
    torch.manual_seed(SEED)
    model = transformers.ViTForImageClassification(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("channels", [3, 1])
def test_a_native_transformers_vit_becomes_a_timm_model_with_kwargs(
    channels, offline, tmp_path, capsys
):
    hf_model = _native_vit(tmp_path / "vit", num_channels=channels)
    out = tmp_path / "vit.safetensors"
    assert _to_timm(tmp_path / "vit", out) == 0
    stdout = capsys.readouterr().out
    assert "parity PASS" in stdout and "embed_dim=48" in stdout and "norm_layer=functools" in stdout

    target = deit_port.reverse.timm_target(deit_port.hf_folder.read_hf_folder(tmp_path / "vit")[2])
    assert target.name == TINY
    assert target.kwargs["embed_dim"] == 48 and target.kwargs["depth"] == 2
    loaded = target.create(out)
    assert loaded.norm.eps == 1e-12, "the config's eps must survive"
    assert loaded.blocks[1].mlp.fc1.out_features == 96
    assert loaded.patch_embed.proj.in_channels == channels
    x = torch.randn(3, channels, 32, 32, generator=torch.Generator().manual_seed(SEED))
    torch.testing.assert_close(
        model_output(loaded, x), model_output(hf_model, x), atol=ATOL_MEASURED, rtol=0
    )


def test_existing_output_is_refused_then_replaced_with_overwrite(folders, tmp_path, capsys):
    hf_dir, _ = folders(TINY, **SHALLOW)
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"mine")
    assert "--overwrite" in cli_error_line(_to_timm_argv(hf_dir, out), capsys, unchanged=tmp_path)
    assert _to_timm(hf_dir, out, "--overwrite") == 0
    assert "head.weight" in load_file(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


def test_parity_failure_exits_1_and_writes_nothing(folders, tmp_path, capsys, monkeypatch):
    """A mapping that swaps query and key of block 0: the gate must stop it."""
    hf_dir, _ = folders(TINY, **SHALLOW)

    def wrong_mapping(state_dict, spec):
        sd = hf_to_timm(state_dict, spec)
        w = sd["blocks.0.attn.qkv.weight"]
        d = spec.embed_dim
        sd["blocks.0.attn.qkv.weight"] = torch.cat((w[d : 2 * d], w[:d], w[2 * d :]))
        return sd

    monkeypatch.setattr(deit_port.mapping, "hf_to_timm", wrong_mapping)
    argv = _to_timm_argv(hf_dir, tmp_path / "out.safetensors")
    assert "parity FAIL" in cli_error_line(argv, capsys, code=1, unchanged=tmp_path)


def _bad_folder(tmp_path, what):
    folder = tmp_path / "in"
    if what == "no folder":
        return folder
    if what == "bert":
        transformers.BertConfig(hidden_size=8, num_attention_heads=2).save_pretrained(folder)
        return folder
    _native_vit(folder, **({"hidden_act": "relu"} if what == "relu" else {}))
    if what == "no weights":
        (folder / "model.safetensors").unlink()
    if what == "pooler":  # a ViTModel with pooler: timm has no pooler
        sd = load_file(folder / "model.safetensors")
        sd["vit.pooler.dense.weight"] = torch.zeros(48, 48)
        save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize(
    "what, args, message",
    [
        pytest.param("no folder", [], "not a folder", id="no-folder"),
        pytest.param("bert", [], "'bert' model", id="bert"),
        pytest.param("relu", [], "hidden_act 'relu'", id="relu"),
        pytest.param("no weights", [], "no model.safetensors", id="no-weights"),
        pytest.param("pooler", [], "unexpected 1 key [vit.pooler.dense.weight]", id="pooler"),
        pytest.param(
            "vit",
            ["--model", "deit_small_patch16_224"],
            "another architecture: embed_dim 384",
            id="other-architecture",
        ),
        pytest.param(
            "vit",
            ["--model", "deit_tny_patch16_224"],
            "did you mean deit_tiny_patch16_224",
            id="unknown-name",
        ),
        pytest.param("vit", ["--model", "resnet18"], "not a timm VisionTransformer", id="resnet"),
        pytest.param(
            "vit", ["--model", "vit_small_patch14_reg4_dinov2"], "register tokens", id="registers"
        ),
    ],
)
def test_bad_input_exits_2_with_one_line(what, args, message, tmp_path, capsys):
    folder = _bad_folder(tmp_path, what)
    argv = _to_timm_argv(folder, tmp_path / "out.safetensors", *args)
    assert message in cli_error_line(argv, capsys, unchanged=tmp_path)


@pytest.mark.parametrize(
    "name, message", [("out.pth", "must end in .safetensors"), ("dir.safetensors", "is a folder")]
)
def test_bad_output_names_exit_2(name, message, folders, tmp_path, capsys):
    hf_dir, _ = folders(TINY, **SHALLOW)
    out = tmp_path / name
    if name.startswith("dir"):
        out.mkdir()
    assert message in cli_error_line(_to_timm_argv(hf_dir, out), capsys, unchanged=tmp_path)


def test_sharded_folder_is_read_through_its_index(folders, tmp_path):
    """A folder in shards (`model.safetensors.index.json`) reads as the single file does."""
    hf_dir, _ = folders(TINY, **SHALLOW)
    sharded = tmp_path / "sharded"
    convert_deit_checkpoint(
        TINY,
        sharded,
        init="random",
        seed=SEED,
        model_kwargs=SHALLOW,
        verify=False,
        max_shard_size="200KB",
    )
    assert len(json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    _, single, spec = deit_port.hf_folder.read_hf_folder(hf_dir)
    _, shards, spec2 = deit_port.hf_folder.read_hf_folder(sharded)
    assert spec == spec2
    assert_state_dicts_equal(shards, single, "sharded")


def test_output_that_appears_meanwhile_is_not_replaced(folders, tmp_path, capsys, monkeypatch):
    """Another run publishes the file while this one writes and checks: exit 2, one line, the
    other run's file untouched, nothing left (tests/test_race.py has the mechanism's tests)."""
    hf_dir, _ = folders(TINY, **SHALLOW)  # before the patch below
    out = tmp_path / "out.safetensors"
    real = safetensors.torch.save_file

    def save_while_another_run_publishes(*args, **kwargs):
        real(*args, **kwargs)
        out.write_bytes(b"the other run's")

    monkeypatch.setattr(safetensors.torch, "save_file", save_while_another_run_publishes)
    line = cli_error_line(_to_timm_argv(hf_dir, out), capsys, unchanged=None)  # theirs appears
    assert "appeared while converting" in line
    assert out.read_bytes() == b"the other run's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


def test_progress_gets_the_steps_in_order(folders, tmp_path):
    hf_dir, _ = folders(TINY, **SHALLOW)
    steps = []
    deit_port.reverse.convert_hf_folder(hf_dir, tmp_path / "out.safetensors", progress=steps.append)
    assert steps == ["reading", "writing", "loading in timm", "verifying"]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_moves_on_a_terminal(folders, tmp_path, monkeypatch):
    """The bar `to-timm` shows counts its own steps (it stayed at 0% when the callback was
    dropped)."""
    hf_dir, _ = folders(TINY, **SHALLOW)
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert cli.main(["to-timm", str(hf_dir), str(tmp_path / "out.safetensors")]) == 0
    shown = re.findall(r"deit-port: ([a-z ]+):\s+(\d+)%", terminal.getvalue())
    seen = list(dict.fromkeys(shown))  # each update once, in order
    assert seen == [
        ("reading", "0"),
        ("writing", "25"),
        ("loading in timm", "50"),
        ("verifying", "75"),
        ("verifying", "100"),
    ], terminal.getvalue()
