"""The importable API: what `deit_port.convert` exports exists, is documented, and is stable."""

import inspect

import deit_port
import deit_port.convert

SEED_NAMES = {"create_rename_keys", "read_in_q_k_v", "rename_key", "convert_deit_checkpoint"}
CORE = {"ArchSpec", "split_qkv", "merge_qkv", "timm_to_hf", "hf_to_timm", "rename_pairs",
        "build_config", "convert_timm_model"}


def test_exports_exist_and_are_documented():
    for name in deit_port.convert.__all__:
        obj = getattr(deit_port.convert, name)
        if callable(obj) and not isinstance(obj, type(inspect)):
            assert inspect.getdoc(obj), f"deit_port.convert.{name} has no docstring"


def test_core_and_seed_compatible_names_are_exported():
    assert SEED_NAMES | CORE <= set(deit_port.convert.__all__)
    assert set(deit_port.__all__) <= set(deit_port.convert.__all__)
