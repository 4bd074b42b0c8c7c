"""The importable API: what `deit_port.convert` exports exists, is documented, and is stable;
the error tree; no import cycle between the library and its command line."""

import inspect
import subprocess
import sys

import pytest

import deit_port
import deit_port.convert
from deit_port import errors

SEED_NAMES = {"create_rename_keys", "read_in_q_k_v", "rename_key", "convert_deit_checkpoint"}
CORE = {
    "ArchSpec",
    "split_qkv",
    "merge_qkv",
    "timm_to_hf",
    "hf_to_timm",
    "rename_pairs",
    "qkv_pairs",
    "build_config",
    "convert_timm_model",
    "verify_hf_folder",
    "check_parity",
}
ERRORS = {
    "DeitPortError",
    "BadInputError",
    "ParityError",
    "ParityFailure",
    "PreprocessingError",
    "OutputError",
    "CheckpointError",
    "KeyMismatchError",
    "WeightsUnavailableError",
    "UnsupportedModelError",
    "ImageLoadError",
    "MissingExtraError",
}
# Internals a user does not call: they stay in their own modules, not re-exported.
INTERNALS = {
    "randomize_",
    "create_timm_model",
    "load_timm_model",
    "read_labels",
    "save_preprocessor",
    "hf_model_class",
    "hf_class_name",
    "imagenet_labels",
    "resolve_model_name",
    "compare_preprocessing",
    "ParityReport",
    "PreprocessReport",
}


def test_exports_exist_and_are_documented():
    for name in deit_port.convert.__all__:
        obj = getattr(deit_port.convert, name)
        if callable(obj) and not isinstance(obj, type(inspect)):
            assert inspect.getdoc(obj), f"deit_port.convert.{name} has no docstring"


def test_core_seed_names_and_errors_are_exported_internals_are_not():
    exported = set(deit_port.convert.__all__)
    assert SEED_NAMES | CORE | ERRORS <= exported
    assert not (INTERNALS & exported), sorted(INTERNALS & exported)
    assert set(deit_port.__all__) <= exported


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_every_error_is_a_deit_port_error_with_its_exit_code(name):
    cls = getattr(errors, name)
    assert issubclass(cls, errors.DeitPortError)
    if issubclass(cls, errors.ParityFailure):
        assert cls.exit_code == errors.EXIT_PARITY == 1
    elif cls is not errors.DeitPortError:
        assert issubclass(cls, errors.BadInputError) and issubclass(cls, ValueError)
        assert cls.exit_code == errors.EXIT_BAD_INPUT == 2


def test_the_version_is_pyprojects():
    from pathlib import Path

    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert deit_port.__version__ == pyproject["project"]["version"]


def test_no_import_cycle_between_convert_and_cli():
    """Importing the library does not import the command line (which imports the library)."""
    code = "import sys, deit_port.convert; assert 'deit_port.cli' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    source = inspect.getsource(deit_port.convert)
    top = source.split('if __name__ == "__main__":')[0]
    assert "cli" not in "".join(line for line in top.splitlines() if "import" in line)
