"""Helpers shared by the tests (not part of deit_port)."""

import os

import timm
import torch

from deit_port.source import randomize_

DEVICE = torch.device(os.environ.get("TORCH_DEVICE", "cpu"))

# Every DeiT architecture timm registers, sorted; the tests parametrize over this list.
DEIT_VARIANTS = sorted(timm.list_models("deit*"))
FAST_VARIANTS = {"deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "deit3_small_patch16_224"}

# The contract, and how much tighter the conversion really is (measured, see README).
ATOL_CONTRACT = 1e-3
ATOL_MEASURED = 1e-4


def random_timm_model(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A timm model with `pretrained=False` whose every parameter is then overwritten."""
    model = timm.create_model(name, pretrained=False, **kwargs)
    return randomize_(model, seed).eval()


def model_output(model, x):
    """Logits (or final hidden states of a base model) of a timm or transformers model."""
    with torch.inference_mode():
        if isinstance(model, timm.models.VisionTransformer):
            return model(x) if model.num_classes else model.forward_features(x)
        out = model(pixel_values=x)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state
