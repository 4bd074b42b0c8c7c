"""The key mapping between timm DeiT state dicts and transformers ViT/DeiT state dicts, as data.

Everything here is pure: it takes a state dict (and an `ArchSpec`) and returns a new one; no
model is built. HF keys are written in the hub checkpoint format
(`vit.encoder.layer.0.attention.attention.query.weight`) that transformers 4.x loads as is and
5.x renames on load.

What is not a plain rename:
- the fused `attn.qkv` is split into query/key/value (`split_qkv`, `merge_qkv`): row views;
- DeiT III's layer scale (`ls1.gamma`, `ls2.gamma`) is folded into `attn.proj` / `mlp.fc2`
  (HF has no layer scale): `gamma * (W x + b) == (gamma[:, None] * W) x + gamma * b`;
- DeiT III's position embedding has no rows for the prefix tokens (`no_embed_class`); HF adds
  position embeddings after prepending them, so zero rows are prepended (`cls + 0 == cls`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from .arch import ArchSpec
from .errors import BadInputError, KeyMismatchError

__all__ = [  # noqa: RUF022 -- grouped by what the names do, not alphabetical
    # the mapping as data
    "rename_pairs",
    "qkv_pairs",
    "hf_prefix",
    # applying it, both directions
    "timm_to_hf",
    "hf_to_timm",
    "split_qkv",
    "merge_qkv",
    # checking a state dict against it
    "check_state_dict",
    "timm_shapes",
    "hf_shapes",
    # the names of transformers' conversion script
    "create_rename_keys",
    "read_in_q_k_v",
    "rename_key",
]

StateDict = dict[str, torch.Tensor]


def hf_prefix(spec: ArchSpec) -> str:
    """`deit.` (distilled), `vit.` (plain), or `` for a base model (`num_classes=0`)."""
    if spec.num_classes == 0:
        return ""
    return "deit." if spec.distilled else "vit."


def rename_pairs(spec: ArchSpec) -> list[tuple[str, str]]:
    """The `(timm_key, hf_key)` pairs of every tensor that is renamed (values may be adjusted).

    Not included: the fused `qkv` tensors (`qkv_pairs`) and the layer-scale gammas, which are
    folded away; with `cls_head_only`, timm's `head_dist`, which is dropped.

    Example:
        >>> rename_pairs(spec)[0]
        ('cls_token', 'vit.embeddings.cls_token')
    """
    p = hf_prefix(spec)
    pairs = [("cls_token", f"{p}embeddings.cls_token")]
    if spec.distilled:
        pairs.append(("dist_token", f"{p}embeddings.distillation_token"))
    pairs += [
        ("pos_embed", f"{p}embeddings.position_embeddings"),
        ("patch_embed.proj.weight", f"{p}embeddings.patch_embeddings.projection.weight"),
        ("patch_embed.proj.bias", f"{p}embeddings.patch_embeddings.projection.bias"),
    ]
    for i in range(spec.depth):
        hf = f"{p}encoder.layer.{i}."
        for timm_name, hf_name in (
            ("norm1", "layernorm_before"),
            ("attn.proj", "attention.output.dense"),
            ("norm2", "layernorm_after"),
            ("mlp.fc1", "intermediate.dense"),
            ("mlp.fc2", "output.dense"),
        ):
            for param in ("weight", "bias"):
                pairs.append((f"blocks.{i}.{timm_name}.{param}", f"{hf}{hf_name}.{param}"))
    pairs += [("norm.weight", f"{p}layernorm.weight"), ("norm.bias", f"{p}layernorm.bias")]
    if spec.num_classes > 0:
        # DeiTForImageClassificationWithTeacher: cls_classifier + distillation_classifier;
        # ViTForImageClassification and DeiTForImageClassification (`cls_head_only`, where
        # timm's head_dist is dropped): classifier
        teacher = spec.distilled and not spec.cls_head_only
        head = "cls_classifier" if teacher else "classifier"
        pairs += [("head.weight", f"{head}.weight"), ("head.bias", f"{head}.bias")]
        if teacher:
            pairs += [
                ("head_dist.weight", "distillation_classifier.weight"),
                ("head_dist.bias", "distillation_classifier.bias"),
            ]
    return pairs


def qkv_pairs(spec: ArchSpec) -> list[tuple[str, tuple[str, str, str]]]:
    """`(timm_qkv_key, (hf_query_key, hf_key_key, hf_value_key))` for every fused tensor."""
    params = ("weight", "bias") if spec.qkv_bias else ("weight",)
    out = []
    for i in range(spec.depth):
        hf = f"{hf_prefix(spec)}encoder.layer.{i}.attention.attention."
        for param in params:
            out.append(
                (
                    f"blocks.{i}.attn.qkv.{param}",
                    (f"{hf}query.{param}", f"{hf}key.{param}", f"{hf}value.{param}"),
                )
            )
    return out


def _gamma_keys(spec: ArchSpec) -> list[tuple[str, str]]:
    """`(gamma_key, timm prefix of the Linear it scales)` for DeiT III's layer scale."""
    if not spec.layer_scale:
        return []
    out = []
    for i in range(spec.depth):
        out += [
            (f"blocks.{i}.ls1.gamma", f"blocks.{i}.attn.proj"),
            (f"blocks.{i}.ls2.gamma", f"blocks.{i}.mlp.fc2"),
        ]
    return out


def timm_shapes(spec: ArchSpec) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of the timm state dict of `spec`: timm's keys and shapes,
    in timm's order except `dist_token`, which timm registers last and this lists second."""
    d, h, c = spec.embed_dim, spec.mlp_hidden, spec.num_classes
    shapes: dict[str, tuple[int, ...]] = {"cls_token": (1, 1, d)}
    if spec.distilled:
        shapes["dist_token"] = (1, 1, d)
    shapes["pos_embed"] = (1, spec.timm_pos_len, d)
    shapes["patch_embed.proj.weight"] = (d, spec.in_chans, spec.patch_size, spec.patch_size)
    shapes["patch_embed.proj.bias"] = (d,)
    for i in range(spec.depth):
        b = f"blocks.{i}."
        shapes |= {
            b + "norm1.weight": (d,),
            b + "norm1.bias": (d,),
            b + "attn.qkv.weight": (3 * d, d),
        }
        if spec.qkv_bias:
            shapes[b + "attn.qkv.bias"] = (3 * d,)
        shapes |= {b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,)}
        if spec.layer_scale:
            shapes[b + "ls1.gamma"] = (d,)
        shapes |= {
            b + "norm2.weight": (d,),
            b + "norm2.bias": (d,),
            b + "mlp.fc1.weight": (h, d),
            b + "mlp.fc1.bias": (h,),
            b + "mlp.fc2.weight": (d, h),
            b + "mlp.fc2.bias": (d,),
        }
        if spec.layer_scale:
            shapes[b + "ls2.gamma"] = (d,)
    shapes |= {"norm.weight": (d,), "norm.bias": (d,)}
    if c > 0:
        shapes |= {"head.weight": (c, d), "head.bias": (c,)}
        if spec.distilled:
            shapes |= {"head_dist.weight": (c, d), "head_dist.bias": (c,)}
    return shapes


def hf_shapes(spec: ArchSpec) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of the HF (hub format) state dict converted from `spec`."""
    t = timm_shapes(spec)
    shapes = {hf: t[timm] for timm, hf in rename_pairs(spec)}
    hf_pos = f"{hf_prefix(spec)}embeddings.position_embeddings"
    shapes[hf_pos] = (1, spec.num_patches + spec.num_prefix_tokens, spec.embed_dim)
    for timm_key, hf_keys in qkv_pairs(spec):
        for hf in hf_keys:
            shapes[hf] = (spec.embed_dim,) + t[timm_key][1:]
    return shapes


def split_qkv(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a fused qkv weight `(3D, D)` or bias `(3D,)` into query, key, value (row views).

    Example:
        >>> q, k, v = split_qkv(state_dict["blocks.0.attn.qkv.weight"])
    """
    if qkv.shape[0] % 3:
        raise BadInputError(
            f"a fused qkv tensor needs a first dim divisible by 3, got {tuple(qkv.shape)}"
        )
    q, k, v = qkv.chunk(3, dim=0)
    return q, k, v


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The inverse of `split_qkv`: concatenate query, key, value along the first dim."""
    if not (q.shape == k.shape == v.shape and q.dtype == k.dtype == v.dtype):
        raise BadInputError(
            f"query/key/value differ: {tuple(q.shape)}/{tuple(k.shape)}/{tuple(v.shape)}, "
            f"{q.dtype}/{k.dtype}/{v.dtype}"
        )
    return torch.cat((q, k, v), dim=0)


def check_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    shapes: dict[str, tuple[int, ...]],
    what: str,
    hint: Callable[[str, tuple[int, ...], tuple[int, ...]], str | None] = lambda *_: None,
) -> None:
    """Check that `state_dict` has exactly the keys of `shapes`, tensors of those shapes.

    Args:
        state_dict: the state dict to check.
        shapes: key -> shape (`timm_shapes(spec)`, `hf_shapes(spec)`).
        what: how messages name the state dict ("timm state dict", "the checkpoint for X").
        hint: `hint(key, got, needed)` -> what to do about the first wrong shape (else: "is it
            a checkpoint of another variant?").

    Raises:
        KeyMismatchError: keys missing or left over (both listed, sorted).
        BadInputError: a value that is not a tensor, or the first tensor of the wrong shape
            (named, with both shapes).
    """
    missing = [k for k in shapes if k not in state_dict]
    unexpected = [k for k in state_dict if k not in shapes]
    if missing or unexpected:
        raise KeyMismatchError(
            what, missing, unexpected, hint="is it a checkpoint of another architecture?"
        )
    for key, shape in shapes.items():
        value = state_dict[key]
        if not isinstance(value, torch.Tensor):
            raise BadInputError(f"{what}: {key!r} is a {type(value).__name__}, not a tensor")
        got = tuple(value.shape)
        if got != shape:
            todo = hint(key, got, shape) or "is it a checkpoint of another variant?"
            raise BadInputError(
                f"{what} does not fit: {key!r} has shape {got}, the architecture needs {shape}; "
                f"{todo}"
            )


def _fold(weight: torch.Tensor, bias: torch.Tensor, gamma: torch.Tensor):
    g = gamma.float()
    return (weight.float() * g[:, None]).to(weight.dtype), (bias.float() * g).to(bias.dtype)


def timm_to_hf(state_dict: Mapping[str, torch.Tensor], spec: ArchSpec) -> StateDict:
    """Convert a timm state dict to the transformers (hub format) state dict of `spec`.

    Renamed and split tensors are views of the source (no copy); only DeiT III's folded
    layer scale and padded position embedding are new tensors; `state_dict` is left as it is.

    Args:
        state_dict: exactly the keys of `timm_shapes(spec)`.
        spec: the architecture.

    Returns:
        A new dict, keys as in `hf_shapes(spec)`.

    Raises:
        KeyMismatchError: keys missing or left over (both listed, sorted).
        BadInputError: a tensor of the wrong shape (the first one is named with both shapes).

    Example:
        >>> hf_sd = timm_to_hf(model.state_dict(), ArchSpec.from_timm(model))
    """
    check_state_dict(state_dict, timm_shapes(spec), "timm state dict")
    sd = dict(state_dict)
    for gamma_key, linear in _gamma_keys(spec):
        gamma = sd.pop(gamma_key)
        sd[f"{linear}.weight"], sd[f"{linear}.bias"] = _fold(
            sd[f"{linear}.weight"], sd[f"{linear}.bias"], gamma
        )
    if spec.no_embed_class:
        pos = sd["pos_embed"]
        zeros = pos.new_zeros((1, spec.num_prefix_tokens, spec.embed_dim))
        sd["pos_embed"] = torch.cat((zeros, pos), dim=1)
    out = {hf: sd[timm] for timm, hf in rename_pairs(spec)}
    for timm_key, hf_keys in qkv_pairs(spec):
        out.update(zip(hf_keys, split_qkv(sd[timm_key])))
    return out


def hf_to_timm(state_dict: Mapping[str, torch.Tensor], spec: ArchSpec) -> StateDict:
    """Convert a transformers (hub format) state dict back to the timm state dict of `spec`.

    Exact inverse of `timm_to_hf` for DeiT and distilled DeiT. For DeiT III the folded layer
    scale cannot be recovered: gammas come back as ones with the scale kept in the weights,
    which computes the same function. With `no_embed_class` the prefix rows of the position
    embedding are dropped and must be zero.

    Raises:
        KeyMismatchError, BadInputError: as `timm_to_hf`; BadInputError also when the prefix
            rows of the position embedding are not zero under `no_embed_class`.
    """
    if spec.cls_head_only:
        raise BadInputError(
            "a class-token-only DeiT (DeiTForImageClassification) has no distillation head to "
            "give back to timm's distilled model"
        )
    check_state_dict(state_dict, hf_shapes(spec), "transformers state dict")
    sd = {timm: state_dict[hf] for timm, hf in rename_pairs(spec)}
    for timm_key, hf_keys in qkv_pairs(spec):
        sd[timm_key] = merge_qkv(*(state_dict[k] for k in hf_keys))
    if spec.no_embed_class:
        prefix, rest = sd["pos_embed"].split([spec.num_prefix_tokens, spec.num_patches], dim=1)
        if torch.count_nonzero(prefix):
            raise BadInputError(
                "the position embedding rows of the class/distillation tokens are not zero: "
                "this model cannot be expressed with no_embed_class=True"
            )
        sd["pos_embed"] = rest
    for gamma_key, linear in _gamma_keys(spec):
        w = sd[f"{linear}.weight"]
        sd[gamma_key] = torch.ones(spec.embed_dim, dtype=w.dtype, device=w.device)
    order = timm_shapes(spec)
    return {k: sd[k] for k in order}


# ---------------------------------------------------------------------------------------------
# The names of transformers' `convert_deit_timm_to_pytorch.py`, kept for scripts written
# against it. `config` is a transformers `DeiTConfig` (distilled) or `ViTConfig`.


def create_rename_keys(config, base_model: bool = False) -> list[tuple[str, str]]:
    """The `(timm_key, hf_key)` rename pairs for a transformers config (seed-compatible)."""
    return rename_pairs(ArchSpec.from_hf_config(config, base_model=base_model))


def read_in_q_k_v(state_dict: dict, config, base_model: bool = False) -> None:
    """Replace each fused `qkv` of `state_dict` in place by query/key/value (seed-compatible)."""
    spec = ArchSpec.from_hf_config(config, base_model=base_model)
    for timm_key, hf_keys in qkv_pairs(spec):
        if timm_key in state_dict:
            state_dict.update(zip(hf_keys, split_qkv(state_dict.pop(timm_key))))


def rename_key(dct: dict, old: str, new: str) -> None:
    """Move `dct[old]` to `dct[new]` (seed-compatible)."""
    dct[new] = dct.pop(old)
