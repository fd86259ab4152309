"""The project frame: the README's test command is what CI runs; recipes ship inside the wheel."""

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import retrofit

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    text = (ROOT / "README.md").read_text()
    setup = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)\n```", setup, flags=re.S)


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    commands = readme_commands()
    assert len(commands) == 2, commands
    main_job, tests = commands
    assert "retrofit add-se resnet101" in main_job and "pytest" in tests
    assert "-c constraints.txt" in main_job and "-c constraints.txt" in tests
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests.strip() in ci


def test_wheel_ships_every_package_the_builtin_recipes_py_typed_and_the_license(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "*.egg-info", "build", "__pycache__"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("retrofit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for recipe in ("standard", "pre", "post", "identity", "inside", "timm"):
        assert f"retrofit/recipes/{recipe}.yaml" in names
    for module in (ROOT / "retrofit").rglob("*.py"):  # pyproject lists packages by hand: none forgotten
        assert module.relative_to(ROOT).as_posix() in names
    assert "retrofit/py.typed" in names  # PEP 561: type checkers read the package's annotations
    (license,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]  # the text pyproject declares
    assert zipfile.ZipFile(wheel).read(license) == (ROOT / "LICENSE").read_bytes()


def test_install_page_gives_the_readme_setup_commands_as_they_are():
    """docs/install.md repeats the README's two set-up commands; a change to one is made to both."""
    install = (ROOT / "docs" / "install.md").read_text()
    assert all(f"```sh\n{command}\n```" in install for command in readme_commands())


def test_readme_python_quickstart_runs(tmp_path, monkeypatch):
    """The README's one Python block (its quickstart), run as written by the runner of every page's blocks
    (tests/test_docs.py); the manual's blocks moved into docs/ and run there."""
    from support import python_blocks, run_python_blocks

    monkeypatch.chdir(tmp_path)
    (block,) = python_blocks(ROOT / "README.md")
    assert len(block.strip().splitlines()) <= 12  # a quickstart, not a manual
    namespace = {}
    assert run_python_blocks(ROOT / "README.md", namespace, ROOT) == 1
    report, se_model = namespace["report"], namespace["se_model"]
    closed_form = 2 * sum(2 * c * (c // 16) + c // 16 + c for c in (64, 128, 256, 512))  # 2 blocks a stage, w = C/16
    assert report.added_params == closed_form == 89_080
    assert len(retrofit.get_info(se_model).blocks) == 8
    assert sorted(p.name for p in namespace["folder"].iterdir()) == ["README.md", "config.json", "model.safetensors"]


def test_readme_is_a_front_page_linking_existing_pages():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    links = re.findall(r"\]\(((?:docs/|CHANGELOG)[^)#]*)\)", text)
    assert len(links) >= 20
    assert [link for link in links if not (ROOT / link).is_file()] == []
