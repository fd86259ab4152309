"""After a Ctrl-C or a refusal the command line says what to type next, in its own words; a Ctrl-C while
it is still loading is 'interrupted' too; counts are in the singular when there is one."""

import subprocess
import sys

import pytest
from typer.testing import CliRunner

import retrofit
import retrofit.train.run as run_module
from retrofit.cli import app
from support import SIZE, make_folder, se_model

runner = CliRunner()


def killed_in_epoch(monkeypatch, n):
    """A Ctrl-C in the middle of epoch ``n``'s training."""
    real, calls = run_module.Run._train_epoch, {"n": 0}

    def train_epoch(self, *args):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(self, *args)

    monkeypatch.setattr(run_module.Run, "_train_epoch", train_epoch)


@pytest.fixture()
def setup(tmp_path):
    return make_folder(tmp_path / "data"), retrofit.save(se_model(), tmp_path / "se.safetensors"), tmp_path / "run"


def finetune(ckpt, data, out, *more):
    return runner.invoke(
        app, ["finetune", str(ckpt), "--data", str(data), "--epochs", "3", "-b", "8", "-j", "0", "-o", str(out), *more]
    )


def test_a_ctrl_c_says_how_to_continue_and_the_resume_finishes(setup, monkeypatch):
    data, ckpt, out = setup
    killed_in_epoch(monkeypatch, 2)
    stopped = finetune(ckpt, data, out)
    assert stopped.exit_code == 130
    assert stopped.stderr.strip().splitlines()[-1] == (
        f"interrupted; the finished epochs are saved in {out}: rerun the same command with --resume to continue"
    )
    monkeypatch.undo()
    resumed = finetune(ckpt, data, out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "epoch 3" in resumed.stdout


def test_a_ctrl_c_before_any_epoch_finished(setup, monkeypatch):
    data, ckpt, out = setup
    killed_in_epoch(monkeypatch, 1)
    stopped = finetune(ckpt, data, out)
    assert stopped.exit_code == 130
    assert stopped.stderr.strip().splitlines()[-1] == "interrupted; no epoch had finished: nothing to resume"


def test_add_se_finetune_names_the_two_commands_that_resume(tmp_path, monkeypatch):
    data = make_folder(tmp_path / "data")
    killed_in_epoch(monkeypatch, 2)
    stopped = runner.invoke(
        app,
        [
            "add-se",
            "test_resnet",
            "--num-classes",
            "3",
            "--input-size",
            f"3,{SIZE},{SIZE}",
            "--finetune",
            str(data),
            "--epochs",
            "3",
            "-b",
            "8",
            "-j",
            "0",
            "--output",
            str(tmp_path / "se.safetensors"),
        ],
    )
    assert stopped.exit_code == 130
    line = stopped.stderr.strip().splitlines()[-1]
    assert "add-se --finetune cannot resume" in line
    assert f"`retrofit add-se ... --output FILE`, then `retrofit finetune FILE --data {data}`" in line
    assert not (tmp_path / "se.safetensors").exists()


def test_a_second_run_into_the_same_folder_is_told_in_cli_words(setup):
    data, ckpt, out = setup
    assert finetune(ckpt, data, out, "--epochs", "1").exit_code == 0
    again = finetune(ckpt, data, out, "--epochs", "1")
    assert again.exit_code == 2
    assert again.stderr.strip() == (
        f"error: {out} already holds a fine-tuning run; add --resume to continue it, "
        f"delete it, or choose another --output-dir"
    )


def test_the_python_api_is_told_in_its_own_words(setup):
    data, _, out = setup
    retrofit.finetune(se_model(), data, epochs=1, batch_size=8, output_dir=out)
    with pytest.raises(retrofit.RetrofitError, match=r"pass resume=True to continue it.*another output_dir"):
        retrofit.finetune(se_model(), data, epochs=1, batch_size=8, output_dir=out)


CTRL_C_AT_IMPORT = """
import sys
class CtrlC:  # a Ctrl-C arriving while the command line's modules load
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            raise KeyboardInterrupt
sys.meta_path.insert(0, CtrlC())
sys.argv = ["retrofit", "add-se", "resnet18"]
from retrofit.__main__ import run
run()
"""


@pytest.mark.parametrize("module", ["typer", "retrofit.cli.sweep", "rich.progress"])
def test_a_ctrl_c_while_loading_is_interrupted_not_a_traceback(module):
    proc = subprocess.run(
        [sys.executable, "-c", CTRL_C_AT_IMPORT.format(module=module)], capture_output=True, text=True, timeout=120
    )
    assert (proc.returncode, proc.stderr, proc.stdout) == (130, "interrupted\n", "")


def test_a_ctrl_c_while_typer_parses(monkeypatch, capsys):
    import retrofit.cli as cli

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "app", ctrl_c)
    try:
        cli.main()
        code = "no exit"
    except SystemExit as exit_:
        code = exit_.code
    except KeyboardInterrupt:  # escaped: the traceback a user saw
        code = "KeyboardInterrupt escaped"
    assert code == 130 and capsys.readouterr().err == "interrupted\n"


def test_one_combination_in_the_singular():
    result = runner.invoke(app, ["sweep", "resnet18", "--r", "16", "--input-size", "3,64,64"])
    assert result.exit_code == 0, result.output
    assert "; 1 combination; other fields" in result.stdout
