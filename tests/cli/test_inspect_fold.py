"""`retrofit inspect` and `retrofit fold` on saved files: what they print and write, and one `error:` line
for each bad input (a file without blocks, blocks that are not channel gates, data with other classes,
a tolerance out of range)."""

import json

import pytest
import torch
from conftest import one_error
from safetensors.torch import save_model
from typer.testing import CliRunner

import retrofit
from retrofit.cli import app
from retrofit.surgery.fold import gates, info_of
from support import five_class_model, make_folder, se_model

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    make_folder(d / "data")
    model = se_model()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for b in gates(model)[0]:
            model.get_submodule(b.path).fc2.bias.copy_(torch.randn(b.channels, generator=g))
        model.layer2[0].se.fc1.weight.normal_(generator=g)
    retrofit.save(model, d / "se.safetensors")
    retrofit.save(se_model(module="cbam"), d / "cbam.safetensors")
    retrofit.save(se_model(plain=five_class_model()), d / "five.safetensors")
    save_model(five_class_model(), str(d / "plain.safetensors"))
    return d


def test_inspect_prints_the_table_writes_json_and_the_figure(files):
    result = run(
        "inspect",
        files / "se.safetensors",
        "--data",
        files / "data",
        "-j",
        0,
        "--plot",
        files / "fig.png",
        "--json",
        files / "inspect.json",
    )
    assert result.exit_code == 0, result.output
    assert "Channel gates" in result.stdout and "layer2.0.se" in result.stdout and "constant" in result.stdout
    data = json.loads((files / "inspect.json").read_text())
    assert [b["constant"] for b in data["blocks"]] == [True, False, True, True]
    assert len(data["blocks"][0]["channel_means"]) == 32 and len(data["blocks"][0]["class_means"]) == 3
    assert (files / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fold_saves_reports_and_measures(files):
    out = files / "folded.safetensors"
    result = run(
        "fold",
        files / "se.safetensors",
        "--data",
        files / "data",
        "-j",
        0,
        "-t",
        "100",
        "-o",
        out,
        "--json",
        files / "fold.json",
    )
    assert result.exit_code == 0, result.output
    for text in (
        "Folded blocks",
        "Overhead before the fold",
        "Overhead after the fold",
        "folded 4 of 4",
        "evaluations",
    ):
        assert text in result.stdout, text
    data = json.loads((files / "fold.json").read_text())
    assert data["folded"] == 4 and data["evaluations"] <= 4 and data["after"]["top1"] >= data["before"]["top1"] - 100
    assert info_of(retrofit.load(out)).folds and (files / "folded.README.md").is_file()


def test_fold_without_data_and_nothing_to_fold_says_so(files):
    base = files / "all-folded.safetensors"
    model = se_model()
    retrofit.save(retrofit.fold(model).model, base)  # every gate input-independent: all folded
    result = run("fold", base, "-o", files / "again.safetensors")
    one_error(result, "no channel gate to fold", "all 4 of its blocks were folded")
    result = run("inspect", base, "--data", files / "data")
    one_error(result, "no channel gate to inspect", "all 4 of its blocks were folded")


@pytest.mark.parametrize(
    "args,words",
    [
        (("inspect", "plain.safetensors", "--data", "data"), ("not a retrofit file",)),
        (("inspect", "cbam.safetensors", "--data", "data"), ("no channel gate", "spatial gate")),
        (("fold", "cbam.safetensors", "-o", "x.safetensors"), ("no channel gate", "spatial gate")),
        (("inspect", "five.safetensors", "--data", "data"), ("3 classes", "5 outputs")),
        (("fold", "five.safetensors", "-t", "1", "--data", "data", "-o", "x.safetensors"), ("3 classes", "5 outputs")),
        (("fold", "se.safetensors", "-t", "-1", "-o", "x.safetensors"), ("tolerance must be",)),
        (("fold", "se.safetensors", "-t", "101", "-o", "x.safetensors"), ("tolerance must be",)),
        (("fold", "se.safetensors", "-t", "nan", "-o", "x.safetensors"), ("tolerance must be",)),
        (("fold", "se.safetensors", "-t", "0.5", "-o", "x.safetensors"), ("--data",)),
        (("fold", "se.safetensors", "--blocks", "layer9.*", "-o", "x.safetensors"), ("names no block",)),
        (("fold", "se.safetensors", "-o", "se.safetensors"), ("never overwritten",)),
    ],
)
def test_bad_input_is_one_error_line(files, args, words, monkeypatch):
    monkeypatch.chdir(files)
    one_error(run(*args), *words)
    assert not (files / "x.safetensors").exists()
