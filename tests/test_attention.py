"""Both attention kernels, and attention maps.

The converted folder, loaded with `attn_implementation="eager"` and with `"sdpa"`, matches
timm's logits within `ATOL_MEASURED` (1e-4); with eager attention, `output_attentions=True`
returns per-layer maps `(batch, heads, tokens, tokens)` equal to timm's attention
probabilities (timm's `Attention` with `fused_attn = False`, captured at the input of
`attn.attn_drop`, i.e. right after the softmax) within `ATOL_ATTENTION` (1e-5).

The measured numbers are recorded (`record_property`) and printed at the end of the run;
docs/parity.md lists them with this file's command. Each variant is the session's shared
conversion (tests/variants.py): its transformers model, loaded with the default kernel (sdpa),
gives the sdpa outputs from its one pass; the eager kernel needs a model loaded of its own,
which makes one pass (`eager_pass`) for both its logits and its attention maps.
"""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageClassification

from .util import ATOL_MEASURED, FAST_VARIANTS, model_output
from .variants import variant_params

ATOL_ATTENTION = 1e-5  # attention probabilities lie in [0, 1]
KERNELS = ["eager", "sdpa"]
VARIANTS = variant_params(sorted(FAST_VARIANTS))  # deit tiny, deit tiny distilled, deit3 small


def _load(folder: Path, kernel: str):
    model = AutoModelForImageClassification.from_pretrained(folder, attn_implementation=kernel)
    assert model.config._attn_implementation == kernel, model.config._attn_implementation
    return model.eval()


@pytest.fixture(scope="module")
def eager_pass(converted_variant):
    """`get(variant) -> (logits, attention maps)`: the folder loaded with eager attention, one
    pass over the shared parity inputs with `output_attentions=True`, once per variant."""
    done: dict[str, tuple] = {}

    def get(variant: str) -> tuple:
        if variant not in done:
            b = converted_variant(variant)
            with torch.inference_mode():
                out = _load(b.folder, "eager")(pixel_values=b.inputs, output_attentions=True)
            done[variant] = (out.logits, out.attentions)
        return done[variant]

    return get


@torch.inference_mode()
def _timm_attention_maps(timm_model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """timm's attention probabilities, one `(B, heads, T, T)` tensor a block: the unfused path
    (`fused_attn = False`) computes them explicitly and feeds them to `attn_drop`."""
    maps, handles = [], []
    fused = [block.attn.fused_attn for block in timm_model.blocks]
    try:
        for block in timm_model.blocks:
            block.attn.fused_attn = False
            handles.append(
                block.attn.attn_drop.register_forward_pre_hook(
                    lambda _m, args: maps.append(args[0].clone())
                )
            )
        timm_model(x)
    finally:
        for handle in handles:
            handle.remove()
        for block, was in zip(timm_model.blocks, fused):
            block.attn.fused_attn = was
    return maps


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_both_kernels_match_timm(variant, kernel, converted_variant, eager_pass, record_property):
    b = converted_variant(variant)
    expected = b.expected  # timm's outputs on b.inputs, computed when the variant was built
    if kernel == b.hf_model.config._attn_implementation:  # the shared model's one pass
        actual = b.hf_outputs.inputs
    elif kernel == "eager":
        actual = eager_pass(variant)[0]
    else:
        actual = model_output(_load(b.folder, kernel), b.inputs)
    diff = (actual - expected).abs()
    record_property("variant", f"{variant} ({kernel} attention)")
    record_property("max_abs_diff", float(diff.max()))
    record_property("mean_abs_diff", float(diff.mean()))
    torch.testing.assert_close(
        actual,
        expected,
        atol=ATOL_MEASURED,
        rtol=0,
        msg=lambda m: f"{variant}, {kernel} attention, beyond {ATOL_MEASURED}: {m}",
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_eager_attention_maps_equal_timms(variant, converted_variant, eager_pass, record_property):
    b = converted_variant(variant)
    expected = _timm_attention_maps(b.timm_model, b.inputs)
    actual = eager_pass(variant)[1]
    tokens = b.spec.num_prefix_tokens + (b.spec.img_size // b.spec.patch_size) ** 2
    shape = (len(b.inputs), b.spec.num_heads, tokens, tokens)
    assert len(actual) == len(expected) == b.spec.depth, (len(actual), len(expected))
    worst, means = 0.0, []
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert tuple(a.shape) == tuple(e.shape) == shape, (i, a.shape, e.shape, shape)
        # probabilities: every row sums to one (a check that does not lean on timm)
        torch.testing.assert_close(a.sum(-1), torch.ones(shape[:-1]), atol=1e-5, rtol=0)
        torch.testing.assert_close(
            a,
            e,
            atol=ATOL_ATTENTION,
            rtol=0,
            msg=lambda m, i=i: (
                f"{variant}: attention map of block {i} beyond {ATOL_ATTENTION}: {m}"
            ),
        )
        worst = max(worst, float((a - e).abs().max()))
        means.append(float((a - e).abs().mean()))
    record_property(
        "measured",
        [
            (
                "attention maps (eager)",
                variant,
                f"max {worst:.3g}, mean {sum(means) / len(means):.3g}",
            )
        ],
    )
