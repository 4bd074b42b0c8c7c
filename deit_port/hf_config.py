"""The transformers side of an `ArchSpec`: which class, which config."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .arch import ArchSpec
from .errors import BadInputError
from .labels import imagenet_labels

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["build_config", "hf_class_name", "hf_model_class"]


def hf_class_name(spec: ArchSpec) -> str:
    """The name of the transformers class a converted `spec` loads into.

    distilled -> `DeiTForImageClassificationWithTeacher` (both heads, averaged), or with
    `cls_head_only` `DeiTForImageClassification` (the class-token head, trainable with
    `labels`); plain DeiT and DeiT III -> `ViTForImageClassification`; `num_classes=0` -> the
    base model (`DeiTModel`/`ViTModel`, which must be built with `add_pooling_layer=False`:
    timm has no pooler).
    """
    if spec.num_classes == 0:
        return "DeiTModel" if spec.distilled else "ViTModel"
    if spec.cls_head_only:
        return "DeiTForImageClassification"
    return (
        "DeiTForImageClassificationWithTeacher" if spec.distilled else "ViTForImageClassification"
    )


def hf_model_class(spec: ArchSpec) -> type[PreTrainedModel]:
    """The transformers class `hf_class_name(spec)` (importing it imports the modeling code,
    which writing a folder does not need)."""
    import transformers

    return getattr(transformers, hf_class_name(spec))


def build_config(spec: ArchSpec, labels: Sequence[str] | None = None):
    """Build the transformers config of `spec`.

    Args:
        spec: the architecture.
        labels: class names, one per class; default: ImageNet-1k names when there are 1000
            classes, else `LABEL_i`.

    Returns:
        A `DeiTConfig` (distilled) or `ViTConfig`, with timm's LayerNorm eps (not
        transformers' default 1e-12) and `architectures` set.

    Example:
        >>> build_config(spec).layer_norm_eps
        1e-06
    """
    import transformers as tf

    if labels is None and spec.num_classes == 1000:
        labels = imagenet_labels()
    if labels is None:
        labels = [f"LABEL_{i}" for i in range(spec.num_classes)]
    if len(labels) != spec.num_classes:
        raise BadInputError(
            f"{len(labels)} labels given for a model with {spec.num_classes} classes"
        )
    if len(set(labels)) != len(labels):
        raise BadInputError("class labels must be unique")
    config_class = tf.DeiTConfig if spec.distilled else tf.ViTConfig
    kwargs: dict[str, Any] = {}
    if spec.num_classes:
        kwargs = {
            "id2label": dict(enumerate(labels)),
            "label2id": {n: i for i, n in enumerate(labels)},
        }
    config = config_class(
        hidden_size=spec.embed_dim,
        num_hidden_layers=spec.depth,
        num_attention_heads=spec.num_heads,
        intermediate_size=spec.mlp_hidden,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=spec.eps,
        image_size=spec.img_size,
        patch_size=spec.patch_size,
        num_channels=spec.in_chans,
        qkv_bias=spec.qkv_bias,
        encoder_stride=spec.patch_size,
        **kwargs,
    )
    config.architectures = [hf_class_name(spec)]
    return config
