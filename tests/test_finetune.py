"""Your own fine-tune, as it is: shapes read from the checkpoint, `auto`, a new resolution, the
class-token head.

Checkpoints are timm models with seeded random weights (`random_timm_model`), saved by the test;
the reference is always timm's own model (or timm's own loading path), never deit_port's code.
"""

import argparse
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModel, AutoModelForImageClassification

from deit_port import cli
from deit_port.errors import CheckpointError
from deit_port.parity import parity_inputs
from deit_port.shapes import TensorShapes, pick_variant
from deit_port.source import load_timm_model

from .util import (
    ATOL_MEASURED,
    TINY,
    TINY_DISTILLED,
    cli_error_line,
    model_output,
    random_timm_model,
)

CONVERT = ["-q", "convert"]
DEIT3_SMALL = "deit3_small_patch16_224"


def _save(model, path: Path, wrap: str | None = None, **extra) -> Path:
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if wrap is None:
        save_file(sd, path)
    else:
        torch.save({wrap: sd, **extra}, path)
    return path


def _assert_folder_matches(folder: Path, source, what: str, n: int = 4) -> None:
    """The written folder, loaded by transformers, against the timm model it came from."""
    auto = AutoModelForImageClassification if source.num_classes else AutoModel
    kwargs = {} if source.num_classes else {"add_pooling_layer": False}
    hf = auto.from_pretrained(folder, **kwargs).eval()
    x = parity_inputs(source, n=n, seed=0)
    torch.testing.assert_close(
        model_output(hf, x),
        model_output(source, x),
        atol=ATOL_MEASURED,
        rtol=0,
        msg=lambda m: f"{what}: beyond {ATOL_MEASURED}: {m}",
    )


# --- shapes from the checkpoint -----------------------------------------------------------

FINETUNES = [
    pytest.param(TINY, {"num_classes": 37}, "37 classes, 224 px", id=f"{TINY}-37-classes"),
    pytest.param(TINY, {"img_size": 160}, "1000 classes, 160 px", id=f"{TINY}-160-px"),
    pytest.param(
        TINY_DISTILLED,
        {"num_classes": 37, "img_size": 160},
        "37 classes, 160 px",
        id=f"{TINY_DISTILLED}-37-classes-160-px",
    ),
    pytest.param(
        DEIT3_SMALL,
        {"num_classes": 37, "img_size": 160},
        "37 classes, 160 px",
        id=f"{DEIT3_SMALL}-37-classes-160-px",
    ),
]


@pytest.mark.parametrize(("variant", "finetune", "logged"), FINETUNES)
def test_a_finetune_converts_with_no_shape_flags(tmp_path, caplog, variant, finetune, logged):
    """A fine-tune of its own shapes (a model of its own: the shapes are what is checked),
    converted with `--no-verify`: the written folder is compared with the timm model here
    (`_assert_folder_matches`), so the converter's own check would run the same passes again."""
    source = random_timm_model(variant, seed=21, **finetune)
    ckpt = _save(source, tmp_path / "finetune.pth", wrap="model")
    out = tmp_path / "out"
    argv = ["convert", variant, str(out), "--checkpoint", str(ckpt), "--no-verify"]
    with caplog.at_level(logging.INFO, logger="deit_port"):
        assert cli.main(argv) == 0
    assert f"from the checkpoint: {logged}" in caplog.messages
    config = json.loads((out / "config.json").read_text())
    assert config["image_size"] == finetune.get("img_size", 224)
    assert len(config["id2label"]) == finetune.get("num_classes", 1000)
    _assert_folder_matches(out, source, variant)


def test_a_headless_checkpoint_converts_to_the_base_model(tmp_path):
    source = random_timm_model(TINY, seed=22, num_classes=0)
    ckpt = _save(source, tmp_path / "backbone.safetensors")
    out = tmp_path / "out"
    assert cli.main(["-q", "convert", TINY, str(out), "--checkpoint", str(ckpt)]) == 0
    assert json.loads((out / "config.json").read_text())["architectures"] == ["ViTModel"]
    _assert_folder_matches(out, source, "headless", n=2)


@pytest.mark.parametrize(
    ("variant", "img_size"),
    # deit3_small is registered at 224 and 384: a 96 px one would fit both (refused, see below)
    [(TINY, 96), (TINY_DISTILLED, 96), (DEIT3_SMALL, 224)],
    ids=[TINY, TINY_DISTILLED, DEIT3_SMALL],
)
def test_auto_picks_the_variant(tmp_path, variant, img_size):
    source = random_timm_model(variant, seed=23, num_classes=5, img_size=img_size)
    ckpt = _save(source, tmp_path / "w.safetensors")
    model, _ = load_timm_model("auto", ckpt)
    assert model.pretrained_cfg["architecture"] == variant
    x = parity_inputs(source, n=2, seed=0)
    assert torch.equal(model_output(model, x), model_output(source, x))


def test_auto_on_the_command_line_names_the_variant(tmp_path, capsys):
    source = random_timm_model(TINY_DISTILLED, seed=24, num_classes=3)
    ckpt = _save(source, tmp_path / "w.safetensors")
    out = tmp_path / "out"
    assert cli.main(["-q", "convert", "auto", str(out), "--checkpoint", str(ckpt)]) == 0
    assert "parity PASS" in capsys.readouterr().out
    assert f"\n# {TINY_DISTILLED}\n" in (out / "README.md").read_text()
    _assert_folder_matches(out, source, "auto", n=2)


def _base_shapes(pos_rows: int, patch: int = 16) -> TensorShapes:
    """deit_base's tensors (width 768, 12 blocks, MLP 3072), by hand: no 344 MB file needed."""
    return TensorShapes(
        embed_dim=768,
        depth=12,
        mlp_hidden=3072,
        patch_size=patch,
        in_chans=3,
        num_classes=1000,
        distilled=False,
        layer_scale=False,
        pos_rows=pos_rows,
    )


@pytest.mark.parametrize(
    ("pos_rows", "expected"),
    [(14 * 14 + 1, "deit_base_patch16_224"), (24 * 24 + 1, "deit_base_patch16_384")],
    ids=["deit_base_patch16_224", "deit_base_patch16_384"],
)
def test_auto_tells_resolutions_of_one_architecture_apart(pos_rows, expected):
    assert pick_variant(_base_shapes(pos_rows)) == expected


def test_auto_refuses_when_more_than_one_variant_fits():
    """deit_base at 160 px: registered at 224 (crop 0.9) and 384 (crop 1.0); both fit."""
    with pytest.raises(CheckpointError) as e:
        pick_variant(_base_shapes(10 * 10 + 1))
    assert "fits deit_base_patch16_224, deit_base_patch16_384; give one of them" in str(e.value)


def test_auto_refuses_what_no_variant_fits(tmp_path, capsys):
    source = random_timm_model(TINY, seed=25, depth=2)
    ckpt = _save(source, tmp_path / "w.safetensors")
    line = cli_error_line(
        [*CONVERT, "auto", str(tmp_path / "out"), "--checkpoint", str(ckpt)],
        capsys,
        unchanged=tmp_path,
    )
    assert "no registered DeiT fits the checkpoint (embed dim 192, depth 2)" in line


def test_a_flag_contradicting_the_checkpoint_is_one_line(tmp_path, capsys):
    source = random_timm_model(TINY, seed=26, num_classes=37)
    ckpt = _save(source, tmp_path / "w.pth", wrap="model")
    argv = [*CONVERT, TINY, str(tmp_path / "out"), "--checkpoint", str(ckpt), "--num-classes", "10"]
    line = cli_error_line(argv, capsys, unchanged=tmp_path)
    assert "--num-classes 10 contradicts the checkpoint: its head has 37 classes" in line


@pytest.mark.parametrize(
    ("model", "says"),
    [
        (
            TINY_DISTILLED,
            "(embed dim 192, depth 12, distilled): its tensors have embed dim 192, "
            + f"depth 12, no distillation token, which fits {TINY}",
        ),
        (
            DEIT3_SMALL,
            "(embed dim 384, depth 12, layer scale): its tensors have embed dim 192, "
            + f"depth 12, no layer scale, which fits {TINY}",
        ),
    ],
    ids=[TINY_DISTILLED, DEIT3_SMALL],
)
def test_a_checkpoint_of_another_variant_is_one_line(tmp_path, capsys, model, says):
    ckpt = _save(random_timm_model(TINY, seed=27), tmp_path / "w.safetensors")
    line = cli_error_line(
        [*CONVERT, model, str(tmp_path / "out"), "--checkpoint", str(ckpt)],
        capsys,
        unchanged=tmp_path,
    )
    assert f"does not fit {model} {says}" in line


def test_training_args_that_disagree_are_reported_and_the_tensors_win(tmp_path, caplog):
    """facebookresearch/deit saves `args` (nb_classes, input_size) beside the weights."""
    source = random_timm_model(TINY, seed=28, num_classes=37, img_size=160)
    args = argparse.Namespace(nb_classes=10, input_size=224, model=TINY)
    ckpt = _save(source, tmp_path / "checkpoint.pth", wrap="model", args=args, epoch=3)
    with caplog.at_level(logging.WARNING, logger="deit_port"):
        model, _ = load_timm_model(TINY, ckpt)
    assert (
        "the checkpoint's args say nb_classes=10, its tensors have 37 classes; using the tensors"
        in caplog.messages
    )
    assert (
        "the checkpoint's args say input_size=224, its tensors are for 160 px; using the tensors"
        in caplog.messages
    )
    assert model.num_classes == 37 and model.patch_embed.img_size == (160, 160)


def test_training_args_that_agree_say_nothing(tmp_path, caplog):
    source = random_timm_model(TINY, seed=29, num_classes=37, img_size=160)
    args = argparse.Namespace(nb_classes=37, input_size=160)
    ckpt = _save(source, tmp_path / "checkpoint.pth", wrap="model", args=args)
    with caplog.at_level(logging.WARNING, logger="deit_port"):
        load_timm_model(TINY, ckpt)
    assert not caplog.messages


# --- a new resolution ---------------------------------------------------------------------

# Small models of the three families' structure: the registered names at depth 2 (the name
# fixes width, heads, patch size, distillation and layer scale; depth 2 keeps them fast).
FAMILIES = [TINY, TINY_DISTILLED, DEIT3_SMALL]
RESIZES = [(224, 384), (384, 224)]  # up, and down (where timm's antialiasing matters)
RESOLUTION_CASES = [
    pytest.param(name, a, b, id=f"{name}-{a}-to-{b}") for name in FAMILIES for a, b in RESIZES
]


def _timm_at(name: str, ckpt: Path, img_size: int):
    """timm's own path for a checkpoint at another size, as a user loads it."""
    import timm

    return timm.create_model(
        name,
        pretrained=True,
        pretrained_cfg_overlay={"file": str(ckpt)},
        depth=2,
        img_size=img_size,
    ).eval()


@pytest.mark.parametrize(("name", "trained_at", "run_at"), RESOLUTION_CASES)
def test_a_new_resolution_matches_timms_own_loading(
    tmp_path, record_property, name, trained_at, run_at
):
    """`img_size` other than the checkpoint's: the position embedding is resampled as
    `timm.create_model(pretrained=True, img_size=S)` resamples it; the written folder computes
    what that timm model computes. Beside it, the folder converted at the checkpoint's size and
    run at S with transformers' `interpolate_pos_encoding=True` is measured: it is not timm's
    (what the model card says). The resampled folder is converted with `verify=False`: this
    case compares it with timm's own loading itself (the converter's check would compare it
    with the same timm model again)."""
    from deit_port.convert import convert_deit_checkpoint

    source = random_timm_model(name, seed=31, depth=2, img_size=trained_at)
    ckpt = _save(source, tmp_path / f"trained_at_{trained_at}.safetensors")
    reference = _timm_at(name, ckpt, run_at)
    assert reference.pos_embed.shape != source.pos_embed.shape  # timm did resample

    resampled = tmp_path / "resampled"
    convert_deit_checkpoint(
        name,
        resampled,
        checkpoint=ckpt,
        model_kwargs={"depth": 2, "img_size": run_at},
        verify=False,
    )
    assert json.loads((resampled / "config.json").read_text())["image_size"] == run_at
    assert "position embedding resampled from" in (resampled / "README.md").read_text()
    hf = AutoModelForImageClassification.from_pretrained(resampled).eval()
    x = parity_inputs(reference, n=4, seed=0)
    expected = model_output(reference, x)
    diff = (model_output(hf, x) - expected).abs()
    case = f"{name} (depth 2) {trained_at} -> {run_at} px"
    record_property("variant", f"{case}, --img-size")
    record_property("max_abs_diff", float(diff.max()))
    record_property("mean_abs_diff", float(diff.mean()))
    resampled_diff = diff
    assert float(diff.max()) <= ATOL_MEASURED, f"max |diff| {diff.max():.3g} > {ATOL_MEASURED}"

    as_trained = tmp_path / "as_trained"
    convert_deit_checkpoint(name, as_trained, checkpoint=ckpt, model_kwargs={"depth": 2})
    hf = AutoModelForImageClassification.from_pretrained(as_trained).eval()
    with torch.inference_mode():
        interpolated = hf(pixel_values=x, interpolate_pos_encoding=True).logits
    diff = (interpolated - expected).abs()
    top1 = float((interpolated.argmax(-1) == expected.argmax(-1)).float().mean())
    record_property("interpolate_pos_encoding_max_abs_diff", float(diff.max()))
    print(  # the table in docs/finetune.md
        f"measured: | {case} | {resampled_diff.max():.3g} | {diff.max():.3g} | "
        f"{diff.mean():.3g} | {top1:.0%} |"
    )
    assert float(diff.max()) > ATOL_MEASURED, (
        f"interpolate_pos_encoding=True now matches timm (max |diff| {diff.max():.3g}): "
        "update the model card's advice (deit_port/card.py) and docs/finetune.md"
    )


# --- a head you can train -----------------------------------------------------------------


def test_head_cls_matches_timms_class_token_head(tmp_path, record_property):
    source = random_timm_model(TINY_DISTILLED, seed=41, num_classes=10)
    ckpt = _save(source, tmp_path / "w.safetensors")
    out = tmp_path / "out"
    argv = ["-q", "convert", TINY_DISTILLED, str(out), "--checkpoint", str(ckpt), "--head", "cls"]
    assert cli.main(argv) == 0
    hf = AutoModelForImageClassification.from_pretrained(out).eval()
    assert type(hf).__name__ == "DeiTForImageClassification"
    x = parity_inputs(source, n=4, seed=0)
    with torch.inference_mode():
        expected = source.head(source.forward_features(x)[:, 0])
        averaged = source(x)  # timm's eval output: both heads, averaged
        actual = hf(pixel_values=x).logits
    diff = (actual - expected).abs()
    record_property("variant", f"{TINY_DISTILLED} (10 classes), --head cls")
    record_property("max_abs_diff", float(diff.max()))
    record_property("mean_abs_diff", float(diff.mean()))
    torch.testing.assert_close(actual, expected, atol=ATOL_MEASURED, rtol=0)
    # the reference is the class-token head, not timm's average: they are far apart here
    assert float((averaged - expected).abs().max()) > 100 * ATOL_MEASURED
    card = (out / "README.md").read_text()
    assert "- head: the class-token head only (timm's `head`)" in card and "`head_dist`" in card
    # verify reads the head off the folder's config
    verify = ["-q", "verify", str(out), TINY_DISTILLED, "--checkpoint", str(ckpt)]
    assert cli.main(verify) == 0


def test_head_cls_folder_trains_with_labels(tmp_path):
    """A few AdamW steps on one batch with `labels`: every parameter gets a gradient and the
    loss goes down. (The teacher class, for contrast, computes no loss at all.)"""
    from deit_port.convert import convert_deit_checkpoint

    source = random_timm_model(TINY_DISTILLED, seed=42, num_classes=3, depth=2)
    ckpt = _save(source, tmp_path / "w.safetensors")
    folders = {}
    for head in ("cls", "teacher"):
        folders[head] = tmp_path / head
        convert_deit_checkpoint(
            TINY_DISTILLED, folders[head], checkpoint=ckpt, model_kwargs={"depth": 2}, head=head
        )
    x = parity_inputs(source, n=8, seed=1)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])

    teacher = AutoModelForImageClassification.from_pretrained(folders["teacher"])
    assert getattr(teacher(pixel_values=x, labels=labels), "loss", None) is None

    model = AutoModelForImageClassification.from_pretrained(folders["cls"]).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(5):
        optimizer.zero_grad()
        loss = model(pixel_values=x, labels=labels).loss
        loss.backward()
        if step == 0:
            for name, p in model.named_parameters():
                assert p.grad is not None, f"{name} got no gradient"
                assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], f"the loss did not go down: {losses}"


def test_head_on_a_model_without_distillation_head(tmp_path, capsys):
    """`--head cls` on a plain DeiT is what it already is (one class-token head);
    `--head teacher` there is an error: there is no teacher head to keep."""
    from deit_port.convert import convert_deit_checkpoint

    out = tmp_path / "cls"
    convert_deit_checkpoint(TINY, out, init="random", model_kwargs={"depth": 2}, head="cls")
    assert json.loads((out / "config.json").read_text())["architectures"] == [
        "ViTForImageClassification"
    ]
    ckpt = _save(random_timm_model(TINY, seed=43), tmp_path / "w.safetensors")
    out = tmp_path / "teacher"
    argv = [*CONVERT, TINY, str(out), "--checkpoint", str(ckpt), "--head", "teacher"]
    line = cli_error_line(argv, capsys, unchanged=tmp_path)
    assert "--head teacher: the model is not distilled" in line
