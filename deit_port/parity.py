"""Parity checking: the same inputs through the timm model and the converted transformers model."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

__all__ = [
    "ParityReport",
    "check_parity",
    "compare_outputs",
    "data_config",
    "parity_inputs",
    "reference_outputs",
    "synthetic_image",
]

DEFAULT_ATOL = 1e-3


@dataclass(frozen=True)
class ParityReport:
    """How closely two models agree on a batch of inputs."""

    inputs: int
    output: str
    shape_timm: tuple[int, ...]
    shape_hf: tuple[int, ...]
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float | None
    atol: float

    @property
    def passed(self) -> bool:
        return self.shape_timm == self.shape_hf and self.max_abs_diff <= self.atol

    def summary(self) -> str:
        top1 = "" if self.top1_agreement is None else f", top-1 agreement {self.top1_agreement:.0%}"
        verdict = "PASS" if self.passed else "FAIL"
        return (
            f"parity {verdict}: {self.output} {self.shape_hf} on {self.inputs} inputs, "
            f"max |diff| {self.max_abs_diff:.3g}, mean |diff| {self.mean_abs_diff:.3g}{top1} "
            f"(atol {self.atol:g})"
        )

    def as_dict(self) -> dict:
        return asdict(self) | {"passed": self.passed}


def synthetic_image(seed: int = 0, size: tuple[int, int] = (320, 240)) -> Image.Image:
    """A deterministic, real-looking RGB test image: smooth gradients, shapes and noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, 3)
    freq = rng.uniform(0.005, 0.03, 3)
    rgb = np.stack(
        [127 + 100 * np.sin(freq[c] * (x + 0.7 * y) + phase[c]) for c in range(3)], axis=-1
    )
    img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = rng.integers(0, w - 10), rng.integers(0, h - 10)
        x1, y1 = x0 + rng.integers(10, w // 2), y0 + rng.integers(10, h // 2)
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=color)
    noise = rng.normal(0, 8, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(img) + noise, 0, 255).astype(np.uint8))


def parity_inputs(
    timm_model: nn.Module, n: int = 4, seed: int = 0, images: list[Image.Image] | None = None
) -> torch.Tensor:
    """A batch for the parity check: preprocessed images, topped up with N(0, 1) tensors.

    Images (by default one `synthetic_image`) go through timm's own eval transform for the
    model (`resolve_data_config` + `create_transform`), as timm evaluates it.
    """
    from timm.data import create_transform

    if images is None:
        images = [synthetic_image(seed)]
    transform = create_transform(**data_config(timm_model))
    batch = [transform(img.convert("RGB")) for img in images]
    shape = batch[0].shape
    g = torch.Generator().manual_seed(seed)
    batch += [torch.randn(shape, generator=g) for _ in range(max(0, n - len(batch)))]
    return torch.stack(batch)


def data_config(timm_model: nn.Module) -> dict:
    """timm's eval data config for the model (`resolve_data_config`), at the model's own input
    size: a model built with another `img_size` keeps its pretrained config's 224 otherwise."""
    from timm.data import resolve_data_config

    config = resolve_data_config(model=timm_model)
    img_size = getattr(getattr(timm_model, "patch_embed", None), "img_size", None)
    if img_size is not None:
        config["input_size"] = (config["input_size"][0], *img_size)
    return config


def _timm_output(model: nn.Module, x: torch.Tensor, cls_head_only: bool = False) -> torch.Tensor:
    if model.num_classes == 0:
        return model.forward_features(x)  # every token after the final norm
    if cls_head_only:  # a distilled model's class-token head alone (`--head cls`)
        return model.head(model.forward_features(x)[:, 0])
    return model(x)


def _hf_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(pixel_values=x)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@torch.inference_mode()
def reference_outputs(
    timm_model: nn.Module, inputs: torch.Tensor, cls_head_only: bool = False
) -> torch.Tensor:
    """The timm model's logits (or, for a base model, final hidden states) on `inputs`, in
    float32 on the CPU: computed once, so the timm model can be freed before the HF one loads.
    With `cls_head_only`, a distilled model's class-token head alone,
    `model.head(model.forward_features(x)[:, 0])`, instead of timm's average of both heads."""
    timm_model.eval()
    device = next(timm_model.parameters()).device
    return _timm_output(timm_model, inputs.to(device), cls_head_only).float().cpu()


@torch.inference_mode()
def compare_outputs(
    expected: torch.Tensor,
    hf_model: nn.Module,
    inputs: torch.Tensor,
    atol: float = DEFAULT_ATOL,
) -> ParityReport:
    """Run the transformers model on `inputs` and compare with `reference_outputs`."""
    hf_model.eval()
    device = next(hf_model.parameters()).device
    a = expected
    b = _hf_output(hf_model, inputs.to(device)).float().cpu()
    is_logits = a.ndim == 2  # (B, classes); a base model's hidden states are (B, tokens, D)
    output = "logits" if is_logits else "hidden states"
    if a.shape != b.shape:
        return ParityReport(
            len(inputs), output, tuple(a.shape), tuple(b.shape), float("inf"), float("inf"),
            None, atol,
        )
    diff = (a - b).abs()
    top1 = float((a.argmax(-1) == b.argmax(-1)).float().mean()) if is_logits else None
    return ParityReport(
        inputs=len(inputs),
        output=output,
        shape_timm=tuple(a.shape),
        shape_hf=tuple(b.shape),
        max_abs_diff=float(diff.max()),
        mean_abs_diff=float(diff.mean()),
        top1_agreement=top1,
        atol=atol,
    )


def check_parity(
    timm_model: nn.Module,
    hf_model: nn.Module,
    inputs: torch.Tensor,
    atol: float = DEFAULT_ATOL,
    cls_head_only: bool = False,
) -> ParityReport:
    """Run both models (eval mode) on `inputs` and compare logits (or, for base models, the
    final hidden states).

    Args:
        timm_model: the source model.
        hf_model: the converted transformers model.
        inputs: a `(B, C, H, W)` batch; moved to each model's device.
        atol: the contract: `passed` means equal shapes and max |diff| <= atol.
        cls_head_only: compare with a distilled timm model's class-token head alone (the
            reference of a `--head cls` conversion, see `reference_outputs`).

    Returns:
        A `ParityReport`; nothing is raised on a mismatch, callers decide.
    """
    expected = reference_outputs(timm_model, inputs, cls_head_only)
    return compare_outputs(expected, hf_model, inputs, atol)
