"""The code is kept by ruff: `ruff check` passes on the whole repository with the configuration of
pyproject.toml ([tool.ruff]), and a violation fails it."""

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
