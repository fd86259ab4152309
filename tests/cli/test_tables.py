"""Every table the CLI prints, at 80 and 120 columns: no line wider than the terminal, nothing cut with an
ellipsis, and every headline number and name whole on one line (the values taken from the command's
JSON or metrics file, not from the table)."""

import json
import re

import pytest
from typer.testing import CliRunner

import retrofit
from retrofit.cli import app
from support import make_folder, se_model

runner = CliRunner()
WIDTHS = [80, 120]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("data"))


def run(width, *args):
    result = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": str(width)})
    assert result.exit_code == 0, result.output
    return result.stdout


def fits(text, width, tokens):
    """Table lines within ``width``, no ellipsis, and each token whole (not part of a longer number)."""
    table_lines = [ln for ln in text.splitlines() if ln[:1] in "┏┃┡│├└"]
    assert all(len(ln) <= width for ln in table_lines), max(table_lines, key=len)
    assert "…" not in text
    missing = [t for t in tokens if not re.search(rf"(?<![\w.,]){re.escape(t)}(?![\w.,])", text)]
    assert not missing, f"cut, wrapped or left out at {width} columns: {missing[:6]}"


@pytest.mark.parametrize("width", WIDTHS)
def test_add_se_tables(tmp_path, width):
    """resnet101: a 7-digit stage total and 10-digit base multiply-adds, which 80 columns used to split."""
    out = run(width, "add-se", "resnet101", "--json", tmp_path / "r.json")
    d = json.loads((tmp_path / "r.json").read_text())
    numbers = (
        [b["params"] for b in d["blocks"]]
        + [b["macs"] for b in d["blocks"]]
        + [d[k][m] for k in ("added", "base", "retrofitted") for m in ("params", "macs")]
        + [s["params"] for s in d["stages"]]
    )
    firsts = [b["path"] for b in d["blocks"] if b["path"].endswith(".0.se")]  # each stage's first: never folded
    fits(out, width, [f"{n:,}" for n in numbers] + firsts + [f"{s['stage']}" for s in d["stages"]])


@pytest.mark.parametrize("width", WIDTHS)
def test_sites_table(width):
    out = run(width, "sites", "densenet121")  # long module paths: features.denseblock4.denselayer16...
    d = json.loads(runner.invoke(app, ["sites", "densenet121", "--json", "-"]).stdout)
    fits(out, width, [s["module"] for s in d["sites"]])


@pytest.mark.parametrize("width", WIDTHS)
def test_sweep_cost_table(tmp_path, width):
    out = run(width, "sweep", "resnet50", "--r", "4,16", "-p", "standard,pre", "--json", tmp_path / "s.json")
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    fits(out, width, [f"{r['params']:,}" for r in rows] + [r["position"] for r in rows])


@pytest.mark.parametrize("width", WIDTHS)
def test_sweep_accuracy_table(tmp_path, data, width):
    # post: on a random resnet10t the standard position gets no gradient (timm zeroes the branch ends)
    out = run(
        width,
        "sweep",
        "resnet10t",
        "--r",
        "4,16",
        "-p",
        "post",
        "--input-size",
        "3,32,32",
        "--num-classes",
        "3",
        "--data",
        data,
        "--seeds",
        "2",
        "-b",
        "8",
        "-j",
        "0",
        "--json",
        tmp_path / "s.json",
    )
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    tokens = [f"{r['top1']:.2f} ± {r['top1_std']:.2f}" for r in rows]
    tokens += [f"{r['delta_top1']:+.2f} ± {r['delta_top1_std']:.2f}" for r in rows if r["delta_top1"] is not None]
    tokens += [f"control: {r['arm']}" for r in rows if r["arm"] != "se"] + [f"{r['params']:,}" for r in rows]
    fits(out, width, tokens)


@pytest.mark.parametrize("width", WIDTHS)
def test_finetune_results_table(tmp_path, data, width):
    ckpt = retrofit.save(se_model(), tmp_path / "se.safetensors")
    out = run(width, "finetune", ckpt, "--data", data, "-b", "6", "-j", "0", "-o", tmp_path / "run")
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    tokens = [f"{r['val_loss']:.4f}" for r in rows] + [f"{r['top1']:.2f}" for r in rows]
    tokens += [f"{r['train_loss']:.4f}" for r in rows if r["train_loss"] is not None]
    fits(out, width, tokens + ["original (no SE)", "retrofitted, step 0"])


@pytest.mark.parametrize("width", WIDTHS)
def test_check_table(tmp_path, width):
    """A model given by name gets its family too (it used to be an empty column)."""
    out = run(width, "check", "resnet18", "vit_tiny_patch16_224", "--json", tmp_path / "c.json")
    results = json.loads((tmp_path / "c.json").read_text())["results"]
    assert [r["family"] for r in results] == ["resnet", "vision_transformer"]  # timm's defining modules
    params = [f"{r['params_added']['standard']:,}" for r in results]
    fits(out, width, ["resnet18", "vit_tiny_patch16_224"] + params + (["vision_transformer"] if width > 80 else []))
