"""Helpers shared by the tests (not part of deit_port)."""

import contextlib
import functools
import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.layers import LayerNorm

from deit_port import cli
from deit_port.arch import ArchSpec
from deit_port.parity import synthetic_image
from deit_port.registry import build_on_meta
from deit_port.source import randomize_

DEVICE = torch.device(os.environ.get("TORCH_DEVICE", "cpu"))

# The variants most tests convert: the smallest DeiT, and its distilled sibling.
TINY = "deit_tiny_patch16_224"
TINY_DISTILLED = "deit_tiny_distilled_patch16_224"

# The seed of the session's shared models (tests/variants.py) and of the cases that build
# their own of the same variant.
SEED = 1234

# Every DeiT architecture timm registers, sorted, and the plain timm ViTs the suite converts
# per variant: the per-variant tests parametrize over VARIANTS (tests/variants.py).
DEIT_VARIANTS = sorted(timm.list_models("deit*"))
# The plain timm ViTs whose shape adds something to the DeiTs (`deit-port list --all` has
# them all): patch 32 (at 224 and 384 px), patch 8, DINOv2's layer-scale patch 14 at 518 px,
# the `plus` width (896, 14 heads).
VIT_VARIANTS = sorted(
    [
        "vit_base_patch32_plus_256",
        "vit_small_patch14_dinov2",
        "vit_small_patch32_224",
        "vit_small_patch32_384",
        "vit_small_patch8_224",
    ]
)
# timm builds these without a classifier (num_classes=0): the suite gives them 10 classes, as
# a fine-tune would, so that every variant has logits and an image-classification pipeline.
VARIANT_KWARGS = {
    "vit_small_patch14_dinov2": {"num_classes": 10},
    "vit_small_patch8_224": {"num_classes": 10},
}
VARIANTS = sorted(DEIT_VARIANTS + VIT_VARIANTS)
# One variant of each family, small: every case runs on these; the others under --runslow.
FAST_VARIANTS = {TINY, TINY_DISTILLED, "deit3_small_patch16_224", "vit_small_patch32_224"}

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
# the forward passes short); a variant outside FAST_VARIANTS sees the first alone: what its
# size adds to the processor's path (the input size, the crop) one image shows.
MODEL_IMAGES = ("landscape", "smaller_than_crop", "rgba", "grayscale")


def model_images(name: str) -> tuple[str, ...]:
    """The `MODEL_IMAGES` the models of variant `name` see end to end."""
    return MODEL_IMAGES if name in FAST_VARIANTS else MODEL_IMAGES[:1]


def skip_or_fail(reason: str) -> None:
    """Skip with `reason`, or under CI=true fail with it: what CI installs (an optional runtime,
    a fault it can make) must be tested there, never skipped in silence."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: this must be tested, not skipped)", pytrace=False)
    pytest.skip(reason)


def need_module(name: str, extra: str = "onnx"):
    """`import name`, or `skip_or_fail` saying which extra installs it."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        skip_or_fail(f"{name} is not installed: pip install 'deit-port[{extra}]'")


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


def state_dict_copy(model) -> dict[str, torch.Tensor]:
    """A model's weights as a checkpoint holds them: detached, contiguous copies."""
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(obj, path: Path, how: str) -> Path:
    """`obj` saved as `how`: `safetensors`, `torch-zip` (torch.save) or `torch-pickle` (the
    legacy format); returns `path`."""
    from safetensors.torch import save_file

    if how == "safetensors":
        save_file(obj, path)
    elif how == "torch-zip":
        torch.save(obj, path)
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    return path


def random_init_args(seed: int) -> list[str]:
    """The command line's options for seeded random weights."""
    return ["--init", "random", "--seed", str(seed)]


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


# --- "one-line error, exit code N, nothing written" ---------------------------------------

ERROR_PREFIX = "deit-port: error: "


def one_error_line(err: str) -> str:
    """Assert that `err` (the whole of a run's stderr) is exactly one line, ended by a newline,
    that starts with `deit-port: error: `; return that line (without its newline)."""
    lines = err.splitlines(keepends=True)
    assert len(lines) == 1 and lines[0].endswith("\n"), f"not exactly one line: {err!r}"
    assert lines[0].startswith(ERROR_PREFIX), f"not a deit-port error: {err!r}"
    return lines[0].removesuffix("\n")


def _tree(root: Path) -> dict[str, str]:
    """`root` and every path under it -> what it is: "absent", "dir", "link to TARGET", or the
    sha256 of a file's bytes. Symbolic links are not followed."""
    if not root.exists() and not root.is_symlink():
        return {".": "absent"}
    tree = {}
    for p in [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]:
        rel = str(p.relative_to(root))
        if p.is_symlink():
            tree[rel] = f"link to {os.readlink(p)}"
        elif p.is_dir():
            tree[rel] = "dir"
        else:
            tree[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return tree


def _assert_same_tree(root: Path, before: dict[str, str]) -> None:
    after = _tree(root)
    assert after == before, (
        f"something was written or lost at {root}: "
        f"added {sorted(after.keys() - before.keys())}, "
        f"removed {sorted(before.keys() - after.keys())}, "
        f"changed {sorted(k for k in before.keys() & after.keys() if before[k] != after[k])}"
    )


@contextlib.contextmanager
def nothing_written(root: Path) -> Iterator[None]:
    """Assert that the block writes, changes and removes nothing at or under `root` (a folder,
    a file, or a path that must stay absent): every file keeps its bytes, no path is added or
    removed."""
    before = _tree(root)
    yield
    _assert_same_tree(root, before)


def cli_error_line(argv: Sequence[str], capsys, *, code: int = 2, unchanged: Path | None) -> str:
    """Run `deit-port ARGV` in this process; assert that it exits with `code` (2: bad input,
    1: a parity failure), that its stderr is exactly one line, `deit-port: error: ...`
    (`one_error_line`), and that it wrote nothing at or under `unchanged` (`nothing_written`;
    `None` only where the test checks what is left itself, e.g. a race another run writes in).

    Returns the error line. The run's stdout is read with it and dropped: a test that checks
    stdout too runs `cli.main` under `nothing_written` and reads `capsys` itself."""
    before = _tree(unchanged) if unchanged is not None else None
    returned = cli.main(list(argv))
    err = capsys.readouterr().err
    assert returned == code, f"exit {returned}, not {code}: {err!r}"
    line = one_error_line(err)
    if unchanged is not None:
        _assert_same_tree(unchanged, before)
    return line
