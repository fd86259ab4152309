"""The fine-tune says what trains before the first epoch, a new head included: the head is replaced
once the data is open, so the run says it (in finetune and add-se --finetune alike)."""

import timm
from typer.testing import CliRunner

import retrofit
from retrofit.cli import app
from support import SIZE, make_folder, se_model

runner = CliRunner()


def said(result):
    assert result.exit_code == 0, result.output
    line = next(ln for ln in result.output.splitlines() if ln.startswith("phase 1,"))
    assert result.output.index(line) < result.output.index("Fine-tuning results")  # before training, not after
    return line


def test_finetune_names_a_new_head_for_data_with_other_classes(tmp_path):
    data = make_folder(tmp_path / "data")  # 3 classes
    model = retrofit.add_se(timm.create_model("test_resnet"), r=4, input_size=(3, SIZE, SIZE))  # 1000 classes
    ckpt = retrofit.save(model, tmp_path / "se.safetensors")
    line = said(
        runner.invoke(
            app, ["finetune", str(ckpt), "--data", str(data), "-b", "8", "-j", "0", "-o", str(tmp_path / "run")]
        )
    )
    blocks = sum(p.numel() for b in retrofit.get_info(model).blocks for p in model.get_submodule(b.path).parameters())
    head = 3 * model.get_classifier().in_features + 3  # the new 3-class linear layer, weights and biases
    total = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("fc.")) + head
    assert line.startswith("phase 1, 1 epoch(s): SE blocks, new 3-class head train, the rest is frozen")
    assert f"trainable parameters: {blocks + head:,} || all: {total:,}" in line


def test_finetune_of_a_fitting_model_trains_the_blocks_only(tmp_path):
    data = make_folder(tmp_path / "data")
    ckpt = retrofit.save(se_model(), tmp_path / "se.safetensors")
    line = said(
        runner.invoke(
            app,
            [
                "finetune",
                str(ckpt),
                "--data",
                str(data),
                "-b",
                "8",
                "-j",
                "0",
                "--phase2-epochs",
                "1",
                "-o",
                str(tmp_path / "run"),
            ],
        )
    )
    assert line.startswith("phase 1, 1 epoch(s): SE blocks train, the rest is frozen (trainable parameters: ")
    assert line.endswith("; phase 2, 1 epoch(s): everything trains")


def test_add_se_finetune_names_the_head_num_classes_made(tmp_path):
    data = make_folder(tmp_path / "data")
    line = said(
        runner.invoke(
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
                str(tmp_path / "se.safetensors"),
            ],
        )
    )
    assert line.startswith("phase 1, 1 epoch(s): SE blocks, new 3-class head train, the rest is frozen")
