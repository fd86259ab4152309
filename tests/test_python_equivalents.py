"""docs/guides/python-equivalents.md runs as written (its python blocks, in order, in one namespace), and its
two-line equivalents are the commands: `create` gives what `add-se --json` writes, `sweep_model` what
`sweep --json` writes, on the same arguments (issue 23, item 4)."""

import json
import re
import shutil
from pathlib import Path

import timm
from safetensors.torch import save_file, save_model
from typer.testing import CliRunner

import retrofit
from retrofit.cli import app
from support import five_class_model, make_folder

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "guides" / "python-equivalents.md"


def as_json(value):
    """``value`` as the JSON a command writes reads back (tuples become lists)."""
    return json.loads(json.dumps(value))


def test_every_block_runs_as_written(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)\n```", PAGE.read_text(), flags=re.S)
    assert len(blocks) == 6, "the page lost its examples"
    monkeypatch.chdir(tmp_path)
    make_folder(tmp_path / "data")
    save_model(five_class_model(), "plain.safetensors")
    save_file(timm.create_model("resnet50").state_dict(), "my_resnet50.safetensors")
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    namespace = {"__name__": "python_equivalents"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{PAGE.name} block {i + 1}", "exec"), namespace)
    ns = namespace
    assert len(ns["report"].rows) == 5 * 5 * 3
    assert json.loads(Path("sweep.json").read_text()) == as_json(ns["report"].to_dict())
    assert [row.arm for row in ns["accuracy"].rows][:3] == ["original", "head+norms", "full"]
    assert (tmp_path / "test_resnet-tune" / "tune.json").is_file() and ns["tuned"].output_dir.name == "test_resnet-tune"
    assert (tmp_path / "se-finetune" / "best.safetensors").is_file() and (tmp_path / "folded" / "config.json").is_file()
    assert len(ns["gates"].blocks) == len(retrofit.get_info(ns["se"]).blocks)
    assert [r.status for r in ns["results"]] == ["ok"]
    assert retrofit.get_info(ns["again"]).blocks == retrofit.get_info(ns["se50"]).blocks


def cli_json(*args):
    result = CliRunner().invoke(app, [*args, "--json", "-"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_create_is_add_se():
    made = retrofit.create("resnet18", r=8, position="post", stages=[4, 5])
    assert as_json(made.to_dict()) == cli_json(
        "add-se", "resnet18", "--r", "8", "--position", "post", "--stages", "4,5"
    )


def test_sweep_model_is_sweep():
    report = retrofit.sweep_model("resnet18", r=[4, 16], position=["standard", "identity"], stages="all,4")
    assert as_json(report.to_dict()) == cli_json(
        "sweep", "resnet18", "--r", "4,16", "--position", "standard,identity", "--stages", "all,4"
    )
