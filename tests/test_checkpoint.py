"""Reading weights from a checkpoint file: formats, wrappers and EMA, prefixes, DeiT III names,
building the model from it, other VisionTransformers, and the offline scenario from a .pth to a
transformers pipeline."""

import argparse
import json
import logging
import textwrap

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from deit_port import cli
from deit_port.arch import ArchSpec
from deit_port.checkpoint import read_checkpoint, remap_state_dict
from deit_port.convert import convert_deit_checkpoint
from deit_port.errors import CheckpointError
from deit_port.mapping import timm_to_hf
from deit_port.parity import parity_inputs, synthetic_image
from deit_port.source import load_timm_model

from .util import (
    TINY,
    assert_state_dicts_equal,
    model_output,
    random_timm_model,
    run_python,
    save_checkpoint,
    state_dict_copy,
)

ATOL = 1e-4  # float32 parity measured on these variants (the contract is 1e-3)


@pytest.fixture(scope="module")
def tiny():
    return random_timm_model(TINY, seed=3)


@pytest.fixture(scope="module")
def tiny_ema():
    return random_timm_model(TINY, seed=4)


# --- formats -------------------------------------------------------------------------------

FORMATS = [
    ("safetensors", "w.safetensors"),
    ("torch-zip", "w.pth"),
    ("torch-zip", "w.bin"),
    ("torch-pickle", "w.pt"),
]


@pytest.mark.parametrize(("how", "name"), FORMATS, ids=[f"{h}-{n}" for h, n in FORMATS])
def test_every_format_reads_bitwise(tiny, tmp_path, how, name):
    sd = state_dict_copy(tiny)
    ckpt = read_checkpoint(save_checkpoint(sd, tmp_path / name, how))
    assert ckpt.format == how
    assert ckpt.entry is None and not ckpt.ema
    assert_state_dicts_equal(ckpt.state_dict, sd, name)


@pytest.mark.parametrize(
    ("how", "name", "mapped"),
    [
        ("safetensors", "w.safetensors", True),
        ("torch-zip", "w.pth", True),
        ("torch-zip", "w.safetensors", False),  # torch.load reads it into memory
        ("torch-pickle", "w.pth", False),
    ],
    ids=["safetensors", "torch-zip", "torch-zip-as-safetensors", "torch-pickle"],
)
def test_remap_reads_the_same_weights_through_a_new_map(tiny, tmp_path, how, name, mapped):
    """What convert writes from: the checked weights again, bit for bit, from other memory
    (a new map of the file); None where the weights are not memory-mapped."""
    sd = {f"module.{k}": v for k, v in state_dict_copy(tiny).items()}  # cleaned again on the way
    obj = sd if how == "safetensors" else {"model": sd, "epoch": 3}
    ckpt = read_checkpoint(save_checkpoint(obj, tmp_path / name, how))
    again = remap_state_dict(ckpt)
    if not mapped:
        assert again is None
        return
    assert_state_dicts_equal(again, ckpt.state_dict, f"{how} remapped")
    first = {t.untyped_storage().data_ptr() for t in ckpt.state_dict.values()}
    assert not first & {t.untyped_storage().data_ptr() for t in again.values()}


def test_remap_leaves_converted_weights_alone_and_sees_a_changed_file(tiny, tmp_path):
    half = save_checkpoint(
        {k: v.half() for k, v in state_dict_copy(tiny).items()},
        tmp_path / "h.safetensors",
        "safetensors",
    )
    assert remap_state_dict(read_checkpoint(half)) is None  # float16: converted when loaded
    path = save_checkpoint(state_dict_copy(tiny), tmp_path / "w.safetensors", "safetensors")
    ckpt = read_checkpoint(path)
    other = state_dict_copy(tiny)
    other["head.weight"] = other["head.weight"][:10]
    save_file(other, path)  # replaced on disk while converting
    with pytest.raises(CheckpointError, match="changed while it was being converted"):
        remap_state_dict(ckpt)


@pytest.mark.parametrize("how, name", [("safetensors", "w.safetensors"), ("torch-zip", "w.pth")])
def test_converted_from_a_new_map_the_written_weights_are_the_mapping(tmp_path, how, name):
    """DeiT III (layer scale folded in place, into the new map's private pages): the written
    file holds exactly `timm_to_hf` of the checkpoint's weights; the checkpoint is unchanged."""
    model = random_timm_model("deit3_small_patch16_224", seed=6, depth=2)
    path = save_checkpoint(state_dict_copy(model), tmp_path / name, how)
    before = path.read_bytes()
    report = convert_deit_checkpoint(
        "deit3_small_patch16_224", tmp_path / "out", checkpoint=path, model_kwargs={"depth": 2}
    )
    assert report.passed, report.summary()
    expected = timm_to_hf(state_dict_copy(model), ArchSpec.from_timm(model))
    written = load_file(tmp_path / "out" / "model.safetensors")
    assert_state_dicts_equal(written, {k: v.contiguous() for k, v in expected.items()}, how)
    assert path.read_bytes() == before


RENAMED = [
    ("safetensors", "w.pth"),
    ("torch-zip", "w.safetensors"),
    ("torch-pickle", "w.safetensors"),
]


@pytest.mark.parametrize(("how", "name"), RENAMED, ids=[f"{h}-as-{n}" for h, n in RENAMED])
def test_a_renamed_file_is_read_by_its_content(tiny, tmp_path, how, name, caplog):
    """The format comes from the bytes; the extension only earns a warning."""
    sd = state_dict_copy(tiny)
    with caplog.at_level(logging.WARNING, logger="deit_port"):
        ckpt = read_checkpoint(save_checkpoint(sd, tmp_path / name, how))
    assert ckpt.format == how
    assert_state_dicts_equal(ckpt.state_dict, sd, name)
    assert any(name in r.getMessage() and "holds" in r.getMessage() for r in caplog.records)


# --- wrappers and EMA ----------------------------------------------------------------------


def test_facebookresearch_deit_release_checkpoint(tiny, tmp_path):
    """As facebookresearch/deit ships its weights: {"model": state_dict}, plus training extras
    that are ignored when "model" is there."""
    sd = state_dict_copy(tiny)
    path = tmp_path / "deit_tiny_patch16_224-a1311bcf.pth"
    torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": []}, "epoch": 299}, path)
    ckpt = read_checkpoint(path)
    assert (ckpt.entry, ckpt.ema, ckpt.ignored) == ("model", False, ("epoch", "optimizer"))
    assert_state_dicts_equal(ckpt.state_dict, sd, "model")


def test_facebookresearch_deit_training_checkpoint(tiny, tiny_ema, tmp_path):
    """facebookresearch/deit's main.py saves model, model_ema, optimizer, lr_scheduler, epoch,
    scaler and `args` (an argparse.Namespace, allowed as timm allows it)."""
    sd, ema_sd = state_dict_copy(tiny), state_dict_copy(tiny_ema)
    param = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([param], lr=5e-4)
    param.grad = torch.ones(3)
    opt.step()
    path = tmp_path / "checkpoint.pth"
    torch.save(
        {
            "model": sd,
            "optimizer": opt.state_dict(),
            "lr_scheduler": {"last_epoch": 3},
            "epoch": 3,
            "model_ema": ema_sd,
            "scaler": {"scale": 65536.0},
            "args": argparse.Namespace(model=TINY, lr=5e-4, data_path="/imagenet"),
        },
        path,
    )
    with pytest.raises(CheckpointError, match=r"--ema or --no-ema"):
        read_checkpoint(path)
    plain = read_checkpoint(path, ema=False)
    assert (plain.entry, plain.ema) == ("model", False)
    assert "args" in plain.ignored and "model_ema" in plain.ignored
    assert_state_dicts_equal(plain.state_dict, sd, "model")
    ema = read_checkpoint(path, ema=True)
    assert (ema.entry, ema.ema) == ("model_ema", True)
    assert_state_dicts_equal(ema.state_dict, ema_sd, "model_ema")
    assert "EMA" in ema.describe() and "model_ema" in ema.describe()


@pytest.mark.parametrize(
    ("layout", "ema", "entry"),
    [
        ("state_dict", None, "state_dict"),
        ("state_dict_ema", None, "state_dict_ema"),
        ("state_dict+state_dict_ema", True, "state_dict_ema"),
        ("state_dict+state_dict_ema", False, "state_dict"),
    ],
)
def test_timm_training_checkpoint_entries(tiny, tiny_ema, tmp_path, layout, ema, entry):
    sd, ema_sd = state_dict_copy(tiny), state_dict_copy(tiny_ema)
    values = {"state_dict": sd, "state_dict_ema": ema_sd}
    obj = {k: values[k] for k in layout.split("+")} | {"epoch": 10, "arch": TINY}
    ckpt = read_checkpoint(save_checkpoint(obj, tmp_path / "last.pth.tar", "torch-zip"), ema=ema)
    assert ckpt.entry == entry and ckpt.ema == entry.endswith("ema")
    assert_state_dicts_equal(ckpt.state_dict, values[entry], entry)


def test_ema_flags_need_the_weights_they_name(tiny, tmp_path):
    plain = save_checkpoint({"model": state_dict_copy(tiny)}, tmp_path / "plain.pth", "torch-zip")
    with pytest.raises(CheckpointError, match=r"no EMA weights.*drop --ema"):
        read_checkpoint(plain, ema=True)
    only_ema = save_checkpoint(
        {"model_ema": state_dict_copy(tiny)}, tmp_path / "ema.pth", "torch-zip"
    )
    with pytest.raises(CheckpointError, match=r"only EMA weights.*pass --ema"):
        read_checkpoint(only_ema, ema=False)
    assert read_checkpoint(only_ema).ema  # the only weights there are, reported as EMA


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "_orig_mod.module."])
def test_wrapper_prefixes_are_stripped(tiny, tmp_path, prefix):
    sd = state_dict_copy(tiny)
    path = save_checkpoint(
        {prefix + k: v for k, v in sd.items()}, tmp_path / "ddp.safetensors", "safetensors"
    )
    assert_state_dicts_equal(read_checkpoint(path).state_dict, sd, prefix)


def test_original_deit3_gamma_names_load(tmp_path):
    """facebookresearch/deit's DeiT III (models_v2.py) names layer scale gamma_1/gamma_2."""
    model = random_timm_model("deit3_small_patch16_224", seed=5)
    sd = state_dict_copy(model)
    original = {
        k.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2"): v
        for k, v in sd.items()
    }
    assert "blocks.0.gamma_1" in original and "blocks.0.ls1.gamma" not in original
    path = save_checkpoint({"model": original}, tmp_path / "deit_3_small_224_1k.pth", "torch-zip")
    loaded, _ = load_timm_model("deit3_small_patch16_224", path)
    assert_state_dicts_equal(state_dict_copy(loaded), sd, "deit3")
    x = parity_inputs(model, n=2, seed=0)
    assert torch.equal(model_output(loaded, x), model_output(model, x))


# --- building the model from a checkpoint --------------------------------------------------


def test_load_timm_model_assigns_the_checkpoint(tiny, tmp_path):
    sd = state_dict_copy(tiny)
    path = save_checkpoint(sd, tmp_path / "w.safetensors", "safetensors")
    torch.manual_seed(0)
    expected_draw = torch.rand(4)
    torch.manual_seed(0)
    model, ckpt = load_timm_model(TINY, path)
    # no throwaway random init ran: timm's init would have advanced the global generator
    assert torch.equal(torch.rand(4), expected_draw)
    assert not model.training and ckpt.format == "safetensors"
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    assert_state_dicts_equal(state_dict_copy(model), sd, "model")
    x = parity_inputs(tiny, n=2, seed=1)
    assert torch.equal(model_output(model, x), model_output(tiny, x))


def test_half_precision_checkpoint_is_computed_in_float32(tiny, tmp_path):
    half = {k: v.half() for k, v in state_dict_copy(tiny).items()}
    model, _ = load_timm_model(
        TINY, save_checkpoint(half, tmp_path / "w16.safetensors", "safetensors")
    )
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, half[name].float()), name


def test_finite_weights_whose_sum_overflows_are_read(tmp_path):
    """The NaN/Inf check sums each tensor: a finite tensor whose float32 sum overflows
    (2 x 3e38 > 3.4e38) is counted exactly, and read."""
    sd = {"big": torch.tensor([3e38, 3e38, -1.0]), "half": torch.full((8,), 6e4).half()}
    ckpt = read_checkpoint(save_checkpoint(sd, tmp_path / "w.safetensors", "safetensors"))
    assert all(torch.equal(ckpt.state_dict[k], v) for k, v in sd.items())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=str)
def test_nan_or_inf_is_found_in_every_float_dtype(tmp_path, dtype, bad):
    values = torch.linspace(-2, 2, 301).to(dtype)
    values[150] = bad
    path = save_checkpoint(
        {"ok": torch.ones(3), "w": values}, tmp_path / "w.safetensors", "safetensors"
    )
    with pytest.raises(CheckpointError, match=r"'w' holds 1 NaN/Inf value"):
        read_checkpoint(path)


@pytest.mark.parametrize("name", ["vit_deit_tiny_patch16_224", "deit_tiny_patch16_224.fb_in1k"])
def test_legacy_and_tagged_names_take_a_checkpoint(tiny, tmp_path, name):
    path = save_checkpoint({"model": state_dict_copy(tiny)}, tmp_path / "w.pth", "torch-zip")
    model, _ = load_timm_model(name, path)
    assert_state_dicts_equal(state_dict_copy(model), state_dict_copy(tiny), name)


# --- other VisionTransformers --------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "size"),
    [
        pytest.param("vit_tiny_patch16_224", 224, id="vit_tiny_patch16_224"),
        pytest.param(
            "vit_small_patch16_384", 384, id="vit_small_patch16_384", marks=pytest.mark.slow
        ),
    ],
)
def test_other_vision_transformers_convert(tmp_path, name, size, capsys):
    out = tmp_path / "out"
    assert cli.main(["convert", name, str(out), "--init", "random", "--seed", "2", "-q"]) == 0
    assert "parity PASS" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["image_size"] == size and config["architectures"] == ["ViTForImageClassification"]


# --- the acceptance scenario ------------------------------------------------------------


def test_acceptance_offline_deit_pth_to_pipeline(tiny, tmp_path):
    """A user, offline, converts a .pth written as facebookresearch/deit writes it and loads
    the result with pipeline("image-classification", model=OUTPUT_DIR)."""
    ckpt = tmp_path / "deit_tiny_patch16_224-a1311bcf.pth"
    torch.save({"model": state_dict_copy(tiny)}, ckpt)
    out = tmp_path / "deit-tiny-hf"
    image = tmp_path / "image.png"
    synthetic_image(3).save(image)
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-cache")}
    script = textwrap.dedent(f"""
        import json
        from deit_port import cli
        assert cli.main(["convert", {TINY!r}, {str(out)!r}, "--checkpoint", {str(ckpt)!r}]) == 0
        from transformers import pipeline
        classify = pipeline("image-classification", model={str(out)!r})
        print(json.dumps(classify({str(image)!r})))
    """)
    r = run_python("-c", script, env=env)
    assert r.returncode == 0, r.stderr
    assert (out / "preprocessor_config.json").is_file(), "pipeline() needs the image processor"
    result = json.loads(r.stdout.strip().splitlines()[-1])
    info = timm.data.ImageNetInfo()
    names = {info.index_to_description(i) for i in range(1000)}
    assert len(result) == 5
    assert all(any(p["label"].startswith(n) for n in names) for p in result), result
    scores = [p["score"] for p in result]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-6
