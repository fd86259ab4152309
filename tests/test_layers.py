"""The package's layers hold: import-linter's contracts (pyproject.toml) are kept, and a deliberate upward
import or circle breaks them; imports inside functions are documented deferrals; the facade imports
nothing heavy; the tests follow the package's folders. See docs/contributing/architecture.md."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import imports  # noqa: E402  (tools/imports.py: the same counts the architecture page quotes)

LAYERS = [
    "cli",
    "sweep",
    "train",
    "files",
    "measure",
    "surgery",
    "graph",
    "blocks",
    "inputs",
    "errors | events",
]  # top first
MODULES = {"inputs", "errors | events"}  # the lowest layers are one module each


def lint(root: Path) -> subprocess.CompletedProcess:
    """import-linter's own command on the package under ``root`` (its pyproject.toml's contracts)."""
    tool = Path(sys.executable).with_name("lint-imports")
    return subprocess.run(
        [str(tool), "--no-cache"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
    )


def copy_of_the_project(tmp_path: Path) -> Path:
    copy = tmp_path / "project"
    copy.mkdir()
    shutil.copy(ROOT / "pyproject.toml", copy)
    shutil.copytree(ROOT / "retrofit", copy / "retrofit", ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def test_the_contracts_are_kept_and_name_every_layer():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken." in result.stdout
    text = (ROOT / "pyproject.toml").read_text()
    assert f"layers = {LAYERS!r}".replace("'", '"') in text
    folders = {p.name for p in (ROOT / "retrofit").iterdir() if (p / "__init__.py").is_file()} - {"recipes"}
    assert folders == set(LAYERS) - MODULES


@pytest.mark.parametrize(
    "where, line, words",
    [
        (
            "graph/trace.py",
            "from ..files.atomic import atomic_write",
            ["retrofit.graph is not allowed to import retrofit.files", "retrofit.graph.trace -> retrofit.files.atomic"],
        ),
        ("blocks/se.py", "from ..surgery import recipe", ["retrofit.blocks is not allowed to import retrofit.surgery"]),
        ("surgery/sites.py", "from . import named", ["No cycles are allowed in retrofit.surgery", ".sites -> .named"]),
    ],
)
def test_an_upward_import_or_a_circle_breaks_them(tmp_path, where, line, words):
    copy = copy_of_the_project(tmp_path)
    module = copy / "retrofit" / where
    source = module.read_text()
    anchor = "from __future__ import annotations\n"
    module.write_text(source.replace(anchor, anchor + line + "\n", 1))
    result = lint(copy)
    assert result.returncode == 1, result.stdout
    for w in words:
        assert w in result.stdout, (w, result.stdout)


def test_no_circle_and_every_import_inside_a_function_is_a_documented_deferral():
    assert imports.circles() == []
    bare = [f"{i.module}:{i.line} {i.text}" for i in imports.inner_imports() if not i.documented]
    assert bare == []


def test_the_counting_tool_sees_a_bare_inner_import(tmp_path):
    """The deferral check reads comments: an import inside a function without one is reported."""
    copy = copy_of_the_project(tmp_path)
    module = copy / "retrofit" / "surgery" / "bypass.py"
    module.write_text(module.read_text() + "\n\ndef late():\n    from .sites import scan\n    return scan\n")
    found = imports.inner_imports(imports.package_modules(copy / "retrofit"))
    assert [(i.module, i.documented) for i in found if i.module == "retrofit.surgery.bypass"] == [
        ("retrofit.surgery.bypass", False)
    ]


def test_no_module_of_the_package_imports_its_facade():
    """`retrofit/__init__.py` reaches every layer: a module that imported it would import upward."""
    modules = imports.package_modules()
    found = [
        f"{module}:{node.lineno}"
        for module, path in modules.items()
        if module != "retrofit"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.Import, ast.ImportFrom)) and "retrofit" in imports.targets(module, path, node, modules)
    ]
    assert found == []


def test_the_facade_loads_nothing_heavy_and_its_names_are_the_api():
    code = (
        "import sys, retrofit, retrofit.cli; heavy = [m for m in ('torch', 'timm', 'optuna') if m in sys.modules]; "
        "print(heavy); import retrofit.sweep.grid; print(callable(retrofit.sweep), retrofit.sweep.__module__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["[]", "True retrofit.sweep.grid"]
    import retrofit

    tree = ast.parse((ROOT / "retrofit" / "__init__.py").read_text())
    typed = {}  # what type checkers see, from the `if TYPE_CHECKING:` block
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for imp in node.body:
                typed.update({a.name: imp.module for a in imp.names})
    assert typed == retrofit._API and sorted(retrofit.__all__) == sorted(typed)
    for name, module in typed.items():
        assert getattr(retrofit, name) is getattr(sys.modules[f"retrofit.{module}"], name)


def test_tests_follow_the_layers():
    folders = {p.name for p in (ROOT / "tests").iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == set(LAYERS) - MODULES
    for folder in folders:
        assert list((ROOT / "tests" / folder).glob("test_*.py")), folder


def test_functions_stay_short_outside_the_typer_commands():
    """One concept per function: at most 80 lines of code (docstring aside), the commands excepted."""
    long = []
    for module, path in imports.package_modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if any("command" in ast.unparse(d) for d in node.decorator_list):
                    continue
                lines = node.end_lineno - node.lineno + 1
                if ast.get_docstring(node) is not None:
                    lines -= node.body[0].end_lineno - node.body[0].lineno + 1
                if lines > 80:
                    long.append(f"{module}.{node.name}: {lines}")
    assert long == []
