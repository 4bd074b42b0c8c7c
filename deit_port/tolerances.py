"""Every tolerance deit_port checks against, in one place, with what it bounds.

All are max |diff| bounds (absolute), compared with `<=`; NaN never passes.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_ATOL",
    "DTYPE_ATOL",
    "ONNX_ATOL",
    "PIL_ATOL",
    "PIXEL_ATOL",
    "TORCHVISION_ATOL",
]

# The parity contract: logits (or a base model's hidden states) of the converted model vs timm,
# in float32. The conversion is exact up to float ordering: measured <= 1e-5 on every variant
# (docs/parity-variants.md).
DEFAULT_ATOL = 1e-3

# The parity bound of a folder written in each dtype, loaded back as float32. float16/bfloat16
# round every weight (relative 2**-11 / 2**-8); the margin over the measured shifts
# (docs/measurements.md) is for trained models, whose logits are larger than seeded random ones.
DTYPE_ATOL = {"float32": DEFAULT_ATOL, "float16": 5e-2, "bfloat16": 5e-1}

# onnxruntime vs the torch model it was exported from (docs/parity.md).
ONNX_ATOL = 1e-4

# Normalised pixels of a folder's image processor vs timm's eval transform. PIL backend: the
# same pixels (the slack only absorbs float ordering; one uint8 level is >= 0.0039 / std).
# Torchvision backend: its own bicubic kernel, single values up to a dozen uint8 levels apart
# at sharp edges (docs/measurements.md).
PIL_ATOL = 1e-6
TORCHVISION_ATOL = 0.25
PIXEL_ATOL = {"pil": PIL_ATOL, "torchvision": TORCHVISION_ATOL}
