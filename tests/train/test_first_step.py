"""Issue 17, item 1: a phase 1 that learns nothing must say so. timm builds a random ResNet with the
last norm of each residual branch at zero (zero_init_last), which makes the gradient of a block on
that branch exactly zero. The fine-tune checks its first step. The command line says in one line when
a model's weights are random, and the file records where its weights came from."""

import json
import warnings

import pytest
import timm
import torch
from conftest import randomize
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import retrofit
from retrofit import RetrofitError, RetrofitWarning
from retrofit.cli import app
from retrofit.surgery.info import update_info
from support import FAST, SIZE, make_folder, one_error_line

runner = CliRunner()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("data"))


def fresh(position="standard", **kwargs):
    """resnet10t as timm builds it (random weights: every residual branch's last norm at zero), retrofitted."""
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=3, **kwargs)
    assert bool(model.layer1[0].bn2.weight.any()) == (kwargs.get("zero_init_last") is False)  # timm's doing
    return retrofit.add_se(model, position=position, input_size=(3, SIZE, SIZE))


def test_a_phase_in_which_nothing_gets_a_gradient_is_refused(data):
    se = fresh()
    before = {k: v.clone() for k, v in se.state_dict().items()}
    with pytest.raises(
        RetrofitError,
        match=r"nothing trainable got a gradient in the first step of phase 1, so it "
        r"would train nothing: layer1\.0\.se \(layer1\.0\.bn2 = 0\).*zero_init_last"
        r".*--checkpoint or --pretrained.*--position post or identity.*"
        r"--train-norms.*the classifier is frozen",
    ) as caught:
        retrofit.finetune(se, data, epochs=3, **FAST)
    assert "\n" not in str(caught.value)
    assert all(torch.equal(v, before[k]) for k, v in se.state_dict().items())  # it stopped before any step


def test_tensors_that_get_no_gradient_are_named_once_without_an_option_already_on(data):
    """With --train-norms the norms train, so the phase goes on, but the blocks still get nothing at
    first: one warning names them, and does not suggest --train-norms."""
    se = fresh()
    with pytest.warns(RetrofitWarning) as caught:
        retrofit.finetune(se, data, epochs=1, train_norms=True, **FAST)
    said = [str(w.message) for w in caught if "got no gradient" in str(w.message)]
    assert len(said) == 1 and said[0].startswith(
        "24 of 44 trainable tensors got no gradient in the first step of phase 1: "
    )
    assert "layer1.0.se (layer1.0.bn2 = 0)" in said[0] and "--train-norms" not in said[0]
    assert "the norm trains, so they can learn once it moves" in said[0]
    assert "--position post or identity" in said[0]


def test_blocks_off_the_zeroed_branch_learn_without_a_word(data):
    """The same random model with the blocks at the post position (off the zeroed branch): every block
    parameter trains, and nothing is said (the reference: the weights before)."""
    se = fresh(position="post")
    before = {k: v.clone() for k, v in se.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RetrofitWarning)
        retrofit.finetune(se, data, epochs=1, restore_best=False, **FAST)
    for b in retrofit.get_info(se).blocks:
        for name, p in se.get_submodule(b.path).named_parameters(prefix=b.path):
            assert not torch.equal(p, before[name]), name


def test_random_weights_are_said_and_recorded(data, tmp_path):
    """add-se says in one line that a model built without --checkpoint or --pretrained has random
    weights, and the file records it (metadata `weights`). finetune says it again; a bare add-se (no
    file, no fine-tune) and a model from a checkpoint say nothing."""
    out = tmp_path / "se.safetensors"
    result = runner.invoke(
        app, ["add-se", "resnet10t", "--num-classes", "3", "--input-size", "3,32,32", "--output", str(out)]
    )
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if line.startswith("note:")]
    assert notes == [
        "note: resnet10t has random weights (no --checkpoint or --pretrained): its sites and costs hold "
        "for any weights, but a fine-tune of it is only a demonstration"
    ]
    assert retrofit.files.header.read_header(out).weights == "random"
    assert retrofit.get_info(retrofit.load(out)).weights == "random"
    result = runner.invoke(app, ["finetune", str(out), "--data", str(data), "-b", "8", "-j", "0"])
    assert "nothing trainable got a gradient" in one_error_line(result)
    assert "note: this model's weights are random (recorded in its file" in result.output
    bare = runner.invoke(app, ["add-se", "resnet10t", "--input-size", "3,32,32"])
    assert bare.exit_code == 0 and "note:" not in bare.output
    plain = tmp_path / "trained.safetensors"
    save_file(randomize(timm.create_model("resnet10t", num_classes=3)).state_dict(), str(plain))
    from_file = tmp_path / "from_file.safetensors"
    result = runner.invoke(
        app, ["add-se", "resnet10t", "--checkpoint", str(plain), "--input-size", "3,32,32", "--output", str(from_file)]
    )
    assert result.exit_code == 0 and "note:" not in result.output
    assert retrofit.files.header.read_header(from_file).weights == "checkpoint"


def test_a_phase_2_fine_tune_records_trained_weights_and_older_files_load(data, tmp_path):
    from retrofit.files.provenance import look_random

    se = fresh(zero_init_last=False)  # nothing dead in phase 2 either: no warning
    update_info(se, weights="random")  # as add-se records it
    with warnings.catch_warnings():
        warnings.simplefilter("error", RetrofitWarning)
        retrofit.finetune(se, data, epochs=1, phase2_epochs=1, output_dir=tmp_path / "run", **FAST)
    assert retrofit.files.header.read_header(tmp_path / "run" / "last.safetensors").weights == "fine-tuned"
    tensors = load_file(str(tmp_path / "run" / "last.safetensors"))
    with safe_open(str(tmp_path / "run" / "last.safetensors"), "pt") as f:
        meta = f.metadata()
    older = {k: v for k, v in meta.items() if k != "weights"}  # as retrofit wrote files before the key
    save_file(tensors, str(tmp_path / "older.safetensors"), metadata=older)
    again = retrofit.load(tmp_path / "older.safetensors")
    assert retrofit.get_info(again).weights == "" and torch.equal(again.fc.weight, se.fc.weight)
    assert not look_random(again) and look_random(timm.create_model("resnet10t"))  # the guess for such files
    save_file(tensors, str(tmp_path / "odd.safetensors"), metadata={**meta, "weights": json.dumps({"x": 1})})
    with pytest.raises(RetrofitError, match="metadata 'weights' is '{\"x\": 1}', not one of random, pretrained"):
        retrofit.load(tmp_path / "odd.safetensors")
