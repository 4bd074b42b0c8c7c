"""Parity checking: the same inputs through the timm model and the converted transformers model."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from .errors import ParityError
from .tolerances import DEFAULT_ATOL

__all__ = [
    "ParityError",
    "ParityReport",
    "StageDiff",
    "check_parity",
    "compare_outputs",
    "compare_tensors",
    "data_config",
    "parity_inputs",
    "reference_outputs",
    "reference_stages",
    "synthetic_image",
]


@dataclass(frozen=True)
class StageDiff:
    """How far apart the two models are after one stage (`embeddings`, `block 5 output`, ...)."""

    stage: str
    max_abs_diff: float
    mean_abs_diff: float

    def exceeds(self, atol: float) -> bool:
        return not self.max_abs_diff <= atol  # NaN exceeds too


@dataclass(frozen=True)
class ParityReport:
    """How closely two models agree on a batch of inputs.

    `passed` is the contract on the final output (logits, or a base model's hidden states).
    With `layers` (`check_parity(..., layers=True)`), every stage is compared too, at the same
    atol: `first_divergence` is the first stage past it, the place the two models part.
    Activations inside the network are larger than logits, so a passing model may still have
    a stage past atol; it is reported (`table`), not failed.
    """

    inputs: int
    output: str
    shape_timm: tuple[int, ...]
    shape_hf: tuple[int, ...]
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float | None
    atol: float
    layers: tuple[StageDiff, ...] = ()

    @property
    def passed(self) -> bool:
        return self.shape_timm == self.shape_hf and self.max_abs_diff <= self.atol

    @property
    def first_divergence(self) -> StageDiff | None:
        """The first stage whose max |diff| exceeds atol (None without `layers`, or if none)."""
        return next((s for s in self.layers if s.exceeds(self.atol)), None)

    def summary(self) -> str:
        top1 = "" if self.top1_agreement is None else f", top-1 agreement {self.top1_agreement:.0%}"
        verdict = "PASS" if self.passed else "FAIL"
        where = ""
        if not self.passed and (first := self.first_divergence) is not None:
            where = f"; first divergence: {first.stage}, max |diff| {first.max_abs_diff:.3g}"
        return (
            f"parity {verdict}: {self.output} {self.shape_hf} on {self.inputs} inputs, "
            f"max |diff| {self.max_abs_diff:.3g}, mean |diff| {self.mean_abs_diff:.3g}{top1} "
            f"(atol {self.atol:g}){where}"
        )

    def table(self) -> str:
        """The per-stage comparison, one line a stage (empty without `layers`)."""
        if not self.layers:
            return ""
        width = max(len("stage"), *(len(s.stage) for s in self.layers))
        first = self.first_divergence
        lines = [f"{'stage':{width}s}  {'max |diff|':>10s}  {'mean |diff|':>11s}"]
        for s in self.layers:
            mark = "  <- first divergence" if s is first else ""
            lines.append(
                f"{s.stage:{width}s}  {s.max_abs_diff:10.3g}  {s.mean_abs_diff:11.3g}{mark}"
            )
        return "\n".join(lines)


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


def _timm_output(model: Any, x: torch.Tensor, cls_head_only: bool = False) -> torch.Tensor:
    """timm's output that the converted model computes (`model`: a timm VisionTransformer)."""
    if model.num_classes == 0:
        return model.forward_features(x)  # every token after the final norm
    if cls_head_only:  # a distilled model's class-token head alone (`--head cls`)
        return model.head(model.forward_features(x)[:, 0])
    return model(x)


def _hf_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(pixel_values=x)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _output_name(tensor: torch.Tensor) -> str:
    return "logits" if tensor.ndim == 2 else "hidden states"  # (B, classes) or (B, tokens, D)


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


def _copy(t: torch.Tensor) -> torch.Tensor:
    """A float32 CPU copy, safe from later in-place changes to `t`."""
    return t.detach().to("cpu", torch.float32, copy=True)


class _Recorder:
    """Forward hooks that keep a module's output (or first input) under a stage name."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def output(self, module: nn.Module, stage: str) -> None:
        def hook(_module, _args, out):
            self.tensors[stage] = _copy(out)

        self._handles.append(module.register_forward_hook(hook))

    def input(self, module: nn.Module | None, stage: str) -> None:
        if module is None:
            return

        def hook(_module, args):
            self.tensors[stage] = _copy(args[0])

        self._handles.append(module.register_forward_pre_hook(hook))

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


@torch.inference_mode()
def reference_stages(
    timm_model: Any, inputs: torch.Tensor, cls_head_only: bool = False
) -> dict[str, torch.Tensor]:
    """The timm model's activations after every stage, in float32 on the CPU, in order.

    Stages: `embeddings` (patch embedding, prefix tokens and position embedding: the output
    of `pos_drop`), `block N output` for each block, `final norm`, and with a classifier the
    tokens its heads read (`class token`, `distillation token`) and `logits`. The last entry
    is what `reference_outputs` returns (with `cls_head_only`, as there). Taken with forward
    hooks during one forward pass.

    Example:
        >>> list(reference_stages(model, x))[:2]
        ['embeddings', 'block 0 output']
    """
    timm_model.eval()
    device = next(timm_model.parameters()).device
    with contextlib.closing(_Recorder()) as rec:
        rec.output(timm_model.pos_drop, "embeddings")
        for i, block in enumerate(timm_model.blocks):
            rec.output(block, f"block {i} output")
        rec.output(timm_model.norm, "final norm")
        if timm_model.num_classes:
            rec.input(timm_model.head, "class token")
            rec.input(getattr(timm_model, "head_dist", None), "distillation token")
        out = _timm_output(timm_model, inputs.to(device), cls_head_only).float().cpu()
    stages = rec.tensors
    if timm_model.num_classes:
        stages["logits"] = out
    return stages


def _hf_stages(model: Any, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The transformers model's activations under the names `reference_stages` uses:
    `output_hidden_states=True` gives the embeddings and each layer's output; hooks give the
    final layernorm and what the classifiers read."""
    with contextlib.closing(_Recorder()) as rec:
        rec.output(model.base_model.layernorm, "final norm")
        rec.input(
            getattr(model, "cls_classifier", None) or getattr(model, "classifier", None),
            "class token",
        )
        rec.input(getattr(model, "distillation_classifier", None), "distillation token")
        out = model(pixel_values=x, output_hidden_states=True)
    hidden = [h.float().cpu() for h in out.hidden_states]
    stages = {"embeddings": hidden[0]}
    stages |= {f"block {i} output": h for i, h in enumerate(hidden[1:])}
    stages |= rec.tensors
    if hasattr(out, "logits"):
        stages["logits"] = out.logits.float().cpu()
    return stages


def _stage_diffs(
    expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]
) -> tuple[StageDiff, ...]:
    """Per stage of `expected`, in its order; a stage the other side lacks, or of another
    shape, is infinitely far."""
    rows = []
    for stage, a in expected.items():
        b = actual.get(stage)
        if b is None or a.shape != b.shape:
            rows.append(StageDiff(stage, float("inf"), float("inf")))
            continue
        diff = (a - b).abs()
        rows.append(StageDiff(stage, float(diff.max()), float(diff.mean())))
    return tuple(rows)


def compare_tensors(
    expected: torch.Tensor,
    actual: torch.Tensor,
    atol: float = DEFAULT_ATOL,
    output: str | None = None,
    layers: tuple[StageDiff, ...] = (),
) -> ParityReport:
    """Compare two models' outputs on the same batch (`expected` is the reference's).

    Args:
        expected, actual: logits `(B, classes)` or hidden states `(B, tokens, D)`.
        atol: the contract.
        output: what is compared, in words (default: `logits` or `hidden states` by shape).
        layers: per-stage differences to carry in the report.

    Returns:
        A `ParityReport`; top-1 agreement for logits.
    """
    a, b = expected.float().cpu(), actual.float().cpu()
    is_logits = a.ndim == 2
    output = output or _output_name(a)
    if a.shape != b.shape:
        inf = float("inf")
        return ParityReport(
            len(a), output, tuple(a.shape), tuple(b.shape), inf, inf, None, atol, layers
        )
    diff = (a - b).abs()
    top1 = float((a.argmax(-1) == b.argmax(-1)).float().mean()) if is_logits else None
    return ParityReport(
        inputs=len(a),
        output=output,
        shape_timm=tuple(a.shape),
        shape_hf=tuple(b.shape),
        max_abs_diff=float(diff.max()),
        mean_abs_diff=float(diff.mean()),
        top1_agreement=top1,
        atol=atol,
        layers=layers,
    )


@torch.inference_mode()
def compare_outputs(
    expected: torch.Tensor,
    hf_model: nn.Module,
    inputs: torch.Tensor,
    atol: float = DEFAULT_ATOL,
    stages: dict[str, torch.Tensor] | None = None,
) -> ParityReport:
    """Run the transformers model on `inputs` and compare with `reference_outputs`.

    With `stages` (`reference_stages` of the same inputs), every stage is compared too and the
    report's `layers` / `first_divergence` say where the two models part.
    """
    hf_model.eval()
    device = next(hf_model.parameters()).device
    x = inputs.to(device)
    if stages is None:
        return compare_tensors(expected, _hf_output(hf_model, x), atol)
    actual = _hf_stages(hf_model, x)
    output = actual["logits"] if "logits" in actual else actual["final norm"]
    return compare_tensors(expected, output, atol, layers=_stage_diffs(stages, actual))


def check_parity(
    timm_model: nn.Module,
    hf_model: nn.Module,
    inputs: torch.Tensor,
    atol: float = DEFAULT_ATOL,
    layers: bool = False,
    cls_head_only: bool = False,
) -> ParityReport:
    """Run both models (eval mode) on `inputs` and compare logits (or, for base models, the
    final hidden states).

    Args:
        timm_model: the source model.
        hf_model: the converted transformers model.
        inputs: a `(B, C, H, W)` batch; moved to each model's device.
        atol: the contract: `passed` means equal shapes and max |diff| <= atol.
        layers: compare every stage too (`reference_stages`): the report's `table()` lists
            them and `first_divergence` names the first one past `atol`.
        cls_head_only: compare with a distilled timm model's class-token head alone (the
            reference of a `--head cls` conversion, see `reference_outputs`).

    Returns:
        A `ParityReport`; nothing is raised on a mismatch, callers decide.

    Example:
        >>> report = check_parity(timm_model, hf_model, x, layers=True)
        >>> print(report.table())
    """
    if not layers:
        expected = reference_outputs(timm_model, inputs, cls_head_only)
        return compare_outputs(expected, hf_model, inputs, atol)
    stages = reference_stages(timm_model, inputs, cls_head_only)
    expected = next(reversed(stages.values()))
    return compare_outputs(expected, hf_model, inputs, atol, stages=stages)
