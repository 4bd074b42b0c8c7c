"""One seeded random model per timm DeiT variant, converted once per test session and shared.

Building, randomizing and converting a big variant costs up to a minute (DeiT III huge: 632 M
parameters, 2.4 GB a side); every per-variant case (parity, preprocessing, pipeline, attention
kernels, layer reports, ONNX, ...) uses the same one instead of making its own.

The artefact of a variant is built ONCE per session, across xdist workers: in a folder under
`tmp_path_factory.getbasetemp().parent` (the session's folder shared by the workers; the
basetemp itself without xdist), guarded by a `filelock.FileLock`. The first worker to ask
builds it; the others wait for the lock and find it done. It holds:

- `timm.safetensors`: the state dict of `random_timm_model(name, seed=SEED)` (`pretrained=False`,
  every parameter drawn by `randomize_`);
- `hf/`: that file converted by `convert_deit_checkpoint(name, hf, checkpoint=timm.safetensors,
  verify=False)`: the suite checks what it wrote, not the converter's own check;
- `reference.safetensors`: the parity `inputs` (`parity_inputs(model, n=4, seed=SEED)`: the
  synthetic image through timm's eval transform, then N(0, 1) tensors), timm's outputs on them
  (`expected`), and timm's logits on `MODEL_IMAGES` through timm's own eval transform
  (`image_logits`), all computed by the timm model before it was saved or converted.

Each worker loads what a test asks for, lazily and at most once per variant while it is the
variant in hand: the timm model (meta device + `load_state_dict(assign=True)` from the mapped
safetensors file) and the transformers model (`from_pretrained`). Only the most recent variant
outside `FAST_VARIANTS` is kept in memory (the huge one is 2.4 GB a side).

API, for test modules:

    from .variants import variant_params

    @pytest.mark.parametrize("variant", variant_params())      # every variant, big ones slow
    def test_something(variant, converted_variant):
        c = converted_variant(variant)                          # a `Converted`
        actual = model_output(c.hf_model, c.inputs)
        torch.testing.assert_close(actual, c.expected, atol=..., rtol=0)

- `variant_params(names=VARIANTS)`: `pytest.param`s with the timm name as id (so `-k tiny`
  selects), marked `slow` outside `FAST_VARIANTS`. Name the argument `variant`.
- the session fixture `converted_variant` (conftest.py) returns `get(name) -> Converted` with:
  `.name` (timm name), `.spec` (`ArchSpec`), `.folder` (the converted transformers folder),
  `.checkpoint` (timm's safetensors file), `.inputs` (4, C, H, W), `.expected` (timm's logits
  on them, float32), `.image_logits` ({image name: timm's logits} for `MODEL_IMAGES`),
  `.timm_model` and `.hf_model` (eval mode, on `DEVICE`, loaded on first use), `.loading_info`
  (`from_pretrained`'s `output_loading_info` of `.hf_model`), `.meta_model` (the timm model on
  the meta device: architecture and data config, no weights), `.data_config` (timm's eval data
  config, `deit_port.parity.data_config`).
- Everything is shared: never leave a model, the folder or the checkpoint changed (no weight
  edits, no `.half()`, no `.to(other device)`, no `set_attn_implementation`; a hook or flag
  set for one forward pass is removed in a `finally`, as tests/test_attention.py does). A case
  that needs another model (other kwargs, a mutation, another attention kernel) loads its own
  from `.folder` or `.checkpoint` (copy the folder to change it), or builds its own.
- The shared model is also `--init random --seed SEED` of the CLI (`create_timm_model` draws
  the same values as `random_timm_model`); `--checkpoint .checkpoint` reads it faster.
- Cases using `converted_variant` are run grouped by `variant` (`group_by_variant`, called by
  conftest.py), so a worker loads each big variant once, not once per test function.
"""

from __future__ import annotations

import functools
import gc
import os
import shutil
from pathlib import Path

import pytest
import torch

from .util import (
    DEVICE,
    FAST_VARIANTS,
    MODEL_IMAGES,
    VARIANT_KWARGS,
    VARIANTS,
    model_output,
    sample_images,
)

__all__ = ["SEED", "Converted", "group_by_variant", "variant_params"]

SEED = 1234
N_INPUTS = 4
_FIXTURE = "converted_variant"


def variant_params(names=None) -> list:
    """`pytest.param`s for `names` (default: every variant, `VARIANTS`: the DeiTs and the
    plain ViTs, sorted), id = the timm name, marked `slow` outside `FAST_VARIANTS`."""
    return [
        pytest.param(name, id=name, marks=() if name in FAST_VARIANTS else pytest.mark.slow)
        for name in (VARIANTS if names is None else names)
    ]


class Converted:
    """The shared artefact of one variant, as one worker sees it (see the module docstring)."""

    def __init__(self, name: str, root: Path) -> None:
        from safetensors.torch import load_file

        self.name = name
        self.folder = root / "hf"
        self.checkpoint = root / "timm.safetensors"
        ref = load_file(root / "reference.safetensors")
        self.inputs: torch.Tensor = ref["inputs"]
        self.expected: torch.Tensor = ref["expected"]
        self.image_logits = dict(zip(MODEL_IMAGES, ref["image_logits"], strict=True))

    def __repr__(self) -> str:
        return f"Converted({self.name!r}, folder={str(self.folder)!r})"

    @functools.cached_property
    def meta_model(self) -> torch.nn.Module:
        from deit_port.registry import build_on_meta

        return build_on_meta(self.name, **VARIANT_KWARGS.get(self.name, {}))

    @functools.cached_property
    def spec(self):
        from deit_port.arch import ArchSpec

        return ArchSpec.from_timm(self.meta_model)

    @functools.cached_property
    def data_config(self) -> dict:
        from deit_port.parity import data_config

        return data_config(self.meta_model)

    @functools.cached_property
    def timm_model(self) -> torch.nn.Module:
        from safetensors.torch import load_file

        from deit_port.registry import build_on_meta

        model = build_on_meta(self.name, **VARIANT_KWARGS.get(self.name, {}))
        model.load_state_dict(load_file(self.checkpoint), strict=True, assign=True)
        return model.eval().to(DEVICE)

    @functools.cached_property
    def _hf(self) -> tuple[torch.nn.Module, dict]:
        from transformers import AutoModelForImageClassification

        model, info = AutoModelForImageClassification.from_pretrained(
            self.folder, output_loading_info=True
        )
        return model.eval().to(DEVICE), info

    @property
    def hf_model(self) -> torch.nn.Module:
        return self._hf[0]

    @property
    def loading_info(self) -> dict:
        return self._hf[1]


def session_root(tmp_path_factory) -> Path:
    """The folder every worker of this session shares (the basetemp itself without xdist:
    its parent would be shared with other sessions)."""
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "variants"


def variant_store(root: Path):
    """`get(name) -> Converted`: builds under the lock if no worker did, then loads."""
    from filelock import FileLock

    root.mkdir(parents=True, exist_ok=True)
    loaded: dict[str, Converted] = {}

    def get(name: str) -> Converted:
        if name not in VARIANTS:
            raise ValueError(f"{name!r} is not a suite variant; see tests/util.VARIANTS")
        if name in loaded:
            return loaded[name]
        if name not in FAST_VARIANTS:  # keep one big variant in memory
            for other in [n for n in loaded if n not in FAST_VARIANTS]:
                del loaded[other]
            gc.collect()
        folder = root / name
        with FileLock(root / f"{name}.lock"):
            if not folder.is_dir():
                _build(name, folder)
        loaded[name] = Converted(name, folder)
        return loaded[name]

    return get


def _build(name: str, folder: Path) -> None:
    """Write the artefact of `name` beside `folder`, then rename it into place."""
    from safetensors.torch import save_file
    from timm.data import create_transform

    from deit_port.convert import convert_deit_checkpoint
    from deit_port.parity import data_config, parity_inputs

    from .util import random_timm_model

    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    kwargs = VARIANT_KWARGS.get(name, {})
    model = random_timm_model(name, seed=SEED, **kwargs)
    inputs = parity_inputs(model, n=N_INPUTS, seed=SEED)
    transform = create_transform(**data_config(model))
    images = sample_images()
    pixels = torch.stack([transform(images[n].convert("RGB")) for n in MODEL_IMAGES])
    reference = {
        "inputs": inputs,
        "expected": model_output(model, inputs).float().contiguous(),
        "image_logits": model_output(model, pixels).float().contiguous(),
    }
    save_file(reference, tmp / "reference.safetensors")
    save_file(model.state_dict(), tmp / "timm.safetensors")
    del model
    if name not in FAST_VARIANTS:  # a full collection costs 0.4 s; worth it for 2.4 GB
        gc.collect()
    convert_deit_checkpoint(
        name, tmp / "hf", checkpoint=tmp / "timm.safetensors", model_kwargs=kwargs, verify=False
    )
    os.rename(tmp, folder)


def group_by_variant(items: list) -> None:
    """Reorder, in place, the cases that use `converted_variant` so that those of one `variant`
    run one after the other (in the order the variants first appear); every other case keeps
    its place. A worker then loads a big variant once, not once per test function."""
    slots = [
        i
        for i, item in enumerate(items)
        if _FIXTURE in getattr(item, "fixturenames", ()) and "variant" in _params(item)
    ]
    order: dict[str, int] = {}
    for i in slots:
        order.setdefault(_params(items[i])["variant"], len(order))
    grouped = sorted((items[i] for i in slots), key=lambda it: order[_params(it)["variant"]])
    for i, item in zip(slots, grouped, strict=True):
        items[i] = item


def _params(item) -> dict:
    callspec = getattr(item, "callspec", None)
    return callspec.params if callspec is not None else {}
