"""Train a DeiT with timm on real images, convert it with deit-port, classify with a transformers
pipeline: the whole walk, offline; the training takes about a minute on 2 idle CPU cores.

The data are scikit-learn's bundled handwritten digits (`sklearn.datasets.load_digits`: 1,797
real 8x8 grey images, shipped inside the wheel; nothing is downloaded).

1. Train timm's `deit_tiny_patch16_224` at 16 px (`img_size=16, patch_size=4, num_classes=10`)
   with timm's own pieces: `timm.create_model`, `timm.optim.create_optimizer_v2` (AdamW),
   `timm.scheduler.create_scheduler_v2` (one warmup epoch, then cosine), `timm.utils.ModelEmaV3`,
   and timm's eval transform for the model's data config (no augmentation).
2. Save the checkpoint as timm's `train.py` does (`state_dict`, `state_dict_ema`, `optimizer`,
   `args`, `epoch`, ...).
3. Convert it with nothing but the model name, the checkpoint, `--ema` and a labels file:
   `deit-port convert deit_tiny_patch16_224 OUT --checkpoint CKPT --ema --labels labels.txt`
   (classes, 16 px and patch 4 are read from the checkpoint).
4. Write the held-out digits as PNG files and classify them with
   `pipeline("image-classification", model=OUT)`, beside timm's eval transform + model.

Run: `python examples/train_convert_pipeline.py [WORKDIR] [--epochs N] [--seed S]`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image

MODEL = "deit_tiny_patch16_224"
IMG_SIZE, PATCH_SIZE, NUM_CLASSES = 16, 4, 10
LABELS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
EPOCHS, BATCH_SIZE, LR, EMA_DECAY = 6, 32, 1e-3, 0.99


def digits_split(
    seed: int = 0,
) -> tuple[list[Image.Image], np.ndarray, list[Image.Image], np.ndarray]:
    """The digits as PIL images (grey levels 0..16 scaled to 0..255), split 75/25, stratified."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    train_x, test_x, train_y, test_y = train_test_split(
        pixels, digits.target, test_size=0.25, random_state=seed, stratify=digits.target
    )

    def to_images(arrays):
        return [Image.fromarray(a, mode="L") for a in arrays]

    return to_images(train_x), train_y, to_images(test_x), test_y


def eval_transform(model: torch.nn.Module):
    """timm's eval transform for the model at its input size (what `validate.py --img-size 16`
    uses): resize to floor(16 / crop_pct), center crop 16, ImageNet mean/std."""
    from timm.data import create_transform, resolve_data_config

    return create_transform(**resolve_data_config({"img_size": IMG_SIZE}, model=model))


def to_batch(images: list[Image.Image], transform) -> torch.Tensor:
    return torch.stack([transform(img.convert("RGB")) for img in images])


def train(images: list[Image.Image], labels: np.ndarray, epochs: int = EPOCHS, seed: int = 0):
    """Train a DeiT from scratch; returns (model, ema, optimizer, args) as timm's train.py has
    them. Deterministic for a seed (fixed steps, seeded shuffles)."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

    torch.manual_seed(seed)
    model = timm.create_model(
        MODEL, pretrained=False, img_size=IMG_SIZE, patch_size=PATCH_SIZE, num_classes=NUM_CLASSES
    )
    x = to_batch(images, eval_transform(model))
    y = torch.as_tensor(labels)
    optimizer = create_optimizer_v2(model, opt="adamw", lr=LR, weight_decay=0.05)
    steps_per_epoch = -(-len(x) // BATCH_SIZE)
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched="cosine",
        num_epochs=epochs,
        warmup_epochs=1,
        warmup_lr=1e-5,
        min_lr=1e-5,
        step_on_epochs=False,
        updates_per_epoch=steps_per_epoch,
    )
    ema = ModelEmaV3(model, decay=EMA_DECAY, use_warmup=True)
    loss_fn = torch.nn.CrossEntropyLoss()
    shuffle = torch.Generator().manual_seed(seed)
    step = 0
    for epoch in range(epochs):
        model.train()
        for batch in torch.randperm(len(x), generator=shuffle).split(BATCH_SIZE):
            loss = loss_fn(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            scheduler.step_update(step)
            ema.update(model, step=step)
        print(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}", flush=True)
    args = argparse.Namespace(  # the arguments timm's train.py would have saved
        model=MODEL,
        num_classes=NUM_CLASSES,
        img_size=IMG_SIZE,
        input_size=None,
        model_kwargs={"patch_size": PATCH_SIZE},
        opt="adamw",
        lr=LR,
        weight_decay=0.05,
        sched="cosine",
        warmup_epochs=1,
        warmup_lr=1e-5,
        min_lr=1e-5,
        batch_size=BATCH_SIZE,
        epochs=epochs,
        model_ema=True,
        model_ema_decay=EMA_DECAY,
        seed=seed,
    )
    return model.eval(), ema.module.eval(), optimizer, args


def save_checkpoint(path: Path, model, ema, optimizer, args, metric: float | None = None) -> Path:
    """The checkpoint as timm's `CheckpointSaver` writes it."""
    torch.save(
        {
            "epoch": args.epochs - 1,
            "arch": args.model,
            "state_dict": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "version": 2,
            "args": args,
            "state_dict_ema": ema.state_dict(),
            "metric": metric,
        },
        path,
    )
    return path


@torch.inference_mode()
def timm_logits(model, images: list[Image.Image]) -> torch.Tensor:
    """The model's logits on images through timm's eval transform."""
    return model(to_batch(images, eval_transform(model)))


def write_pngs(folder: Path, images: list[Image.Image], labels: np.ndarray) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (img, label) in enumerate(zip(images, labels)):
        paths.append(folder / f"{i:04d}_{LABELS[label]}.png")
        img.save(paths[-1])
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", nargs="?", default="digits-deit", type=Path)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)

    train_images, train_labels, test_images, test_labels = digits_split(args.seed)
    print(f"digits: {len(train_images)} to train on, {len(test_images)} held out")
    model, ema, optimizer, train_args = train(train_images, train_labels, args.epochs, args.seed)
    for name, m in (("weights", model), ("EMA weights", ema)):
        acc = (timm_logits(m, test_images).argmax(-1).numpy() == test_labels).mean()
        print(f"timm, {name}: held-out accuracy {acc:.1%}")
    ckpt = save_checkpoint(work / "checkpoint.pth.tar", model, ema, optimizer, train_args)
    (work / "labels.txt").write_text("\n".join(LABELS) + "\n")

    hf_dir = work / "deit-digits-hf"
    command = [
        sys.executable,
        "-m",
        "deit_port.cli",
        "convert",
        MODEL,
        str(hf_dir),
        "--checkpoint",
        str(ckpt),
        "--ema",
        "--labels",
        str(work / "labels.txt"),
        "--overwrite",
    ]
    print("+", " ".join(command[2:]))
    subprocess.run(command, check=True)

    from transformers import pipeline

    paths = write_pngs(work / "heldout", test_images, test_labels)
    classifier = pipeline("image-classification", model=str(hf_dir))
    answers = classifier([str(p) for p in paths], top_k=1)
    hf_top1 = np.array([LABELS.index(a[0]["label"]) for a in answers])
    timm_top1 = timm_logits(ema, [Image.open(p) for p in paths]).argmax(-1).numpy()
    print(
        f"pipeline: held-out accuracy {(hf_top1 == test_labels).mean():.1%}; timm (EMA): "
        f"{(timm_top1 == test_labels).mean():.1%}; same top-1 on "
        f"{(hf_top1 == timm_top1).sum()}/{len(paths)} images"
    )
    return 0 if (hf_top1 == timm_top1).all() else 1


if __name__ == "__main__":
    raise SystemExit(main())
