"""One seeded random model per timm variant (`VARIANTS`), converted once per test session and
shared, and one forward pass per model over everything the per-variant checks compare.

Building, randomizing and converting a big variant costs up to a minute (DeiT III huge: 632 M
parameters, 2.4 GB a side); every per-variant case (parity, preprocessing, attention kernels,
layer reports, ONNX, ...) uses the same one instead of making its own.

The artefact of a variant is built ONCE per session, across xdist workers
(tests/build_once.py: a file lock, a partial folder renamed into place) in the session's shared
folder. It holds:

- `timm.safetensors`: the state dict of `random_timm_model(name, seed=SEED)` (`pretrained=False`,
  every parameter drawn by `randomize_`);
- `hf/`: that file converted by `convert_deit_checkpoint(name, hf, checkpoint=timm.safetensors,
  verify=False)`: the suite checks what it wrote, not the converter's own check;
- `reference.safetensors`: timm's one pass, computed by the timm model before it was saved or
  converted: the parity `inputs` (`parity_inputs(model, n=4, seed=SEED)`: the synthetic image
  through timm's eval transform, then N(0, 1) tensors) and timm's outputs on them (`expected`),
  and timm's logits on `model_images(name)` through timm's own eval transform
  (`image_logits.NAME`).

Each worker loads what a test asks for, lazily and at most once per variant while it is the
variant in hand: the timm model (meta device + `load_state_dict(assign=True)` from the
safetensors file), the transformers model (`from_pretrained`), and the transformers model's one
pass (`hf_outputs`): the parity inputs and the folder's processor's pixels of
`model_images(name)`, both backends, in one batch. Only the most recent variant outside
`FAST_VARIANTS` is kept in memory (the huge one is 2.4 GB a side).

API, for test modules:

    from .variants import variant_params

    @pytest.mark.parametrize("variant", variant_params())      # every variant, big ones slow
    def test_something(variant, converted_variant):
        c = converted_variant(variant)                          # a `Converted`
        torch.testing.assert_close(c.hf_outputs.inputs, c.expected, atol=..., rtol=0)

- `variant_params(names=VARIANTS)`: `pytest.param`s with the timm name as id (so `-k tiny`
  selects), marked `slow` outside `FAST_VARIANTS`. Name the argument `variant`.
- the session fixture `converted_variant` (conftest.py) returns `get(name) -> Converted` with:
  `.name` (timm name), `.spec` (`ArchSpec`), `.folder` (the converted transformers folder),
  `.checkpoint` (timm's safetensors file), `.inputs` (4, C, H, W), `.expected` (timm's logits
  on them, float32), `.images` (`model_images(name)`), `.image_logits` ({image name: timm's
  logits}), `.hf_outputs` (`HfOutputs`: the transformers model's logits on `.inputs` and, per
  processor backend, {image name: logits}), `.timm_model` and `.hf_model` (eval mode, on
  `DEVICE`, loaded on first use), `.loading_info` (`from_pretrained`'s `output_loading_info`
  of `.hf_model`), `.meta_model` (the timm model on the meta device: architecture and data
  config, no weights), `.data_config` (timm's eval data config, `deit_port.parity.data_config`).
- Everything is shared: never leave a model, the folder or the checkpoint changed (no weight
  edits, no `.half()`, no `.to(other device)`, no `set_attn_implementation`; a hook or flag
  set for one forward pass is removed in a `finally`, as tests/test_attention.py does). A case
  that needs another model (other kwargs, a mutation, another attention kernel) loads its own
  from `.folder` or `.checkpoint` (copy the folder to change it), or builds its own, and says
  in its docstring why it needs a pass of its own.
- The shared model is also `--init random --seed SEED` of the CLI (`create_timm_model` draws
  the same values as `random_timm_model`); `--checkpoint .checkpoint` reads it faster.
- Cases using `converted_variant` are run grouped by `variant` (`group_by_variant`, called by
  tests/suite_speed.py), so a worker loads each big variant once, not once per test function.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from .build_once import build_once
from .util import (
    DEVICE,
    FAST_VARIANTS,
    SEED,
    VARIANT_KWARGS,
    VARIANTS,
    model_images,
    model_output,
    sample_images,
)

__all__ = ["BACKENDS", "Converted", "HfOutputs", "group_by_variant", "variant_params"]

N_INPUTS = 4
# transformers' two image-processor backends: PIL (timm's own resize) and torchvision (its default)
BACKENDS = ("pil", "torchvision")
_FIXTURE = "converted_variant"


def variant_params(names=None) -> list:
    """`pytest.param`s for `names` (default: `VARIANTS`, every variant the suite converts,
    sorted), id = the timm name, marked `slow` outside `FAST_VARIANTS`."""
    return [
        pytest.param(name, id=name, marks=() if name in FAST_VARIANTS else pytest.mark.slow)
        for name in (VARIANTS if names is None else names)
    ]


@dataclass(frozen=True)
class HfOutputs:
    """The transformers model's one pass over a variant's batch: logits (or final hidden
    states) on the parity inputs, and per backend {image name: logits} on the folder's
    processor's pixel values of the variant's model images."""

    inputs: torch.Tensor
    images: dict[str, dict[str, torch.Tensor]]


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
        self.images = model_images(name)
        self.image_logits = {n: ref[f"image_logits.{n}"] for n in self.images}

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

    @functools.cached_property
    def hf_outputs(self) -> HfOutputs:
        """The transformers model's one pass: `.inputs`, then each backend's pixel values of
        `.images` (the processor loaded from the folder, each image converted to RGB as timm's
        loader does), in one batch."""
        from transformers import AutoImageProcessor

        rgb = [sample_images()[n].convert("RGB") for n in self.images]
        pixels = [self.inputs]
        for backend in BACKENDS:
            processor = AutoImageProcessor.from_pretrained(self.folder, backend=backend)
            pixels.append(torch.as_tensor(processor(rgb, return_tensors="pt")["pixel_values"]))
        out = model_output(self.hf_model, torch.cat(pixels).to(DEVICE)).float().cpu()
        by_backend = out[len(self.inputs) :].split(len(self.images))
        return HfOutputs(
            inputs=out[: len(self.inputs)],
            images={
                backend: dict(zip(self.images, logits, strict=True))
                for backend, logits in zip(BACKENDS, by_backend, strict=True)
            },
        )


def variant_store(root: Path):
    """`get(name) -> Converted`: builds if no worker did (`build_once`), then loads."""
    loaded: dict[str, Converted] = {}

    def get(name: str) -> Converted:
        if name not in VARIANTS:
            raise ValueError(f"{name!r} is not a variant of the suite; see tests/util.VARIANTS")
        if name in loaded:
            return loaded[name]
        if name not in FAST_VARIANTS:  # keep one big variant in memory
            for other in [n for n in loaded if n not in FAST_VARIANTS]:
                del loaded[other]
            gc.collect()
        folder = build_once(root / name, lambda partial: _build(name, partial))
        loaded[name] = Converted(name, folder)
        return loaded[name]

    return get


def _build(name: str, tmp: Path, steps: list | None = None) -> None:
    """Write the artefact of `name` to `tmp` (see the module docstring); with `steps`, append
    `(step, wall seconds, CPU seconds)` for each step (`python -m tests.variants NAME`)."""
    from safetensors.torch import save_file
    from timm.data import create_transform

    from deit_port.convert import convert_deit_checkpoint
    from deit_port.parity import data_config, parity_inputs

    from .util import random_timm_model

    tmp.mkdir()
    with _step(steps, "randomize: build on meta, randomize_"):
        model = random_timm_model(name, seed=SEED, **VARIANT_KWARGS.get(name, {}))
    with _step(steps, f"timm's one pass: {N_INPUTS} inputs + {len(model_images(name))} images"):
        inputs = parity_inputs(model, n=N_INPUTS, seed=SEED)
        transform = create_transform(**data_config(model))
        names = model_images(name)
        pixels = torch.stack([transform(sample_images()[n].convert("RGB")) for n in names])
        out = model_output(model, torch.cat([inputs, pixels])).float()
    reference = {"inputs": inputs, "expected": out[:N_INPUTS].contiguous()}
    reference |= {f"image_logits.{n}": y.contiguous() for n, y in zip(names, out[N_INPUTS:])}
    with _step(steps, "save timm.safetensors"):
        save_file(reference, tmp / "reference.safetensors")
        save_file(model.state_dict(), tmp / "timm.safetensors")
        del model
        if name not in FAST_VARIANTS:  # a full collection, to free the big model's memory now
            gc.collect()
    with _step(steps, "convert (convert_deit_checkpoint, verify=False)"):
        convert_deit_checkpoint(
            name,
            tmp / "hf",
            checkpoint=tmp / "timm.safetensors",
            model_kwargs=VARIANT_KWARGS.get(name, {}),
            verify=False,
        )


@contextlib.contextmanager
def _step(steps: list | None, what: str) -> Iterator[None]:
    start, wall = os.times(), time.perf_counter()
    yield
    if steps is not None:
        end = os.times()
        cpu = sum(end[:4]) - sum(start[:4])  # user + sys, children included
        steps.append((what, time.perf_counter() - wall, cpu))


def _measure(name: str, root: Path) -> list:
    """Each step of the suite's build of `name`, then loading both models and the command line's
    `convert --checkpoint timm.safetensors --no-verify` of the same file, timed."""
    import subprocess
    import sys

    steps: list = []
    _build(name, root, steps)
    converted = Converted(name, root)
    with _step(steps, "load the timm model"):
        converted.timm_model  # noqa: B018
    with _step(steps, "load the transformers model"):
        converted.hf_model  # noqa: B018
    argv = ["-m", "deit_port.cli", "convert", name, str(root / "cli"), "--no-verify", "-q"]
    with _step(steps, "deit-port convert --checkpoint FILE --no-verify (imports included)"):
        subprocess.run(
            [sys.executable, *argv, "--checkpoint", str(root / "timm.safetensors")], check=True
        )
    return steps


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


if __name__ == "__main__":  # python -m tests.variants NAME: the build's steps, timed
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as where:
        rows = _measure(sys.argv[1], Path(where) / "build")
    print("| step | wall s | CPU s |\n|---|---|---|")
    for what, wall, cpu in rows:
        print(f"| {what} | {wall:.1f} | {cpu:.1f} |")
