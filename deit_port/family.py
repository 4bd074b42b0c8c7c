"""The family deit_port converts: every timm ViT-family name (`vit_*`, `deit*`) whose
architecture transformers' ViT/DeiT can express, and why each other one is refused.

Decided the way a conversion decides: each name is built on the meta device (no memory, no
values) and described by `ArchSpec.from_timm`, which reads the model, never its name.

    >>> family = walk_family()
    >>> len(family.convertible), family.refused_by_feature()["register tokens"][:1]
    (43, ['vit_base_patch14_reg4_dinov2'])
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass, field

from .arch import ArchSpec
from .errors import DeitPortError, UnsupportedModelError, first_line
from .hf_config import hf_class_name
from .registry import build_on_meta

__all__ = ["FAMILY_PATTERNS", "Family", "describe", "family_names", "print_family", "walk_family"]

# The timm names the family is looked for in.
FAMILY_PATTERNS = ("vit_*", "deit*")


@dataclass
class Family:
    """`convertible`: name -> its transformers class; `refused`: name -> the feature that
    transformers cannot express; both in name order."""

    convertible: dict[str, str] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)

    def refused_by_feature(self) -> dict[str, list[str]]:
        """feature -> the names refused for it, the largest group first."""
        groups: dict[str, list[str]] = {}
        for name, feature in self.refused.items():
            groups.setdefault(feature, []).append(name)
        return dict(sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])))


def family_names() -> list[str]:
    """Every timm name matching `FAMILY_PATTERNS`, sorted."""
    import timm

    return sorted({n for pattern in FAMILY_PATTERNS for n in timm.list_models(pattern)})


@functools.cache
def describe(name: str) -> tuple[str | None, str | None]:
    """`(transformers class, None)` for a name deit_port converts, `(None, feature)` for one it
    refuses (built on the meta device, described by `ArchSpec.from_timm`); once per process
    and name (timm's registry does not change while it runs).

    Raises:
        DeitPortError: timm cannot build the name (other than a refusal).
    """
    try:
        spec = ArchSpec.from_timm(build_on_meta(name))
    except UnsupportedModelError as e:
        return None, e.feature
    return hf_class_name(spec), None


def walk_family(names: Iterable[str] | None = None) -> Family:
    """Describe every name of `names` (default: `family_names()`): convertible with its target
    class, or refused with the feature. A name timm cannot build is refused with timm's reason."""
    family = Family()
    for name in family_names() if names is None else names:
        try:
            target, feature = describe(name)
        except DeitPortError as e:
            target, feature = None, f"timm cannot build it ({first_line(e)})"
        if target is not None:
            family.convertible[name] = target
        else:
            family.refused[name] = feature or "?"
    return family


def print_family(refused: bool = False, names: Iterable[str] | None = None) -> None:
    """`deit-port list --all`: each convertible name and its transformers class, then the
    count; with `refused` (`--refused`): the refused names grouped by feature, with counts.
    `names`: the names to walk (default: `family_names()`)."""
    family = walk_family(names)
    if not refused:
        width = max(map(len, family.convertible), default=0)
        for name, target in family.convertible.items():
            print(f"{name:<{width}}  {target}")
        print(
            f"{len(family.convertible)} of {len(family.convertible) + len(family.refused)} timm "
            f"{'/'.join(FAMILY_PATTERNS)} names convert (`deit-port list --refused`: the others)"
        )
        return
    for feature, group in family.refused_by_feature().items():
        print(f"{feature} ({len(group)}): {' '.join(group)}")
    print(
        f"{len(family.refused)} of {len(family.convertible) + len(family.refused)} timm "
        f"{'/'.join(FAMILY_PATTERNS)} names refused, by the feature transformers' ViT/DeiT "
        "cannot express"
    )
