"""The parity check catches mistakes: every single wrong step in a conversion makes it fail.

Each mutation below is one plausible bug in a converter, applied to the result of a correct
conversion (the hub-format state dict and the config) of a tiny but real DeiT (timm's own
DeiT tiny / DeiT tiny distilled / DeiT III small at depth 2, 224 px, every parameter drawn by
`randomize_`). The mutated model must fail parity at the suite's measured bound
(`ATOL_MEASURED`, 1e-4), through both the suite's comparison and `deit_port.parity.check_parity`,
the gate the converter uses before writing. A mutation that survives is a hole in the suite.

The layer-by-layer check (`check_parity(..., layers=True)`) must also name the stage where the
mutation sits as the first divergence: a mutation in block k first shows at `block k output`,
one in the embeddings at `embeddings`, in the final norm at `final norm`, in a classifier at
`logits`. A LayerNorm eps acts first in block 0's norm1 (the embeddings have no norm). This
proves the diagnosis, not just the failure.

Mutations that change nothing mathematically are not listed: the key bias (softmax ignores a
per-query constant), or swapping only the biases of the two distilled heads (their outputs are
averaged).

Whether each one also breaks the contract (`ATOL_CONTRACT`, 1e-3) is recorded as the test
property `breaks_contract`; see docs/measurements.md, "Property suite".
"""

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from deit_port.convert import ArchSpec, build_config, timm_to_hf
from deit_port.hf_folder import load_hf_state_dict
from deit_port.parity import ParityReport, check_parity, parity_inputs

from .util import (
    ATOL_CONTRACT,
    ATOL_MEASURED,
    TINY,
    TINY_DISTILLED,
    model_output,
    random_timm_model,
)

SEED = 5
DEIT, DISTILLED, DEIT3 = TINY, TINY_DISTILLED, "deit3_small_patch16_224"


@dataclass
class Converted:
    """A correct conversion and what it is compared against."""

    timm_model: torch.nn.Module
    spec: ArchSpec
    state_dict: dict  # hub format, as timm_to_hf returns it
    config: object
    inputs: torch.Tensor
    expected: torch.Tensor


@pytest.fixture(scope="module")
def converted():
    cache = {}

    def get(name: str) -> Converted:
        if name not in cache:
            model = random_timm_model(name, seed=SEED, depth=2)
            spec = ArchSpec.from_timm(model)
            x = parity_inputs(model, n=4, seed=SEED)
            cache[name] = Converted(
                model,
                spec,
                timm_to_hf(model.state_dict(), spec),
                build_config(spec),
                x,
                model_output(model, x),
            )
        return cache[name]

    return get


def _layer(spec: ArchSpec, i: int) -> str:
    return f"{'deit.' if spec.distilled else 'vit.'}encoder.layer.{i}."


def _emb(spec: ArchSpec) -> str:
    return f"{'deit.' if spec.distilled else 'vit.'}embeddings."


def _swap(sd: dict, a: str, b: str) -> None:
    sd[a], sd[b] = sd[b], sd[a]


def _swap_modules(sd: dict, a: str, b: str) -> None:
    for param in ("weight", "bias"):
        _swap(sd, f"{a}.{param}", f"{b}.{param}")


# Each mutation: (model, fn(c, sd, config)) where sd and config are fresh copies to change.
def _q_k(c, sd, config, layer=0):
    att = _layer(c.spec, layer) + "attention.attention."
    _swap_modules(sd, att + "query", att + "key")


def _q_k_layer1(c, sd, config):
    _q_k(c, sd, config, layer=1)


def _k_v(c, sd, config):
    att = _layer(c.spec, 0) + "attention.attention."
    _swap_modules(sd, att + "key", att + "value")


def _norm1_norm2(c, sd, config, layer=0):
    layer = _layer(c.spec, layer)
    _swap_modules(sd, layer + "layernorm_before", layer + "layernorm_after")


def _norm1_norm2_layer1(c, sd, config):
    _norm1_norm2(c, sd, config, layer=1)


def _final_norm_from_last_block(c, sd, config):
    """The final norm taken from the last block's norm2 (a `norm` pattern matching too much)."""
    prefix = "deit." if c.spec.distilled else "vit."
    last = _layer(c.spec, c.spec.depth - 1) + "layernorm_after"
    for param in ("weight", "bias"):
        sd[f"{prefix}layernorm.{param}"] = sd[f"{last}.{param}"]


def _classifier_bias_dropped(c, sd, config):
    sd["classifier.bias"] = torch.zeros_like(sd["classifier.bias"])


def _fc1_layers(c, sd, config):
    _swap(
        sd,
        _layer(c.spec, 0) + "intermediate.dense.weight",
        _layer(c.spec, 1) + "intermediate.dense.weight",
    )


def _fc2_layers(c, sd, config):
    _swap(sd, _layer(c.spec, 0) + "output.dense.weight", _layer(c.spec, 1) + "output.dense.weight")


def _cls_dist_token(c, sd, config):
    _swap(sd, _emb(c.spec) + "cls_token", _emb(c.spec) + "distillation_token")


def _cls_dist_head(c, sd, config):
    _swap_modules(sd, "cls_classifier", "distillation_classifier")


def _pos_rows_rotated(c, sd, config):
    """The class token's position row moved to the end (an off-by-one in the row order)."""
    key = _emb(c.spec) + "position_embeddings"
    sd[key] = sd[key].roll(-1, dims=1)


def _pos_zero_row_appended(c, sd, config):
    """DeiT III: the zero class-token row appended after the patches instead of before."""
    pos = c.timm_model.state_dict()["pos_embed"]
    zeros = pos.new_zeros((1, c.spec.num_prefix_tokens, c.spec.embed_dim))
    sd[_emb(c.spec) + "position_embeddings"] = torch.cat((pos, zeros), dim=1)


def _eps_1e12(c, sd, config):
    config.layer_norm_eps = 1e-12  # transformers' default


def _layer_scale_not_folded(c, sd, config):
    """DeiT III: gammas dropped, attn.proj / mlp.fc2 taken as they are in timm."""
    source = c.timm_model.state_dict()
    for i in range(c.spec.depth):
        layer = _layer(c.spec, i)
        for timm_name, hf_name in (
            ("attn.proj", "attention.output.dense"),
            ("mlp.fc2", "output.dense"),
        ):
            for param in ("weight", "bias"):
                sd[f"{layer}{hf_name}.{param}"] = source[f"blocks.{i}.{timm_name}.{param}"]


def _layer_scale_folds_swapped(c, sd, config):
    """DeiT III: ls1 folded into mlp.fc2 and ls2 into attn.proj."""
    source = c.timm_model.state_dict()
    for i in range(c.spec.depth):
        layer = _layer(c.spec, i)
        pairs = (("attn.proj", "attention.output.dense", "ls2"), ("mlp.fc2", "output.dense", "ls1"))
        for timm_name, hf_name, ls in pairs:
            gamma = source[f"blocks.{i}.{ls}.gamma"]
            sd[f"{layer}{hf_name}.weight"] = (
                source[f"blocks.{i}.{timm_name}.weight"] * gamma[:, None]
            )
            sd[f"{layer}{hf_name}.bias"] = source[f"blocks.{i}.{timm_name}.bias"] * gamma


def _patch_kernel_transposed(c, sd, config):
    key = _emb(c.spec) + "patch_embeddings.projection.weight"
    sd[key] = sd[key].transpose(-1, -2)


EMB, BLOCK0, BLOCK1, NORM, LOGITS = (
    "embeddings",
    "block 0 output",
    "block 1 output",
    "final norm",
    "logits",
)

# mutation: (model, fn, the stage where it sits: the first divergence check_parity must name)
MUTATIONS: dict[str, tuple[str, Callable, str]] = {
    "swap-q-k": (DEIT, _q_k, BLOCK0),
    "swap-q-k-layer1": (DEIT, _q_k_layer1, BLOCK1),
    "swap-k-v": (DEIT, _k_v, BLOCK0),
    "swap-norm1-norm2": (DEIT, _norm1_norm2, BLOCK0),
    "swap-fc1-weight-layer0-layer1": (DEIT, _fc1_layers, BLOCK0),
    "swap-fc2-weight-layer0-layer1": (DEIT, _fc2_layers, BLOCK0),
    "pos-embed-rows-rotated": (DEIT, _pos_rows_rotated, EMB),
    "patch-kernel-transposed": (DEIT, _patch_kernel_transposed, EMB),
    "final-norm-from-last-block": (DEIT, _final_norm_from_last_block, NORM),
    "classifier-bias-dropped": (DEIT, _classifier_bias_dropped, LOGITS),
    "eps-1e-12-deit": (DEIT, _eps_1e12, BLOCK0),
    "swap-cls-dist-token": (DISTILLED, _cls_dist_token, EMB),
    "swap-cls-dist-head": (DISTILLED, _cls_dist_head, LOGITS),
    "swap-q-k-distilled": (DISTILLED, _q_k, BLOCK0),
    "final-norm-from-last-block-distilled": (DISTILLED, _final_norm_from_last_block, NORM),
    "eps-1e-12-distilled": (DISTILLED, _eps_1e12, BLOCK0),
    "pos-zero-row-appended": (DEIT3, _pos_zero_row_appended, EMB),
    "layer-scale-not-folded": (DEIT3, _layer_scale_not_folded, BLOCK0),
    "layer-scale-folds-swapped": (DEIT3, _layer_scale_folds_swapped, BLOCK0),
    "swap-norm1-norm2-layer1-deit3": (DEIT3, _norm1_norm2_layer1, BLOCK1),
    "eps-1e-12-deit3": (DEIT3, _eps_1e12, BLOCK0),
}


def _max_diff(c: Converted, sd: dict, config) -> tuple[float, ParityReport]:
    """The suite's own max |diff| of the outputs, and the converter's layer-by-layer gate."""
    hf_model = load_hf_state_dict(sd, config, c.spec)
    actual = model_output(hf_model, c.inputs)
    diff = (
        float((actual - c.expected).abs().max())
        if actual.shape == c.expected.shape
        else float("inf")
    )
    gate = check_parity(c.timm_model, hf_model, c.inputs, atol=ATOL_MEASURED, layers=True)
    return diff, gate


@pytest.mark.parametrize("name", [DEIT, DISTILLED, DEIT3])
def test_the_unmutated_conversion_passes(name, converted):
    """Without this, every mutation "failing" would prove nothing."""
    c = converted(name)
    diff, gate = _max_diff(c, dict(c.state_dict), build_config(c.spec))
    assert diff <= ATOL_MEASURED and gate.passed, f"{name}: correct conversion off by {diff:.3g}"
    # every stage within the bound too: the first divergence of a mutation is then its own
    assert gate.first_divergence is None, f"{name}: unmutated, yet\n{gate.table()}"
    assert len(gate.layers) == 1 + c.spec.depth + 1 + (2 if name == DISTILLED else 1) + 1


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_every_mutation_is_caught(mutation, converted, record_property):
    name, mutate, stage = MUTATIONS[mutation]
    c = converted(name)
    sd, config = dict(c.state_dict), build_config(c.spec)
    mutate(c, sd, config)
    changed = [k for k in sd if sd[k] is not c.state_dict[k]]
    assert changed or config.layer_norm_eps != c.spec.eps, f"{mutation} changed nothing"

    diff, gate = _max_diff(c, sd, config)
    record_property("mutation", mutation)
    record_property("mutation_max_abs_diff", diff)
    record_property("breaks_contract", diff > ATOL_CONTRACT)
    assert diff > ATOL_MEASURED, (
        f"mutation {mutation} of {name} SURVIVED: max |diff| {diff:.3g} <= {ATOL_MEASURED}"
    )
    assert not gate.passed, f"mutation {mutation} of {name} passes check_parity at {ATOL_MEASURED}"
    first = gate.first_divergence
    record_property("first_divergence", None if first is None else first.stage)
    if first is not None:
        record_property(
            "measured",
            [
                (
                    mutation,
                    name,
                    f"first divergence: {first.stage}, max |diff| {first.max_abs_diff:.3g}",
                )
            ],
        )
    assert first is not None and first.stage == stage, (
        f"mutation {mutation} of {name} sits at {stage!r} but the first stage past "
        f"{ATOL_MEASURED} is {first and first.stage!r}:\n{gate.table()}"
    )
    assert f"first divergence: {stage}," in gate.summary(), gate.summary()
