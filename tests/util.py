"""Helpers shared by the tests (not part of deit_port)."""

import functools
import os
import subprocess
import sys

import numpy as np
import timm
import torch
from PIL import Image
from timm.layers import LayerNorm

from deit_port.arch import ArchSpec
from deit_port.parity import synthetic_image
from deit_port.registry import build_on_meta
from deit_port.source import randomize_

DEVICE = torch.device(os.environ.get("TORCH_DEVICE", "cpu"))

# Every DeiT architecture timm registers, sorted; the tests parametrize over this list.
DEIT_VARIANTS = sorted(timm.list_models("deit*"))
FAST_VARIANTS = {
    "deit_tiny_patch16_224",
    "deit_tiny_distilled_patch16_224",
    "deit3_small_patch16_224",
}

# The contract, and how much tighter the conversion really is (measured: docs/parity-variants.md).
ATOL_CONTRACT = 1e-3
ATOL_MEASURED = 1e-4


def random_timm_model(name: str | ArchSpec, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A timm model (a registered name, or `build_timm_model(spec)`) with `pretrained=False`,
    every parameter then overwritten (`randomize_`, seeded), in eval mode.

    Built on the meta device (a registered name without timm's init: `build_on_meta`, which
    tests/test_arch.py checks is timm's model) and materialised uninitialised: timm's own init
    would only be overwritten (tests/test_randomize.py checks that every parameter is)."""
    if isinstance(name, ArchSpec):
        with torch.device("meta"):
            model = build_timm_model(name, **kwargs)
    else:
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


def timm_kwargs(spec: ArchSpec) -> dict:
    """The `VisionTransformer(**kwargs)` of `spec` (layer scale drawn as `init_values`)."""
    ratio = spec.mlp_hidden / spec.embed_dim
    assert int(spec.embed_dim * ratio) == spec.mlp_hidden, "MLP ratio not exact"
    return {
        "img_size": spec.img_size,
        "patch_size": spec.patch_size,
        "in_chans": spec.in_chans,
        "num_classes": spec.num_classes,
        "embed_dim": spec.embed_dim,
        "depth": spec.depth,
        "num_heads": spec.num_heads,
        "mlp_ratio": ratio,
        "qkv_bias": spec.qkv_bias,
        "init_values": 0.5 if spec.layer_scale else None,
        "no_embed_class": spec.no_embed_class,
        "norm_layer": functools.partial(LayerNorm, eps=spec.eps),
    }


def build_timm_model(spec: ArchSpec, **overrides) -> torch.nn.Module:
    """timm's `VisionTransformer` (or `VisionTransformerDistilled`) of `spec`, built directly
    (timm's own init) on the current default device: wrap in `torch.device("meta")` for the
    structure only."""
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    cls = VisionTransformerDistilled if spec.distilled else VisionTransformer
    return cls(**(timm_kwargs(spec) | overrides)).eval()


def assert_state_dicts_equal(actual: dict, expected: dict, what: str) -> None:
    """The same keys, and per key the same dtype, shape and bits (NaN == NaN, -0.0 != 0.0)."""
    assert sorted(actual) == sorted(expected), (
        f"{what}: keys differ: missing {sorted(set(expected) - set(actual))}, "
        f"unexpected {sorted(set(actual) - set(expected))}"
    )
    for key, value in expected.items():
        assert_bitwise_equal(actual[key], value, f"{what}: {key}")


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Same dtype, same shape, same bits."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, (
        f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    )

    def bits(t):  # a fresh copy: a size-1 dim may keep any stride, which view() refuses
        return t.reshape(-1).clone(memory_format=torch.contiguous_format).view(torch.uint8)

    assert torch.equal(bits(actual), bits(expected)), f"{what}: values differ"


def run_python(*args, env: dict | None = None, timeout: float = 600, **kwargs):
    """`python ARGS...` in a subprocess (this interpreter), output captured as text."""
    return subprocess.run(
        [sys.executable, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **(env or {})},
        **kwargs,
    )


def model_output(model, x):
    """Logits (or final hidden states of a base model) of a timm or transformers model."""
    with torch.inference_mode():
        if isinstance(model, timm.models.VisionTransformer):
            return model(x) if model.num_classes else model.forward_features(x)
        out = model(pixel_values=x)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


def dead_pid() -> int:
    """The pid of a process that has exited (a child that printed its pid and ended)."""
    r = run_python("-c", "import os; print(os.getpid())", timeout=120)
    assert r.returncode == 0, r.stderr
    return int(r.stdout)
