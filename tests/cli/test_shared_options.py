"""add-se --finetune takes every option of retrofit finetune (one definition, FINETUNE_OPTIONS), and
they reach the run; resuming stays finetune's, and add-se's help says how."""

import torch
import typer
from typer.testing import CliRunner

from retrofit.cli import app
from support import SIZE, make_folder

runner = CliRunner()
FINETUNE_ONLY = {"checkpoint", "data", "resume", "output_dir", "input_size", "base", "force", "adapter"}


def commands():
    return typer.main.get_command(app).commands


def test_add_se_has_every_option_of_the_fine_tune():
    cmds = commands()
    tune = {p.name: p for p in cmds["finetune"].params}
    add = {p.name: p for p in cmds["add-se"].params}
    shared = set(tune) - FINETUNE_ONLY - {"help"}
    assert {"lr", "batch_size", "workers", "seed", "device", "phase2_epochs", "train_norms", "smoothing"} <= shared
    assert shared <= set(add)
    for name in shared:  # the same flags, defaults and help: one definition
        assert (add[name].opts, add[name].secondary_opts, add[name].default, add[name].help) == (
            tune[name].opts,
            tune[name].secondary_opts,
            tune[name].default,
            tune[name].help,
        ), name
    assert "resume" not in add and "output_dir" not in add
    assert "retrofit finetune F --data DIR` (which takes --resume)" in add["finetune"].help


def test_the_options_reach_the_run(tmp_path):
    data = make_folder(tmp_path / "data")
    out = tmp_path / "se.safetensors"
    result = runner.invoke(
        app,
        [
            "add-se",
            "test_resnet",
            "--num-classes",
            "3",
            "--r",
            "4",
            "--input-size",
            f"3,{SIZE},{SIZE}",
            "--finetune",
            str(data),
            "--output",
            str(out),
            "--lr",
            "0.05",
            "-b",
            "8",
            "-j",
            "0",
            "--seed",
            "3",
            "--smoothing",
            "0",
            "--phase2-epochs",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    settings = torch.load(tmp_path / "se-add-se" / "train_state.pt", weights_only=True)["settings"]
    assert (
        settings["lr"],
        settings["batch_size"],
        settings["seed"],
        settings["smoothing"],
        settings["phase2_epochs"],
    ) == (0.05, 8, 3, 0.0, 1)
