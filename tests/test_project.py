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
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("retrofit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for recipe in ("standard", "pre", "post", "identity", "inside", "timm"):
        assert f"retrofit/recipes/{recipe}.yaml" in names
    for module in (ROOT / "retrofit").rglob("*.py"):  # pyproject lists packages by hand: none forgotten
        assert module.relative_to(ROOT).as_posix() in names
    assert "retrofit/py.typed" in names  # PEP 561: type checkers read the package's annotations
    (license,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]  # the text pyproject declares
    assert zipfile.ZipFile(wheel).read(license) == (ROOT / "LICENSE").read_bytes()


def test_readme_inline_finetune_call_runs_as_written(tmp_path, monkeypatch):
    """The README's one-line Python fine-tune (prose, not a python block), on a model whose blocks
    learn, in a folder holding only data/: its output_dir's parents did not exist (issue 17, item 7)."""
    from support import make_folder, se_model

    text = (ROOT / "README.md").read_text()
    (call,) = set(re.findall(r"`(retrofit\.finetune\(model, [^`]*\))`", text))
    assert 'output_dir="runs/se50"' in call
    monkeypatch.chdir(tmp_path)
    make_folder(tmp_path / "data")
    namespace = {"retrofit": __import__("retrofit"), "model": se_model(position="post")}
    result = eval(compile(call, "README.md", "eval"), namespace)
    assert (tmp_path / "runs" / "se50" / "best.safetensors").is_file()
    assert [r["name"] for r in result.rows] == ["original", "step 0", "epoch 1", "epoch 2"]


def test_readme_python_examples_run(tmp_path, monkeypatch):
    """The README's Python blocks, run as written (with a weights file and recipes they refer to), by the
    runner of every page's blocks (tests/test_docs.py)."""
    import timm
    from safetensors.torch import save_file

    from support import run_python_blocks

    monkeypatch.chdir(tmp_path)
    save_file(timm.create_model("resnet50").state_dict(), "my_resnet50.safetensors")
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    from support import make_folder

    make_folder(tmp_path / "data")  # the 3-class data set the inspect and fold lines read
    namespace = {}
    assert run_python_blocks(ROOT / "README.md", namespace, ROOT) == 3
    assert namespace["report"].added_params > 0
    assert len(retrofit.get_info(namespace["again"]).blocks) == 2
    detector = retrofit.get_info(namespace["se_detector"])
    assert len(detector.blocks) == 16 and len(namespace["detections"]) == 2  # no FPN merge
    assert {"loss_classifier", "loss_objectness"} <= set(namespace["losses"])
    assert len(namespace["gates"].blocks) == 8 and namespace["result"].evaluations >= 1
