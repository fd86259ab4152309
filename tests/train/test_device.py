"""A device this machine lacks is one error line (exit 2) before anything is made, not torch's
"Found no NVIDIA driver" from inside the run (exit 3, a locked folder left behind)."""

import pytest
import torch
from conftest import one_error
from typer.testing import CliRunner

import retrofit
from retrofit.cli import app
from support import make_folder, se_model

runner = CliRunner()


@pytest.fixture(scope="module")
def ckpt_and_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("device")
    return retrofit.save(se_model(), root / "se.safetensors"), make_folder(root / "data")


@pytest.mark.parametrize(
    "gpus, device, words",
    [
        (0, "cuda", ["device cuda: no CUDA GPU found (torch ", "use --device cpu"]),
        (1, "cuda:3", ["device cuda:3: this machine has 1 CUDA GPU(s), cuda:0 to cuda:0"]),
        (0, "gpu", ["device 'gpu' is not a device name; use cpu, cuda or cuda:N"]),
    ],
)
def test_a_missing_device_is_one_line_and_nothing_is_made(tmp_path, monkeypatch, ckpt_and_data, gpus, device, words):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)  # what this machine reports
    ckpt, data = ckpt_and_data
    out = tmp_path / "run"
    one_error(
        runner.invoke(app, ["finetune", str(ckpt), "--data", str(data), "-j", "0", "-o", str(out), "--device", device]),
        *words,
    )
    assert not out.exists()


def test_sweep_data_checks_it_before_building_the_model(tmp_path, monkeypatch, ckpt_and_data):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    _, data = ckpt_and_data
    one_error(
        runner.invoke(
            app,
            [
                "sweep",
                "test_resnet",
                "--num-classes",
                "3",
                "--input-size",
                "3,32,32",
                "--data",
                str(data),
                "-j",
                "0",
                "--device",
                "cuda",
                "--json",
                str(tmp_path / "s.json"),
            ],
        ),
        "no CUDA GPU found",
    )
    assert list(tmp_path.iterdir()) == []


def test_add_se_finetune_checks_it_before_building_the_model(tmp_path, monkeypatch, ckpt_and_data):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    _, data = ckpt_and_data
    one_error(
        runner.invoke(
            app,
            [
                "add-se",
                "test_resnet",
                "--num-classes",
                "3",
                "--input-size",
                "3,32,32",
                "--finetune",
                str(data),
                "--output",
                str(tmp_path / "se.safetensors"),
                "--device",
                "cuda",
            ],
        ),
        "no CUDA GPU found",
    )
    assert list(tmp_path.iterdir()) == []
