"""A warning is printed when it happens: before the results in a pipe, above the live progress bars in a
terminal, and also when the command then fails."""

import io
import sys
import warnings

import numpy as np
from PIL import Image
from typer.testing import CliRunner

import retrofit
from retrofit.cli import app
from retrofit.errors import RetrofitWarning
from support import make_folder, se_model

runner = CliRunner()


def broken_jpg(path):
    buf = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(buf, format="JPEG")
    path.write_bytes(buf.getvalue()[:200])  # truncated: PIL opens it, decoding fails
    return path


def test_warnings_come_before_the_results(tmp_path):
    data = make_folder(tmp_path / "data")
    broken_jpg(data / "train" / "class0" / "broken.jpg")
    ckpt = retrofit.save(se_model(), tmp_path / "se.safetensors")
    result = runner.invoke(
        app, ["finetune", str(ckpt), "--data", str(data), "-b", "64", "-j", "0", "-o", str(tmp_path / "run")]
    )
    assert result.exit_code == 0, result.output
    text = result.output  # stdout and stderr as they were written
    results = text.index("Fine-tuning results")
    assert text.index("warning: skipped") < results
    assert text.index("fewer than one batch of 64") < results


def test_a_warning_is_printed_when_the_command_then_fails(tmp_path):
    """Every image of train/ broken: the warnings name each file, then the error says none decoded."""
    data = make_folder(tmp_path / "data", train=1)
    for c in range(3):
        for p in (data / "train" / f"class{c}").iterdir():
            p.unlink()
        broken_jpg(data / "train" / f"class{c}" / "bad.jpg")
    ckpt = retrofit.save(se_model(), tmp_path / "se.safetensors")
    result = runner.invoke(
        app, ["finetune", str(ckpt), "--data", str(data), "-b", "3", "-j", "0", "-o", str(tmp_path / "run")]
    )
    assert result.exit_code == 2, result.output
    assert result.stderr.count("warning: skipped") == 3
    assert result.stderr.strip().splitlines()[-1].startswith("error: none of the 3 images")


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_warning_goes_above_the_live_bars(monkeypatch):
    """In a terminal the warning is a line of its own above the bars, not written into a bar's line."""
    from retrofit.cli.common import warnings_as_they_happen
    from retrofit.train.progress import Progress

    err = Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    with warnings_as_they_happen(), Progress(True) as bars:
        task = bars.task("epoch 1 train", 2)
        bars.advance(task, 1.0)
        warnings.warn("skipped x.jpg: cannot decode it", RetrofitWarning, stacklevel=1)
        bars.advance(task, 1.0)
    screen = err.getvalue().replace("\r", "\n").split("\n")
    hits = [ln for ln in screen if "skipped x.jpg" in ln]
    assert hits, err.getvalue()
    for ln in hits:  # the line starts with the warning (after cursor and colour codes), no bar before it
        visible = ln.replace("\x1b[2K", "").replace("\x1b[1A", "")
        assert "epoch 1 train" not in visible and visible.split("warning:")[0].strip("\x1b[0123456789;m") == "", ln
