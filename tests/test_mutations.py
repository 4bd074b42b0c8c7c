"""The parity check catches mistakes: every single wrong step in a conversion makes it fail.

Each mutation below is one plausible bug in a converter, applied to the result of a correct
conversion (the hub-format state dict and the config) of a tiny but real DeiT (timm's own
DeiT tiny / DeiT tiny distilled / DeiT III small at depth 2, 224 px, every parameter drawn by
`randomize_`). The mutated model must fail parity at the suite's measured bound
(`ATOL_MEASURED`, 1e-4), through both the suite's comparison and `deit_port.parity.check_parity`,
the gate the converter uses before writing. A mutation that survives is a hole in the suite.

Mutations that change nothing mathematically are not listed: the key bias (softmax ignores a
per-query constant), or swapping only the biases of the two distilled heads (their outputs are
averaged).

Whether each one also breaks the contract (`ATOL_CONTRACT`, 1e-3) is recorded as the test
property `breaks_contract`; see README, "Property suite".
"""

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from deit_port.convert import ArchSpec, build_config, timm_to_hf
from deit_port.io import load_hf_state_dict
from deit_port.parity import check_parity, parity_inputs

from .util import ATOL_CONTRACT, ATOL_MEASURED, model_output, random_timm_model

SEED = 5
DEIT, DISTILLED, DEIT3 = (
    "deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "deit3_small_patch16_224"
)


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
                model, spec, timm_to_hf(model.state_dict(), spec), build_config(spec), x,
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
def _q_k(c, sd, config):
    att = _layer(c.spec, 0) + "attention.attention."
    _swap_modules(sd, att + "query", att + "key")


def _k_v(c, sd, config):
    att = _layer(c.spec, 0) + "attention.attention."
    _swap_modules(sd, att + "key", att + "value")


def _norm1_norm2(c, sd, config):
    layer = _layer(c.spec, 0)
    _swap_modules(sd, layer + "layernorm_before", layer + "layernorm_after")


def _fc1_layers(c, sd, config):
    _swap(sd, _layer(c.spec, 0) + "intermediate.dense.weight", _layer(c.spec, 1) + "intermediate.dense.weight")


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
        for timm_name, hf_name in (("attn.proj", "attention.output.dense"), ("mlp.fc2", "output.dense")):
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
            sd[f"{layer}{hf_name}.weight"] = source[f"blocks.{i}.{timm_name}.weight"] * gamma[:, None]
            sd[f"{layer}{hf_name}.bias"] = source[f"blocks.{i}.{timm_name}.bias"] * gamma


def _patch_kernel_transposed(c, sd, config):
    key = _emb(c.spec) + "patch_embeddings.projection.weight"
    sd[key] = sd[key].transpose(-1, -2)


MUTATIONS: dict[str, tuple[str, Callable]] = {
    "swap-q-k": (DEIT, _q_k),
    "swap-k-v": (DEIT, _k_v),
    "swap-norm1-norm2": (DEIT, _norm1_norm2),
    "swap-fc1-weight-layer0-layer1": (DEIT, _fc1_layers),
    "swap-fc2-weight-layer0-layer1": (DEIT, _fc2_layers),
    "pos-embed-rows-rotated": (DEIT, _pos_rows_rotated),
    "patch-kernel-transposed": (DEIT, _patch_kernel_transposed),
    "eps-1e-12-deit": (DEIT, _eps_1e12),
    "swap-cls-dist-token": (DISTILLED, _cls_dist_token),
    "swap-cls-dist-head": (DISTILLED, _cls_dist_head),
    "swap-q-k-distilled": (DISTILLED, _q_k),
    "eps-1e-12-distilled": (DISTILLED, _eps_1e12),
    "pos-zero-row-appended": (DEIT3, _pos_zero_row_appended),
    "layer-scale-not-folded": (DEIT3, _layer_scale_not_folded),
    "layer-scale-folds-swapped": (DEIT3, _layer_scale_folds_swapped),
    "eps-1e-12-deit3": (DEIT3, _eps_1e12),
}


def _max_diff(c: Converted, sd: dict, config) -> tuple[float, bool]:
    hf_model = load_hf_state_dict(sd, config, c.spec)
    actual = model_output(hf_model, c.inputs)
    diff = float((actual - c.expected).abs().max()) if actual.shape == c.expected.shape else float("inf")
    gate = check_parity(c.timm_model, hf_model, c.inputs, atol=ATOL_MEASURED)
    return diff, gate.passed


@pytest.mark.parametrize("name", [DEIT, DISTILLED, DEIT3])
def test_the_unmutated_conversion_passes(name, converted):
    """Without this, every mutation "failing" would prove nothing."""
    c = converted(name)
    diff, gate_passed = _max_diff(c, dict(c.state_dict), build_config(c.spec))
    assert diff <= ATOL_MEASURED and gate_passed, f"{name}: correct conversion off by {diff:.3g}"


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_every_mutation_is_caught(mutation, converted, record_property):
    name, mutate = MUTATIONS[mutation]
    c = converted(name)
    sd, config = dict(c.state_dict), build_config(c.spec)
    mutate(c, sd, config)
    changed = [k for k in sd if sd[k] is not c.state_dict[k]]
    assert changed or config.layer_norm_eps != c.spec.eps, f"{mutation} changed nothing"

    diff, gate_passed = _max_diff(c, sd, config)
    record_property("mutation", mutation)
    record_property("mutation_max_abs_diff", diff)
    record_property("breaks_contract", diff > ATOL_CONTRACT)
    assert diff > ATOL_MEASURED, (
        f"mutation {mutation} of {name} SURVIVED: max |diff| {diff:.3g} <= {ATOL_MEASURED}"
    )
    assert not gate_passed, f"mutation {mutation} of {name} passes check_parity at {ATOL_MEASURED}"

