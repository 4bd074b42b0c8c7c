"""The importable API: what `deit_port.convert` exports exists, is documented, and is stable;
the error tree; no import cycle between the library and its command line."""

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import deit_port
import deit_port.convert
from deit_port import errors

PACKAGE = Path(deit_port.__file__).parent

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


def test_one_public_face():
    """`deit_port` and `deit_port.convert` export the same list, and every name imports from both."""
    assert deit_port.__all__ == deit_port.convert.__all__
    for name in deit_port.__all__:
        assert getattr(deit_port, name) is getattr(deit_port.convert, name), name


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


def test_importing_the_library_does_not_import_the_command_line():
    code = "import sys, deit_port.convert; assert 'deit_port.cli' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def _imports(source: str, module: str) -> list[tuple[str, str]]:
    """`(module imported, name imported)` for every import of a deit_port module in `source`,
    at any depth (a function's lazy imports too), except inside `if __name__ == "__main__":`.
    `from . import io` gives `("io", "")`: the module itself."""
    found = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and ast.unparse(node.test) in (
            "__name__ == '__main__'",
            '__name__ == "__main__"',
        ):
            return
        if isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level == 0 and not target.startswith("deit_port"):
                target = None
            elif node.level == 0:
                target = target.removeprefix("deit_port").lstrip(".")
            if target is not None:
                for alias in node.names:
                    if target:
                        found.append((target, alias.name))
                    else:  # `from . import mapping`
                        found.append((alias.name, ""))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("deit_port."):
                    found.append((alias.name.removeprefix("deit_port."), ""))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return [(target, name) for target, name in found if target != module]


def _library_sources() -> dict[str, str]:
    return {p.stem: p.read_text() for p in PACKAGE.glob("*.py")}


def _private_imports(sources: dict[str, str]) -> list[str]:
    return [
        f"{module} imports {target}.{name}"
        for module, source in sorted(sources.items())
        for target, name in _imports(source, module)
        if name.startswith("_") and not name.startswith("__")
    ]


def _cycles(sources: dict[str, str]) -> list[list[str]]:
    """Every import cycle between the modules (each found once, from its smallest module)."""
    graph = {m: sorted({t for t, _ in _imports(s, m) if t in sources}) for m, s in sources.items()}
    cycles = []

    def walk(path: list[str]) -> None:
        for nxt in graph[path[-1]]:
            if nxt == path[0]:
                cycles.append([*path, nxt])
            elif nxt not in path and nxt > path[0]:
                walk([*path, nxt])

    for start in sorted(graph):
        walk([start])
    return cycles


def test_no_module_imports_another_modules_private_names():
    assert _private_imports(_library_sources()) == []


def test_the_modules_import_each_other_without_a_cycle():
    assert _cycles(_library_sources()) == []


def test_the_import_checks_find_what_they_look_for():
    """The two checks above on sources made to fail them: a private name imported lazily, and
    a cycle through a lazy import, while a `__main__` block is allowed to import upwards."""
    sources = {
        "a": "from .b import f\n",
        "b": "def g():\n    from .c import _h\n",
        "c": 'def h():\n    from .a import f\nif __name__ == "__main__":\n    from .b import _k\n',
    }
    assert _private_imports(sources) == ["b imports c._h"]
    assert _cycles(sources) == [["a", "b", "c", "a"]]
    del sources["c"]
    assert _cycles(sources) == []


def test_the_readmes_library_block_runs_as_written():
    """README.md's "As a library" block, run as a user would paste it, in a fresh namespace
    (in this process: a subprocess would only add the seconds of importing torch)."""
    readme = (PACKAGE.parent / "README.md").read_text()
    section = readme.split("## As a library", 1)[1]
    block = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert "convert_timm_model" in block and "timm_to_hf" in block
    check = "\nassert type(hf_model).__name__ == 'ViTForImageClassification'\n"
    code = compile(block + check, "README.md (As a library)", "exec")
    exec(code, {"__name__": "__main__"})  # noqa: S102 (the README's own code, which the test runs)
