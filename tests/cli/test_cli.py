"""The command line: the mission command, JSON, saved models, and one clear line for bad input."""

import hashlib
import json
import subprocess
import sys

import pytest
import timm
import torch
from conftest import one_error
from safetensors.torch import save_file
from typer.testing import CliRunner

import retrofit
from retrofit.cli import app
from retrofit.files.checkpoint import load
from support import make_folder

runner = CliRunner()
BLOCKS = {  # units per model: ResNet-18 8 BasicBlocks, ResNet-50 16 and ResNet-101 33 bottlenecks
    "resnet18": 8,
    "resnet50": 16,
    "resnet101": 33,
}


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("model", list(BLOCKS))
@pytest.mark.parametrize("position", ["standard", "pre", "post", "identity", "inside"])
def test_mission_command(tmp_path, model, position):
    report = tmp_path / "report.json"
    result = run("add-se", model, "--r", 16, "--position", position, "--json", report)
    assert result.exit_code == 0, result.output
    for title in ("Sites found", "SE blocks inserted", "Overhead", "total", "base", "retrofitted"):
        assert title in result.stdout
    data = json.loads(report.read_text())
    assert data["added"]["blocks"] == BLOCKS[model] == len(data["blocks"])
    assert data["recipe"]["position"] == position and data["recipe"]["r"] == 16
    plain = timm.create_model(model)
    assert data["base"]["params"] == sum(p.numel() for p in plain.parameters())
    assert data["added"]["params"] == sum(b["params"] for b in data["blocks"])
    assert data["added"]["params"] == data["retrofitted"]["params"] - data["base"]["params"]
    assert data["added"]["macs"] == sum(b["macs"] for b in data["blocks"])
    # the closed form of an SE block on C channels, width w = C / r (ResNet widths divide by 16):
    # two 1x1 convs with biases, 2Cw + w + C parameters, 2Cw multiply-adds at batch 1
    widths = [b["channels"] // 16 for b in data["blocks"]]
    assert [b["width"] for b in data["blocks"]] == widths
    assert data["added"]["params"] == sum(
        2 * b["channels"] * w + w + b["channels"] for b, w in zip(data["blocks"], widths)
    )
    assert data["added"]["macs"] == sum(2 * b["channels"] * w for b, w in zip(data["blocks"], widths))
    assert f'{data["added"]["params"]:,}' in result.stdout


def test_json_to_stdout_is_pure_json():
    result = run("add-se", "resnet18", "--json", "-", "--stages", "3")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [s["stage"] for s in data["stages"]] == [3] and data["added"]["blocks"] == 2


def test_stages_restrict_the_per_stage_table(tmp_path):
    report = tmp_path / "r.json"
    result = run("add-se", "resnet50", "--stages", "2,5", "--json", report)
    assert result.exit_code == 0, result.output
    assert [(s["stage"], s["blocks"]) for s in json.loads(report.read_text())["stages"]] == [(2, 3), (5, 3)]


def test_output_file_rebuilds_the_same_model(tmp_path):
    out = tmp_path / "se_resnet18.safetensors"
    result = run("add-se", "resnet18", "--position", "post", "--r", 8, "--init", "paper", "--output", out)
    assert result.exit_code == 0, result.output
    model = load(out)
    assert type(model).__name__ == "ResNet" and len(retrofit.get_info(model).blocks) == 8
    assert retrofit.get_info(model).recipe.position == "post" and retrofit.get_info(model).recipe.r == 8
    again = retrofit.load(out)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(model.eval()(x), again.eval()(x))
    assert not list(tmp_path.glob(".*tmp"))


def test_checkpoint_weights_are_used_and_never_overwritten(tmp_path):
    weights = timm.create_model("resnet18").state_dict()
    ckpt = tmp_path / "my_resnet18.safetensors"
    save_file(weights, str(ckpt))
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    out = tmp_path / "se.safetensors"
    result = run("add-se", "resnet18", "--checkpoint", ckpt, "--output", out)
    assert result.exit_code == 0, result.output
    model = load(out)
    for key, value in weights.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == digest
    same = run("add-se", "resnet18", "--checkpoint", ckpt, "--output", ckpt)
    assert same.exit_code != 0 and "never overwritten" in same.stderr
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == digest


def test_checkpoint_with_another_number_of_classes(tmp_path):
    ckpt = tmp_path / "r18.pth"
    torch.save(timm.create_model("resnet18").state_dict(), ckpt)
    result = run("add-se", "resnet18", "--checkpoint", ckpt, "--num-classes", 7, "--json", "-")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["base"]["params"] == sum(
        p.numel() for p in timm.create_model("resnet18", num_classes=7).parameters()
    )


def test_sites_command():
    result = run("sites", "inception_v3")
    assert result.exit_code == 0, result.output
    assert "Mixed_7c" in result.stdout and "nested" in result.stdout


def test_recipes_command():
    result = run("recipes")
    assert result.exit_code == 0 and all(n in result.stdout for n in ("standard", "inside", "timm"))


def bad_recipe_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("position: post\nratio: 4\n")
    return path


def under_a_file(tmp_path):
    """An output path whose folder would have to be made inside a regular file."""
    (tmp_path / "afile").write_text("a file, not a folder")
    return tmp_path / "afile" / "dir" / "x.safetensors"


def corrupted_checkpoint(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x00" * 40)
    return path


BAD_INPUT = [
    (["add-se", "resnet5O"], "unknown model 'resnet5O'; did you mean resnet50"),
    (["add-se", "resnet18", "--r", "0"], "'r': the reduction ratio must be a positive number"),
    (["add-se", "resnet18", "--r", "-3"], "'r'"),
    (["add-se", "resnet18", "--r", "abc"], "got 'abc'"),
    (["add-se", "resnet18", "--position", "middle"], "'position': unknown value 'middle'; allowed: standard"),
    (["add-se", "resnet18", "--gate", "softmax"], "'gate': unknown value 'softmax'"),
    (["add-se", "resnet18", "--squeeze", "median"], "'squeeze': unknown value 'median'; allowed: avg, max"),
    (["add-se", "resnet18", "--recipe", "missing.yaml"], "recipe file missing.yaml not found"),
    (["add-se", "resnet18", "--recipe", bad_recipe_file], "unknown field 'ratio'"),
    (["add-se", "resnet50", "--stages", "6"], "stage 6 does not exist in resnet50"),
    (["add-se", "resnet50", "--stages", "x"], "'stages'"),
    (["add-se", "inception_v3", "--position", "inside"], "position 'inside' has no site in inception_v3"),
    (["add-se", "vgg11"], "no residual or Inception merge at all"),
    (["add-se", "resnet18", "--output", under_a_file], "cannot create the output folder"),
    (["add-se", "resnet18", "--checkpoint", corrupted_checkpoint], "cannot read checkpoint"),
    (["add-se", "resnet18", "--checkpoint", "nothere.pth"], "checkpoint nothere.pth not found"),
    (["add-se", "resnet18", "--input-size", "3,abc"], "input size must be"),
]


@pytest.mark.parametrize("args, message", BAD_INPUT)
def test_bad_input_gets_one_clear_line(tmp_path, args, message):
    args = [a(tmp_path) if callable(a) else a for a in args]
    result = run(*args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.output


def test_width_below_one_is_a_warning_not_an_error():
    result = run("add-se", "resnet18", "--r", 1000, "--json", "-")
    assert result.exit_code == 0
    assert "warning: r=1000 gives a reduced width below 1" in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["add-se", "resnet18", "--r", "-1"], "error: recipe field 'r'"),
        (["add-se", "resnet18", "--bogus", "1"], "error: No such option: --bogus"),
        (["sites"], "error: Missing argument"),
    ],
)
def test_installed_entry_point_fails_cleanly(args, message):
    proc = subprocess.run([sys.executable, "-m", "retrofit", *args], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().startswith(message) and len(proc.stderr.strip().splitlines()) == 1


def test_under_torchrun_only_rank_0_prints_the_error(monkeypatch):
    """N processes meeting the same bad input: every one exits with 2, one line is printed."""
    for rank, lines in (("0", 1), ("1", 0)):
        monkeypatch.setenv("RANK", rank)
        result = runner.invoke(app, ["add-se", "resnet18", "--r", "0"])
        assert result.exit_code == 2
        assert sum(ln.startswith("error:") for ln in result.output.splitlines()) == lines, result.output


def test_sites_json_says_each_site_layout():
    """ViT-Ti: 12 blocks x 2 sums on (B, 1 + 14 x 14, 192) token sequences with one class token."""
    result = runner.invoke(app, ["sites", "vit_tiny_patch16_224", "--num-classes", "10", "--json", "-"])
    assert result.exit_code == 0, result.output
    sites = json.loads(result.output)["sites"]
    assert len(sites) == 24 and {(s["layout"], s["prefix"], tuple(s["size"])) for s in sites} == {
        ("tokens", 1, (14, 14))
    }


def test_the_block_table_fits_a_terminal_and_never_cuts_a_name():
    """resnet101 has 33 blocks: folded by default (per stage the first, '... N more', the last), every
    block with --blocks; at 100 columns no name a user types back (--only, --skip) is cut."""
    names = [f"layer{i}.{j}.se_post" for i, n in enumerate((3, 4, 23, 3), start=1) for j in range(n)]
    folded = runner.invoke(app, ["add-se", "resnet101", "--position", "post"], env={"COLUMNS": "100"})
    assert folded.exit_code == 0, folded.output
    rows = [ln for ln in folded.stdout.splitlines() if ln[:1] in set("┏┃┡│├└")]  # the tables' lines
    assert len(rows) > 30 and max(len(ln) for ln in rows) <= 100 and "…" not in folded.stdout
    table = folded.stdout.split("SE blocks inserted")[1].split("Overhead")[0]
    shown = [n for n in names if f" {n} " in table]
    assert shown == [
        "layer1.0.se_post",
        "layer1.1.se_post",
        "layer1.2.se_post",
        "layer2.0.se_post",
        "layer2.3.se_post",
        "layer3.0.se_post",
        "layer3.22.se_post",
        "layer4.0.se_post",
        "layer4.1.se_post",
        "layer4.2.se_post",
    ]
    assert "... 2 more" in table and "... 21 more" in table
    every = runner.invoke(app, ["add-se", "resnet101", "--position", "post", "--blocks"], env={"COLUMNS": "100"})
    assert every.exit_code == 0, every.output
    assert all(f" {n} " in every.stdout for n in names) and "more" not in every.stdout.split("Overhead")[0]


def test_an_unexpected_exception_is_one_line_and_exit_3(monkeypatch):
    """A bug (not bad input) still ends in one line, with the way to see the traceback; its text is
    printed as it is, markup-like brackets included."""
    import retrofit.surgery.recipe

    def broken(*args, **kwargs):
        raise ValueError("unexpected [/bold] value [red]x[/]")

    monkeypatch.setattr(retrofit.surgery.recipe, "resolve_recipe", broken)
    result = run("add-se", "resnet18")
    assert result.exit_code == 3 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines() == [
        "internal error: ValueError: unexpected [/bold] value [red]x[/] (rerun with RETROFIT_DEBUG=1 for the "
        "traceback and report it)"
    ]


def test_markup_in_messages_and_paths_prints_as_text(tmp_path):
    from support import make_folder, se_model

    data = make_folder(tmp_path / "[/x]", train=2, val=1)
    ckpt = retrofit.save(se_model(), tmp_path / "se.safetensors")
    out = tmp_path / "[/x]" / "[bold]run[red]"
    result = run(
        "finetune", ckpt, "--data", data, "--epochs", "1", "-b", "6", "-j", "0", "--output-dir", out, "--resume"
    )
    assert result.exit_code == 0, result.output
    assert f"fine-tuning on {data}; checkpoints in {out}" in result.stdout
    assert f"-> {out / 'best.safetensors'}" in result.stdout
    assert f"warning: nothing to resume in {out};" in result.stderr
    bad = run("add-se", "resnet18", "--recipe", "[/bold]missing[red].yaml")
    assert bad.exit_code == 2 and bad.stderr.startswith("error: recipe file [/bold]missing[red].yaml not found;")


def test_a_wrong_input_size_is_reported_at_once_without_a_real_build(monkeypatch):
    """ViT's patch embedding takes 224x224 only: the meta build says so; no real build is tried (it would
    spend the memory and time the meta build saves, and fail the same way)."""
    import retrofit.files.create as create

    built, real = [], create.build_timm

    def counted(*args, **kwargs):
        built.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(create, "build_timm", counted)
    result = run("add-se", "vit_tiny_patch16_224", "--input-size", "3,96,96")
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().startswith("error: vit_tiny_patch16_224 takes 224x224 images only")
    assert "--input-size 3,224,224" in result.stderr
    assert len(built) == 1


def test_the_meta_build_falls_back_where_real_values_are_needed():
    from torch import nn

    from retrofit.measure.meta import build_and_scan, is_meta

    class NeedsValues(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.gain = float(self.conv.weight.abs().sum().item() > 0)  # .item() has no value on meta

        def forward(self, x):
            return x + self.gain * self.conv(x)

    net, found = build_and_scan(NeedsValues, (3, 8, 8), meta=True)
    assert not is_meta(net) and found.count("residual") == 1


def test_missing_output_folders_are_created(tmp_path, monkeypatch):
    """Issue 17, item 7: every output path (--output, --json, --plot, --output-dir) was refused with
    'output folder ... does not exist; create it first'. They are made as `mkdir -p` makes them, and a
    command that fails on bad input creates none."""
    monkeypatch.chdir(tmp_path)
    make_folder(tmp_path / "data")
    commands = [
        [
            "add-se",
            "test_resnet",
            "--num-classes",
            "3",
            "--input-size",
            "3,32,32",
            "--position",
            "post",
            "--output",
            "new/a/se.safetensors",
            "--json",
            "new/b/add.json",
        ],
        ["sites", "test_resnet", "--json", "new/c/sites.json"],
        ["sweep", "test_resnet", "--r", "4,8", "--json", "new/d/sweep.json", "--plot", "new/e/sweep.png"],
        ["check", "test_resnet", "--json", "new/f/check.json"],
        [
            "finetune",
            "new/a/se.safetensors",
            "--data",
            "data",
            "--epochs",
            "1",
            "-b",
            "8",
            "-j",
            "0",
            "--output-dir",
            "new/g/run",
        ],
    ]
    for args in commands:
        result = run(*args)
        assert result.exit_code == 0, (args, result.output)
    for path in (
        "a/se.safetensors",
        "a/se.README.md",
        "b/add.json",
        "c/sites.json",
        "d/sweep.json",
        "e/sweep.png",
        "f/check.json",
        "g/run/best.safetensors",
        "g/run/metrics.jsonl",
    ):
        assert (tmp_path / "new" / path).is_file(), path
    one_error(run("add-se", "no_such_model", "--output", "later/se.safetensors"), "unknown model")
    assert not (tmp_path / "later").exists()


@pytest.mark.parametrize(("model", "block"), [("tiny_vit_5m_224", "TinyVitBlock"), ("nf_regnet_b0", "NormFreeBlock")])
def test_sites_lists_the_blocks_timm_marks_untraceable(model, block):
    """timm registers these blocks as fx leaves: the pass sees none of their residual sums, and says so,
    one line per block, in the table's report and in the JSON's kept and skipped lists."""
    paths = [n for n, m in timm.create_model(model).named_modules() if type(m).__name__ == block]
    assert len(paths) >= 10
    result = run("sites", model, "--input-size", "3,64,64")
    assert result.exit_code == 0, result.output
    said = f"{block} is a timm notrace module"
    assert [ln.split(": ")[1] for ln in result.stdout.splitlines() if said in ln] == paths  # "kept as is: PATH: ..."
    data = json.loads(run("sites", model, "--input-size", "3,64,64", "--json", "-").stdout)
    assert [k["module"] for k in data["kept"] if said in k["reason"]] == paths
    assert [s["where"] for s in data["skipped"] if said in s["reason"]] == paths
