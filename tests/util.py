"""Helpers shared by the tests (not part of deit_port)."""

import functools
import os
from functools import partial

import numpy as np
import timm
import torch
from PIL import Image

from deit_port.parity import synthetic_image
from deit_port.source import build_on_meta, randomize_

DEVICE = torch.device(os.environ.get("TORCH_DEVICE", "cpu"))

# Every DeiT architecture timm registers, sorted; the tests parametrize over this list.
DEIT_VARIANTS = sorted(timm.list_models("deit*"))
FAST_VARIANTS = {"deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "deit3_small_patch16_224"}

# The contract, and how much tighter the conversion really is (measured, see README).
ATOL_CONTRACT = 1e-3
ATOL_MEASURED = 1e-4


def random_timm_model(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A timm model with `pretrained=False` whose every parameter is then overwritten.

    Built on the meta device without timm's init (`build_on_meta`; tests/test_arch.py checks
    it is timm's model) and materialised uninitialised: timm's own init would only be
    overwritten (tests/test_randomize.py checks that every parameter is)."""
    model = build_on_meta(name, **kwargs)
    assert not list(model.buffers()), f"{name} has buffers that randomize_ does not set"
    return randomize_(model.to_empty(device="cpu"), seed).eval()


# The images the models see in the preprocessing cases (a subset of `sample_images`, to keep
# the forward passes short).
MODEL_IMAGES = ("landscape", "smaller_than_crop", "rgba", "grayscale")


def _rgba(seed: int, size: tuple[int, int]) -> Image.Image:
    """An RGBA image whose top third is fully transparent and the rest a left-to-right ramp."""
    w, h = size
    img = synthetic_image(seed, size).convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, w).astype(np.uint8), (h, 1))
    alpha[: h // 3] = 0
    img.putalpha(Image.fromarray(alpha))
    return img


def sample_images() -> dict[str, Image.Image]:
    """The test images, in the modes a user has them. None of them is a crop-offset tie for
    the 224/0.9, 384/1.0 and 160/0.9 configs (see test_crop_offset_tie_is_one_pixel).

    Made once per process; do not change them in place (`convert` returns a new image)."""
    return dict(_sample_images())


@functools.cache
def _sample_images() -> dict[str, Image.Image]:
    return {
        "landscape": synthetic_image(11, (320, 240)),
        "portrait": synthetic_image(12, (240, 320)),
        "square": synthetic_image(13, (300, 300)),
        "smaller_than_crop": synthetic_image(14, (100, 80)),
        "wide": synthetic_image(15, (640, 200)),
        "rgba": _rgba(16, (280, 210)),
        "grayscale": synthetic_image(17, (210, 280)).convert("L"),
    }


def model_output(model, x):
    """Logits (or final hidden states of a base model) of a timm or transformers model."""
    with torch.inference_mode():
        if isinstance(model, timm.models.VisionTransformer):
            return model(x) if model.num_classes else model.forward_features(x)
        out = model(pixel_values=x)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


def timm_model_for_spec(spec) -> torch.nn.Module:
    """An (uninitialised-weights) timm model of the architecture `spec` describes."""
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    cls = VisionTransformerDistilled if spec.distilled else VisionTransformer
    return cls(
        img_size=spec.img_size, patch_size=spec.patch_size, in_chans=spec.in_chans,
        num_classes=spec.num_classes, embed_dim=spec.embed_dim, depth=spec.depth,
        num_heads=spec.num_heads, mlp_ratio=spec.mlp_hidden / spec.embed_dim,
        qkv_bias=spec.qkv_bias, no_embed_class=spec.no_embed_class,
        init_values=1.0 if spec.layer_scale else None,
        norm_layer=partial(torch.nn.LayerNorm, eps=spec.eps),
    )
