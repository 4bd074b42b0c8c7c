"""Properties of the key mapping, for every architecture the converter accepts.

Round trips are bitwise: dtype, shape and every bit of every element (NaN, infinities, -0.0 and
subnormals included), compared through an integer view of the data.

DeiT III is the exception, by design: its layer scale is folded into `attn.proj` / `mlp.fc2`
(`gamma * (W x + b) == (gamma[:, None] * W) x + gamma * b`), and the transformers model has no
place to keep `gamma` apart, so timm -> HF -> timm is NOT bitwise invertible: the gammas come
back as ones and the scale stays in the weights. What is proven instead is that the round-tripped
timm model computes the same logits, within the suite's measured bound.
"""

import tempfile
from pathlib import Path

import pytest
import torch
import transformers
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file

from deit_port.arch import ArchSpec
from deit_port.mapping import (
    hf_prefix,
    hf_shapes,
    hf_to_timm,
    merge_qkv,
    qkv_pairs,
    rename_pairs,
    split_qkv,
    timm_shapes,
    timm_to_hf,
)

from .strategies import DTYPES, arch_specs, tensors, timm_state_dicts
from .util import (
    ATOL_MEASURED,
    assert_bitwise_equal,
    assert_state_dicts_equal,
    build_timm_model,
    random_timm_model,
)


def _gamma_keys(spec: ArchSpec) -> set[str]:
    """Written out here from timm's naming, not taken from the mapping."""
    if not spec.layer_scale:
        return set()
    return {f"blocks.{i}.ls{n}.gamma" for i in range(spec.depth) for n in (1, 2)}


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


# --- qkv -------------------------------------------------------------------------------------

fused_shapes = st.tuples(st.integers(1, 32), st.sampled_from([(), (1,), (5,), (17,)])).map(
    lambda t: (3 * t[0], *t[1])
)


@given(st.data())
def test_merge_of_split_is_the_fused_tensor(data):
    shape = data.draw(fused_shapes, label="shape")
    fused = data.draw(tensors(shape), label="fused")
    n = shape[0] // 3
    q, k, v = split_qkv(fused)
    for part, rows, name in (
        (q, slice(0, n), "q"),
        (k, slice(n, 2 * n), "k"),
        (v, slice(2 * n, None), "v"),
    ):
        assert_bitwise_equal(part, fused[rows], f"{name} rows")
        assert _shares_storage(part, fused), f"{name} is a copy, not a view of the fused tensor"
    assert_bitwise_equal(merge_qkv(q, k, v), fused, "merge_qkv(*split_qkv(t))")


@given(st.data())
def test_split_of_merge_is_query_key_value(data):
    shape = data.draw(fused_shapes, label="shape")
    shape = (shape[0] // 3, *shape[1:])
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    q, k, v = (data.draw(tensors(shape, dtype), label=name) for name in "qkv")
    for actual, expected, name in zip(split_qkv(merge_qkv(q, k, v)), (q, k, v), "qkv"):
        assert_bitwise_equal(actual, expected, f"split_qkv(merge_qkv(q, k, v)) {name}")


@given(st.integers(1, 40).filter(lambda n: n % 3), st.integers(1, 8))
def test_split_refuses_a_first_dim_not_divisible_by_three(rows, cols):
    with pytest.raises(ValueError, match="divisible by 3"):
        split_qkv(torch.zeros(rows, cols))


@given(st.integers(1, 8), st.sampled_from(["shape", "dtype"]))
def test_merge_refuses_query_key_value_that_differ(n, how):
    q = torch.zeros(n, 4)
    k = torch.zeros(n + 1, 4) if how == "shape" else torch.zeros(n, 4, dtype=torch.float16)
    with pytest.raises(ValueError, match="differ"):
        merge_qkv(q, k, q)


# --- the rename pairs ------------------------------------------------------------------------


@given(arch_specs())
def test_rename_pairs_are_a_bijection_covering_both_sides(spec):
    pairs = rename_pairs(spec)
    forward = dict(pairs)
    inverse = {hf: timm for timm, hf in pairs}
    assert len(forward) == len(pairs), "two pairs share a timm key"
    assert len(inverse) == len(pairs), "two timm keys share a transformers key"
    assert all(inverse[forward[t]] == t for t in forward), "inverse after forward is not identity"
    assert all(forward[inverse[h]] == h for h in inverse), "forward after inverse is not identity"

    fused = [t for t, _ in qkv_pairs(spec)]
    split = [h for _, hs in qkv_pairs(spec) for h in hs]
    assert len(set(split)) == len(split) == 3 * len(fused), "query/key/value keys collide"
    assert not set(split) & set(inverse), "a split key is also a rename target"
    assert not set(fused) & set(forward), "a fused qkv key is also renamed"
    # Every timm key is renamed, split or (DeiT III) folded away; every HF key is produced.
    timm_keys = set(forward) | set(fused) | _gamma_keys(spec)
    assert timm_keys == set(timm_shapes(spec))
    assert set(inverse) | set(split) == set(hf_shapes(spec))
    assert all(h.startswith(hf_prefix(spec)) for h in inverse if "classifier" not in h)


@given(arch_specs(buildable=True))
def test_mapping_covers_every_key_of_a_real_timm_model(spec):
    """timm builds the drawn architecture (on the meta device: structure, no memory)."""
    with torch.device("meta"):
        model = build_timm_model(spec)
    assert ArchSpec.from_timm(model) == spec
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    covered = {t for t, _ in rename_pairs(spec)} | {t for t, _ in qkv_pairs(spec)}
    assert set(actual) - covered == _gamma_keys(spec), "a timm key nobody maps"
    assert covered <= set(actual), "a mapped key timm does not have"
    assert timm_shapes(spec) == actual


# --- timm -> HF -> timm ----------------------------------------------------------------------

specs_and_state_dicts = arch_specs(layer_scale=False).flatmap(
    lambda spec: st.tuples(st.just(spec), timm_state_dicts(spec))
)


@given(specs_and_state_dicts)
def test_timm_to_hf_to_timm_is_bitwise_identity(spec_and_sd):
    """DeiT and distilled DeiT (and no_embed_class without layer scale), every dtype/layout."""
    spec, sd = spec_and_sd
    back = hf_to_timm(timm_to_hf(sd, spec), spec)
    assert list(back) == list(sd), "keys or their order changed"
    assert_state_dicts_equal(back, sd, "hf_to_timm(timm_to_hf(sd))")


@given(arch_specs().flatmap(lambda spec: st.tuples(st.just(spec), timm_state_dicts(spec))))
def test_timm_to_hf_keeps_dtype_and_plans_every_shape(spec_and_sd):
    spec, sd = spec_and_sd
    hf = timm_to_hf(sd, spec)
    assert {k: tuple(v.shape) for k, v in hf.items()} == hf_shapes(spec)
    dtype = next(iter(sd.values())).dtype
    assert {v.dtype for v in hf.values()} == {dtype}


@given(arch_specs().flatmap(lambda spec: st.tuples(st.just(spec), timm_state_dicts(spec))))
def test_timm_to_hf_returns_views_of_the_source(spec_and_sd):
    """No copy on the DeiT/ViT path; for DeiT III only the folded Linears and the padded
    position embedding are new tensors."""
    spec, sd = spec_and_sd
    hf = timm_to_hf(sd, spec)
    new = set()
    if spec.layer_scale:
        for i in range(spec.depth):
            new |= {
                f"blocks.{i}.attn.proj.weight",
                f"blocks.{i}.attn.proj.bias",
                f"blocks.{i}.mlp.fc2.weight",
                f"blocks.{i}.mlp.fc2.bias",
            }
    if spec.no_embed_class:
        new.add("pos_embed")
    for timm_key, hf_key in rename_pairs(spec):
        shared = _shares_storage(hf[hf_key], sd[timm_key])
        assert shared == (timm_key not in new), f"{hf_key} shares storage: {shared}"
        if shared:
            assert hf[hf_key].data_ptr() == sd[timm_key].data_ptr()
    for timm_key, hf_keys in qkv_pairs(spec):
        fused = sd[timm_key]
        for i, hf_key in enumerate(hf_keys):
            assert _shares_storage(hf[hf_key], fused), f"{hf_key} is a copy"
            offset = i * (fused.shape[0] // 3) * fused.stride(0) * fused.element_size()
            assert hf[hf_key].data_ptr() == fused.data_ptr() + offset, f"{hf_key}: wrong rows"


@pytest.mark.parametrize("layer_scale", [True, False], ids=["layer_scale", "no_layer_scale"])
@given(data=st.data())
def test_timm_to_hf_leaves_the_source_as_it_is(layer_scale, data):
    """The conversion writes nothing into the tensors it is given (convert reads them from a
    mapped checkpoint): DeiT III's folded Linears are new tensors, the source keeps its bits."""
    spec = data.draw(arch_specs(layer_scale=layer_scale), label="spec")
    sd = data.draw(timm_state_dicts(spec), label="state dict")
    before = {k: v.clone() for k, v in sd.items()}
    timm_to_hf(sd, spec)
    assert_state_dicts_equal(sd, before, "the source after timm_to_hf")


@given(
    arch_specs(no_embed_class=True, layer_scale=False).flatmap(
        lambda spec: st.tuples(st.just(spec), timm_state_dicts(spec, specials=False))
    ),
    st.data(),
)
def test_nonzero_prefix_position_rows_are_refused_for_no_embed_class(spec_and_sd, data):
    spec, sd = spec_and_sd
    hf = timm_to_hf(sd, spec)
    pos_key = f"{hf_prefix(spec)}embeddings.position_embeddings"
    assert not hf[pos_key][:, : spec.num_prefix_tokens].any(), "prefix rows are not zero"
    row = data.draw(st.integers(0, spec.num_prefix_tokens - 1), label="row")
    col = data.draw(st.integers(0, spec.embed_dim - 1), label="col")
    pos = hf[pos_key].clone()
    pos[0, row, col] = 0.5
    with pytest.raises(ValueError, match="not zero"):
        hf_to_timm(hf | {pos_key: pos}, spec)


# --- HF -> timm -> HF, from what transformers itself wrote -----------------------------------


def _transformers_model(spec: ArchSpec) -> torch.nn.Module:
    """A randomly initialised transformers model of `spec`, configured here, not by deit_port."""
    config_class = transformers.DeiTConfig if spec.distilled else transformers.ViTConfig
    kwargs = {"num_labels": spec.num_classes} if spec.num_classes else {}
    config = config_class(
        hidden_size=spec.embed_dim,
        num_hidden_layers=spec.depth,
        num_attention_heads=spec.num_heads,
        intermediate_size=spec.mlp_hidden,
        image_size=spec.img_size,
        patch_size=spec.patch_size,
        num_channels=spec.in_chans,
        qkv_bias=spec.qkv_bias,
        layer_norm_eps=spec.eps,
        **kwargs,
    )
    if spec.num_classes == 0:
        model_class = transformers.DeiTModel if spec.distilled else transformers.ViTModel
        return model_class(config, add_pooling_layer=False)
    if spec.distilled:
        return transformers.DeiTForImageClassificationWithTeacher(config)
    return transformers.ViTForImageClassification(config)


@given(
    arch_specs(layer_scale=False, no_embed_class=False),
    st.sampled_from(DTYPES),
    st.integers(0, 2**32 - 1),
)
def test_hf_to_timm_to_hf_is_bitwise_identity_on_a_transformers_checkpoint(spec, dtype, seed):
    model = _transformers_model(spec)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # every tensor moves off its init (ones, zeros, ...)
            p.add_(torch.randn(p.shape, generator=g) * 0.1 + 0.01)
    model.to(dtype)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        files = sorted(p.name for p in Path(folder).glob("*.safetensors"))
        assert files == ["model.safetensors"]
        hf_sd = load_file(Path(folder) / "model.safetensors")
    assert ArchSpec.from_hf_config(model.config, base_model=spec.num_classes == 0) == spec
    assert set(hf_sd) == set(hf_shapes(spec)), "transformers wrote other keys than planned"
    assert_state_dicts_equal(
        timm_to_hf(hf_to_timm(hf_sd, spec), spec), hf_sd, "timm_to_hf(hf_to_timm(hf_sd))"
    )


# --- DeiT III: not bitwise invertible, the same function ------------------------------------


@given(arch_specs(layer_scale=True, buildable=True), st.integers(0, 2**32 - 1))
def test_deit3_round_trip_keeps_the_logits(spec, seed):
    """timm -> HF -> timm folds gamma into the weights: not the same tensors, same logits."""
    model = random_timm_model(spec, seed)
    sd = model.state_dict()
    back = hf_to_timm(timm_to_hf(sd, spec), spec)

    assert set(back) == set(sd)
    for i in range(spec.depth):
        for gamma, linear in (
            (f"blocks.{i}.ls1.gamma", f"blocks.{i}.attn.proj"),
            (f"blocks.{i}.ls2.gamma", f"blocks.{i}.mlp.fc2"),
        ):
            assert torch.equal(back[gamma], torch.ones_like(sd[gamma])), f"{gamma} is not ones"
            g = sd[gamma]
            torch.testing.assert_close(
                back[f"{linear}.weight"], sd[f"{linear}.weight"] * g[:, None]
            )
            torch.testing.assert_close(back[f"{linear}.bias"], sd[f"{linear}.bias"] * g)
    assert not torch.equal(back["blocks.0.ls1.gamma"], sd["blocks.0.ls1.gamma"]), (
        "randomize_ draws gamma in [0.1, 1): the round trip cannot give it back"
    )

    with torch.device("meta"):
        again = build_timm_model(spec)
    again.load_state_dict(back, strict=True, assign=True)
    x = torch.randn(
        3,
        spec.in_chans,
        spec.img_size,
        spec.img_size,
        generator=torch.Generator().manual_seed(seed),
    )
    with torch.inference_mode():
        expected = model(x) if spec.num_classes else model.forward_features(x)
        actual = again(x) if spec.num_classes else again.forward_features(x)
    torch.testing.assert_close(
        actual,
        expected,
        atol=ATOL_MEASURED,
        rtol=0,
        msg=lambda m: f"DeiT III timm -> HF -> timm changed the output beyond {ATOL_MEASURED}: {m}",
    )
