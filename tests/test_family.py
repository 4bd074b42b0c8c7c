"""The family deit_port converts (issue 27): every timm `vit_*` and `deit*` name either
converts (`ArchSpec.from_timm` describes it) or is refused by deit_port's own error, naming
the feature; never another exception (the next timm release cannot bring a traceback unseen).

The walk builds each name on the meta device (no weights): some 10 s of CPU for the 230 names
today, so it is split in parts (xdist spreads them) and its names hold no "tiny" (`-k tiny`
does not pay for it)."""

from __future__ import annotations

import pytest
import timm

from deit_port import cli
from deit_port.arch import ArchSpec
from deit_port.errors import DeitPortError, UnsupportedModelError
from deit_port.family import describe, family_names, print_family, walk_family
from deit_port.registry import build_on_meta

from .util import DEIT_VARIANTS, VIT_VARIANTS, cli_error_line

PARTS = 4
# Other timm families, one small model each: refused as no VisionTransformer, in one line.
OTHER_FAMILIES = [
    "beit_base_patch16_224",
    "cait_xxs24_224",
    "convnext_atto",
    "crossvit_9_240",
    "efficientnet_b0",
    "eva02_small_patch14_224",
    "levit_128s",
    "mobilevit_xxs",
    "pit_s_224",
    "resnet18",
    "swin_small_patch4_window7_224",
    "xcit_nano_12_p16_224",
]


def _walk(names: list[str]) -> tuple[list[str], dict[str, str]]:
    """Each name: converts, or refused by a `DeitPortError`; anything else fails the test."""
    converts, refused, escaped = [], {}, {}
    for name in names:
        try:
            target, feature = describe(name)  # ArchSpec.from_timm on the meta device
        except DeitPortError as e:
            refused[name] = str(e)
        except Exception as e:  # noqa: BLE001 -- what the test is for
            escaped[name] = f"{type(e).__name__}: {e}"
        else:
            if target is not None:
                converts.append(name)
            else:
                refused[name] = feature
    assert not escaped, f"not deit_port's own error: {escaped}"
    return converts, refused


@pytest.mark.parametrize("part", range(PARTS), ids=[f"part{i}" for i in range(PARTS)])
def test_every_vit_and_deit_name_converts_or_is_refused_in_one_line(part):
    names = family_names()[part::PARTS]
    converts, refused = _walk(names)
    for name, message in refused.items():  # the feature, or timm's own one-line reason
        assert message and "\n" not in message, f"{name}: {message!r}"
    wanted = set(DEIT_VARIANTS + VIT_VARIANTS) & set(names)
    assert wanted <= set(converts), sorted(wanted - set(converts))


@pytest.mark.parametrize("name", OTHER_FAMILIES)
def test_other_families_are_refused_as_no_vit(name):
    assert timm.is_model(name), f"timm no longer registers {name}: pick another of its family"
    with pytest.raises(UnsupportedModelError, match="is not a timm VisionTransformer"):
        ArchSpec.from_timm(build_on_meta(name))


def test_parallel_blocks_are_refused_by_name(tmp_path, capsys):
    """timm's ParallelThingsBlock (`vit_small_patch16_18x2_224`) was a traceback (exit 3)."""
    argv = ["convert", "vit_small_patch16_18x2_224", str(tmp_path / "out"), "--init", "random"]
    line = cli_error_line(argv, capsys, unchanged=tmp_path)
    assert "parallel blocks ParallelThingsBlock is not supported" in line, line
    assert "deit-port list --all" in line


def test_refused_names_are_grouped_by_feature_with_counts(capsys):
    names = ["deit_small_patch16_224", "vit_base_patch16_18x2_224", "vit_small_patch16_18x2_224"]
    names += ["vit_base_patch14_reg4_dinov2", "vit_relpos_base_patch16_224"]
    family = walk_family(names)
    assert family.convertible == {"deit_small_patch16_224": "ViTForImageClassification"}
    groups = family.refused_by_feature()
    assert groups["parallel blocks ParallelThingsBlock"] == names[1:3]
    assert groups["register tokens"] == ["vit_base_patch14_reg4_dinov2"]
    assert groups["model class VisionTransformerRelPos"] == ["vit_relpos_base_patch16_224"]
    print_family(refused=True, names=names)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (
        "parallel blocks ParallelThingsBlock (2): vit_base_patch16_18x2_224 "
        "vit_small_patch16_18x2_224"
    )
    assert out[-1].startswith("4 of 5 timm vit_*/deit* names refused")


def test_list_is_the_deits_and_list_all_adds_the_vits(capsys):
    assert cli.main(["list"]) == 0
    assert capsys.readouterr().out.split() == DEIT_VARIANTS
    print_family(names=DEIT_VARIANTS + VIT_VARIANTS)
    lines = capsys.readouterr().out.splitlines()
    listed = dict(line.split() for line in lines[:-1])
    assert sorted(listed) == sorted(DEIT_VARIANTS + VIT_VARIANTS)
    assert listed["deit_tiny_distilled_patch16_224"] == "DeiTForImageClassificationWithTeacher"
    assert listed["vit_small_patch14_dinov2"] == "ViTModel"  # timm builds it without classifier
    assert lines[-1].startswith(f"{len(listed)} of {len(listed)} timm vit_*/deit* names convert")


@pytest.mark.slow
def test_list_all_and_refused_through_the_command_line(capsys):
    assert cli.main(["list", "--all"]) == 0
    lines = capsys.readouterr().out.splitlines()
    total = len(family_names())
    converts = int(lines[-1].split()[0])
    assert len(lines) == converts + 1 and converts >= len(DEIT_VARIANTS + VIT_VARIANTS)
    assert cli.main(["list", "--refused"]) == 0
    lines = capsys.readouterr().out.splitlines()
    counts = [int(line.split(" (")[-1].split(")")[0]) for line in lines[:-1]]
    assert sum(counts) == total - converts == int(lines[-1].split()[0])
