"""--help at 80 columns: no option name, example or text cut, no word broken at a hyphen, and printed
without importing torch or timm."""

import json
import re
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from retrofit.cli import app

COMMANDS = list(typer.main.get_command(app).commands)
EXAMPLES = [
    "2:8,3:8,4:16,5:32",
    "'features.denseblock*,features.transition*'",
    "LabelSmoothingCrossEntropy",
    "'16;2:8,3:8,4:16,5:32'",
    "--input-size",
    "[default: no-channels-last]",
]


def help_text(*command):
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("command", [[]] + [[c] for c in COMMANDS])
def test_help_fits_80_columns_and_cuts_nothing(command):
    text = help_text(*command)
    assert "…" not in text
    assert [ln for ln in text.splitlines() if len(ln) > 80] == []
    assert [ln for ln in text.splitlines() if re.search(r"[A-Za-z]-$", ln)] == []  # no word broken at a hyphen
    assert not [ln for ln in text.splitlines()[1:] if ln.rstrip().endswith("...")]  # no short help cut short
    if command:
        params = typer.main.get_command(app).commands[command[0]].params
        names = [o for p in params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")]
        missing = [n for n in names if not re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", text)]
        assert missing == []


def test_the_examples_are_there_whole():
    flat = " ".join(" ".join(help_text(c) for c in ("add-se", "finetune", "sweep")).split())
    for example in EXAMPLES:
        assert example in flat, example


def test_no_help_imports_torch_or_timm():
    """Every command's --help in one fresh process, then what it imported (the facade test covers
    `import retrofit.cli` alone; this one the help of each command too)."""
    code = (
        "import json, sys, typer; from typer.testing import CliRunner; from retrofit.cli import app; "
        "names = list(typer.main.get_command(app).commands); "
        "codes = [CliRunner().invoke(app, [*c, '--help']).exit_code for c in [[]] + [[n] for n in names]]; "
        "print(json.dumps([codes, [m for m in ('torch', 'timm') if m in sys.modules]]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    codes, heavy = json.loads(out.stdout)
    assert codes == [0] * (len(COMMANDS) + 1) and heavy == []
