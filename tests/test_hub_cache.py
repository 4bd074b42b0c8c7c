"""timm's pretrained path, offline: weights from the local hub cache, never a random fallback."""

import json
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from .util import TINY, random_timm_model, run_python, state_dict_copy


@pytest.fixture(scope="module")
def tiny():
    return random_timm_model(TINY, seed=3)


# --- timm's pretrained path, offline; the seed's interface; the acceptance scenario --------


def _hub_cache_with(tmp_path: Path, repo: str, state_dict: dict) -> Path:
    """A huggingface_hub cache holding `repo` as timm publishes it: `model.safetensors` in a
    snapshot, `refs/main` naming the snapshot (the file timm asks for is `pytorch_model.bin`;
    it looks for its safetensors alternative `model.safetensors` first)."""
    cache = tmp_path / "hub"
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    save_file(state_dict, snapshot / "model.safetensors")
    (snapshot / "config.json").write_text(json.dumps({"architecture": TINY, "num_classes": 1000}))
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return cache


def test_pretrained_from_the_local_hub_cache_offline(tiny, tmp_path):
    """With and without the tag: both resolve to timm/deit_tiny_patch16_224.fb_in1k."""
    cache = _hub_cache_with(tmp_path, "timm/deit_tiny_patch16_224.fb_in1k", state_dict_copy(tiny))
    names = {"untagged": TINY, "tagged": f"{TINY}.fb_in1k"}
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home")}
    script = textwrap.dedent(f"""
        from deit_port import cli
        for out, name in {names!r}.items():
            code = cli.main(["-q", "convert", name, {str(tmp_path)!r} + "/" + out])
            assert code == 0, (name, code)
    """)
    r = run_python("-c", script, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("parity PASS") == 2
    for out in names:
        written = load_file(tmp_path / out / "model.safetensors")
        assert torch.equal(written["classifier.weight"], tiny.head.weight.detach()), out
        assert "timm/deit_tiny_patch16_224.fb_in1k" in (tmp_path / out / "README.md").read_text()
