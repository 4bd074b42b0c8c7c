"""The real training run of `examples/train_convert_pipeline.py`, done once per test session and
shared: tests/test_real_training.py (transformers) and tests/test_browser.py (transformers.js,
Chromium) use the same checkpoint, so the minute of training is spent once.

Built once per session, across xdist workers (tests/build_once.py), in the session's shared
folder. It holds what timm's `train.py` would leave and what a user would classify:

- `checkpoint.pth.tar`: the example's `save_checkpoint` (`state_dict`, `state_dict_ema`,
  `optimizer`, `args`, ...), trained with the example's recipe (`EPOCHS`, seed 0);
- `labels.txt`: one class name a line (`LABELS`);
- `heldout/NNNN_LABEL.png`: the held-out digits (8x8 grey PNGs), in order;
- `run.json`: the held-out labels and the training time.

API: the session fixture `digits_run` (conftest.py) returns a `DigitsRun`.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import torch

from .build_once import build_once

EXAMPLE = Path(__file__).parents[1] / "examples" / "train_convert_pipeline.py"
SEED = 0

__all__ = ["EXAMPLE", "DigitsRun", "digits_store", "example"]


@functools.cache
def example():
    """examples/train_convert_pipeline.py as a module (it is not a package)."""
    spec = importlib.util.spec_from_file_location("train_convert_pipeline", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class DigitsRun:
    """The shared training run, as one worker sees it (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.checkpoint = root / "checkpoint.pth.tar"
        self.labels_file = root / "labels.txt"
        run = json.loads((root / "run.json").read_text())
        self.pngs = [root / "heldout" / name for name in run["pngs"]]
        self.test_labels = np.array(run["test_labels"])
        self.train_seconds: float = run["train_seconds"]

    def timm_model(self, ema: bool = True) -> torch.nn.Module:
        """A fresh timm model from the checkpoint, as a user loads one: `timm.create_model` at
        the trained shape, then timm's `load_checkpoint` (EMA weights or the plain ones)."""
        import timm
        from timm.models import load_checkpoint

        ex = example()
        model = timm.create_model(
            ex.MODEL, img_size=ex.IMG_SIZE, patch_size=ex.PATCH_SIZE, num_classes=ex.NUM_CLASSES
        )
        load_checkpoint(model, self.checkpoint, use_ema=ema)
        return model.eval()


def digits_store(root: Path):
    """`get() -> DigitsRun`: trains if no worker did (`build_once`), then loads."""
    loaded: list[DigitsRun] = []

    def get() -> DigitsRun:
        if not loaded:
            loaded.append(DigitsRun(build_once(root, _build)))
        return loaded[0]

    return get


def _build(tmp: Path) -> None:
    """Train, save and write the held-out PNGs to `tmp`."""
    ex = example()
    tmp.mkdir()
    train_images, train_labels, test_images, test_labels = ex.digits_split(seed=SEED)
    start = time.perf_counter()
    model, ema, optimizer, args = ex.train(train_images, train_labels, epochs=ex.EPOCHS, seed=SEED)
    train_seconds = time.perf_counter() - start
    ex.save_checkpoint(tmp / "checkpoint.pth.tar", model, ema, optimizer, args)
    (tmp / "labels.txt").write_text("\n".join(ex.LABELS) + "\n")
    pngs = ex.write_pngs(tmp / "heldout", test_images, test_labels)
    run = {
        "pngs": [p.name for p in pngs],
        "test_labels": [int(y) for y in test_labels],
        "train_seconds": round(train_seconds, 1),
    }
    (tmp / "run.json").write_text(json.dumps(run))
