"""The written folder: weights cast to `--dtype`, shards past `--max-shard-size` with a complete
index, a config transformers reads."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification

from deit_port.convert import convert_deit_checkpoint
from deit_port.parity import parity_inputs

from .util import TINY, model_output, random_timm_model, save_checkpoint, state_dict_copy

ATOL = 1e-4  # float32 parity measured on these variants (the contract is 1e-3)


@pytest.fixture(scope="module")
def tiny():
    return random_timm_model(TINY, seed=3)


# --- --dtype and sharding ------------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "st_dtype"), [("float16", "F16"), ("bfloat16", "BF16")])
def test_dtype_casts_the_written_weights(tiny, tmp_path, dtype, st_dtype, record_property):
    ckpt = save_checkpoint(state_dict_copy(tiny), tmp_path / "w.safetensors", "safetensors")
    out = tmp_path / "out"
    report = convert_deit_checkpoint(TINY, out, checkpoint=ckpt, dtype=dtype)
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {st_dtype}  # noqa: SIM118
        head = f.get_tensor("classifier.weight")
    assert torch.equal(head, tiny.head.weight.detach().to(getattr(torch, dtype)))
    assert json.loads((out / "config.json").read_text())["dtype"] == dtype

    hf = AutoModelForImageClassification.from_pretrained(out, dtype=torch.float32)
    x = parity_inputs(tiny, n=4, seed=0)
    diffs = (model_output(hf, x) - model_output(tiny, x)).abs()
    diff = diffs.max().item()
    record_property("variant", f"{TINY} written in {dtype} (tolerance {report.atol:g})")
    record_property("max_abs_diff", diff)
    record_property("mean_abs_diff", diffs.mean().item())
    assert diff > 0, "the cast should be visible in the logits"
    assert report.passed and diff <= report.atol, (
        f"max |diff| {diff:.3g} vs the stated {report.atol}"
    )
    assert report.atol > 1e-3, "a float32 tolerance cannot hold for rounded weights"
    assert abs(report.max_abs_diff - diff) <= 1e-6


def test_shards_past_max_shard_size_with_a_complete_index(tiny, tmp_path):
    ckpt = save_checkpoint(state_dict_copy(tiny), tmp_path / "w.safetensors", "safetensors")
    one, many = tmp_path / "one", tmp_path / "many"
    convert_deit_checkpoint(TINY, one, checkpoint=ckpt, verify=False)
    convert_deit_checkpoint(TINY, many, checkpoint=ckpt, max_shard_size="1MB")

    index = json.loads((many / "model.safetensors.index.json").read_text())
    shards = sorted(many.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and not (many / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == [p.name for p in shards]
    in_shards = {}
    for shard in shards:
        assert shard.stat().st_size <= 1_000_000 + 200_000, f"{shard.name} exceeds the shard size"
        for k, v in load_file(shard).items():
            assert index["weight_map"][k] == shard.name
            in_shards[k] = v
    whole = load_file(one / "model.safetensors")
    assert sorted(in_shards) == sorted(whole) == sorted(index["weight_map"])
    for k, v in whole.items():
        assert torch.equal(in_shards[k], v), k
    assert index["metadata"]["total_size"] == sum(
        v.numel() * v.element_size() for v in whole.values()
    )

    hf, info = AutoModelForImageClassification.from_pretrained(many, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    x = parity_inputs(tiny, n=2, seed=0)
    torch.testing.assert_close(
        model_output(hf, x),
        model_output(tiny, x),
        atol=ATOL,
        rtol=0,
        msg=lambda m: f"sharded folder vs timm: {m}",
    )

    # --overwrite with one file leaves no stale shard or index
    convert_deit_checkpoint(TINY, many, checkpoint=ckpt, overwrite=True, verify=False)
    assert not list(many.glob("model-*")) and not (many / "model.safetensors.index.json").exists()


def test_written_config_is_a_transformers_config(tiny, tmp_path):
    folder = tmp_path / "hf"
    convert_deit_checkpoint(
        TINY,
        folder,
        checkpoint=save_checkpoint(state_dict_copy(tiny), tmp_path / "w.pth", "torch-zip"),
    )
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["ViTForImageClassification"]
    assert (config["image_size"], config["patch_size"], config["layer_norm_eps"]) == (224, 16, 1e-6)
    assert config["id2label"]["0"].startswith("tench")
