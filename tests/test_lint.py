"""The code is kept by ruff: `ruff check` and `ruff format --check` pass on the whole repository with the
configuration of pyproject.toml ([tool.ruff]), and a violation fails each."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ruff(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "ruff", *args], capture_output=True, text=True, cwd=cwd)


def test_ruff_check_passes():
    done = ruff("check", "--no-cache", ".")
    assert done.returncode == 0, done.stdout + done.stderr


def test_ruff_check_fails_on_a_violation(tmp_path):
    """The same configuration finds an unused import, a line over 120 columns and unsorted imports."""
    bad = tmp_path / "bad.py"
    bad.write_text("import sys\nimport os\n\nx = '" + "a" * 130 + "'\n")
    done = ruff("check", "--no-cache", "--config", str(ROOT / "pyproject.toml"), str(bad), cwd=tmp_path)
    assert done.returncode == 1
    for rule in ("F401", "E501", "I001"):
        assert rule in done.stdout, done.stdout


def test_ruff_format_check_passes():
    done = ruff("format", "--check", "--no-cache", ".")
    assert done.returncode == 0, done.stdout + done.stderr


def test_ruff_format_check_fails_on_code_it_would_reformat(tmp_path):
    """Spacing, a split call that fits on one line and a line over 120 columns are each reformatted; the
    code as the formatter writes it (by hand here) passes."""
    config = ("--config", str(ROOT / "pyproject.toml"))
    cases = {
        "spacing.py": "x = {'a':1}\n",
        "split.py": "def f(a, b):\n    return a\n\n\nf(\n    1,\n    2,\n)\n",
        "long.py": "def f(*args):\n    return args\n\n\nf(" + ", ".join(["'" + "a" * 20 + "'"] * 6) + ")\n",
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        done = ruff("format", "--check", "--no-cache", *config, name, cwd=tmp_path)
        assert done.returncode == 1 and f"--> {name}:" in done.stdout, (name, done.stdout)
    (tmp_path / "good.py").write_text("x = {'a': 1}\n\n\ndef f(a, b):\n    return a\n\n\nf(1, 2)\n")
    done = ruff("format", "--check", "--no-cache", *config, "good.py", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
