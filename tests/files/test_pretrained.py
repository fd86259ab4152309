"""The artifact folder in the Hub's shape: save_pretrained / from_pretrained round-trip bitwise (timm,
torchvision, a user's own module; full and adapter), the card's YAML block read by huggingface_hub's own
parser, the folder written so a kill never leaves a config next to weights it does not describe, and the
command line's --output DIR (issue 23, item 1)."""

import json

import pytest
import timm
import torch
import torchvision
from conftest import randomize
from huggingface_hub import ModelCard
from typer.testing import CliRunner

import retrofit
from retrofit import RetrofitError
from retrofit.cli import app
from retrofit.files import pretrained as pretrained_module
from support import CLASSES, SIZE, Net, one_error_line, se_model

runner = CliRunner()


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa)


def trained(model):
    """The model with every weight moved off its initial value, the blocks included (as after a phase 2)."""
    return randomize(model, seed=7).eval()


CASES = {
    "timm": lambda: (trained(se_model()), None, (3, SIZE, SIZE)),
    "torchvision": lambda: (
        trained(retrofit.add_se(torchvision.models.resnet18(num_classes=5), r=8, input_size=(3, 64, 64))),
        torchvision.models.resnet18(num_classes=5),
        (3, 64, 64),
    ),
    "own module": lambda: (trained(retrofit.add_se(Net(), r=4, input_size=(3, 16, 16))), Net(), (3, 16, 16)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_from_pretrained_of_save_pretrained_is_the_model_bitwise(case, tmp_path):
    model, plain, size = CASES[case]()
    x = torch.randn(2, *size, generator=torch.Generator().manual_seed(0))
    folder = retrofit.save_pretrained(model, tmp_path / "full")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    again = retrofit.from_pretrained(folder, base=plain).eval()
    assert type(again) is type(model) and same_state(again, model)
    assert torch.equal(again(x), model(x))
    assert retrofit.get_info(again).recipe == retrofit.get_info(model).recipe
    # an adapter on a base holding the model's weights outside its blocks: the blocks, the rest by hash
    base = retrofit.strip(model)
    adapter = retrofit.save_pretrained(model, tmp_path / "adapter", adapter=True, base=base)
    assert sorted(p.name for p in adapter.iterdir()) == ["README.md", "adapter_model.safetensors", "config.json"]
    rebuilt = retrofit.from_pretrained(adapter, base=base).eval()
    assert same_state(rebuilt, model) and torch.equal(rebuilt(x), model(x))
    assert retrofit.load(adapter, base=base).state_dict().keys() == model.state_dict().keys()  # load reads folders


def test_an_adapter_is_refused_on_another_base(tmp_path):
    base = randomize(timm.create_model("test_resnet", num_classes=CLASSES), seed=1)
    model = retrofit.add_se(base, r=4, input_size=(3, SIZE, SIZE))
    folder = retrofit.save_pretrained(model, tmp_path / "ad", adapter=True)
    other = randomize(timm.create_model("test_resnet", num_classes=CLASSES), seed=2)
    with pytest.raises(RetrofitError, match="was made on another base"):
        retrofit.from_pretrained(folder, base=other)
    with pytest.raises(RetrofitError, match="is an adapter .* give that base"):
        retrofit.from_pretrained(folder)
    assert same_state(retrofit.from_pretrained(folder, base=base), model)


def test_the_card_carries_the_hub_metadata_huggingface_hub_reads(tmp_path):
    model = se_model()
    retrofit.surgery.info.update_info(
        model, weights="pretrained", base_model="timm/test_resnet.r160_in1k", license="apache-2.0"
    )
    folder = retrofit.save_pretrained(model, tmp_path / "se", adapter=True)
    card = ModelCard.load(folder / "README.md")  # a local path: no network
    data = card.data.to_dict()
    assert data["library_name"] == "retrofit" and data["base_model"] == "timm/test_resnet.r160_in1k"
    assert data["license"] == "apache-2.0" and data["pipeline_tag"] == "image-classification"
    assert data["tags"] == ["retrofit", "squeeze-and-excitation", "image-classification", "timm", "adapter"]
    assert 'retrofit.from_pretrained("se", base="BASE_WEIGHTS")' in card.text
    config = json.loads((folder / "config.json").read_text())
    assert config["kind"] == "adapter" and config["retrofit_version"] == retrofit.__version__
    assert set(config["base"]) == {"name", "sha256", "tensors"} and config["weights"] == "pretrained"
    again = retrofit.from_pretrained(folder, base=retrofit.strip(model))
    assert retrofit.get_info(again).base_model == "timm/test_resnet.r160_in1k"  # carried to the next save
    plain_card = ModelCard.load(retrofit.save_pretrained(se_model(), tmp_path / "plain") / "README.md").data.to_dict()
    assert "base_model" not in plain_card and "license" not in plain_card  # not known: not said


def test_old_single_files_and_folders_load_and_the_old_name_warns(tmp_path):
    model = se_model().eval()
    file = retrofit.save(model, tmp_path / "se.safetensors")
    assert same_state(retrofit.load(file), model)
    net = retrofit.add_se(Net(), r=4, input_size=(3, 16, 16))
    own = retrofit.save(net, tmp_path / "net.safetensors")
    with pytest.warns(DeprecationWarning, match="pass base=net"):
        again = retrofit.load(own, model=Net())
    assert same_state(again, net) and same_state(retrofit.load(own, base=Net()), net)
    with pytest.raises(RetrofitError, match="is a full model: it holds every weight"):
        retrofit.load(file, base=file)


def test_a_folder_written_again_commits_with_its_config(tmp_path, monkeypatch):
    """config.json is the folder's commit: a write that fails after the weights leaves no config (the folder
    is refused as incomplete, never read with another model's config), and a full folder saved again as an
    adapter loses its model.safetensors."""
    folder = tmp_path / "se"
    retrofit.save_pretrained(se_model(), folder)

    def fail(*args, **kwargs):
        raise RetrofitError("disk full")

    monkeypatch.setattr(pretrained_module, "write_text", fail)
    with pytest.raises(RetrofitError, match="disk full"):
        retrofit.save_pretrained(se_model(position="post"), folder)
    with pytest.raises(RetrofitError, match="has no config.json: .* whose writing was interrupted"):
        retrofit.from_pretrained(folder)
    monkeypatch.undo()
    model = se_model()
    retrofit.save_pretrained(model, folder, adapter=True)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter_model.safetensors", "config.json"]


def test_add_se_output_dir_writes_the_folder_and_finetune_reads_it(tmp_path):
    from support import make_folder

    ckpt = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file

    save_file(randomize(timm.create_model("test_resnet", num_classes=CLASSES)).state_dict(), str(ckpt))
    out = tmp_path / "se"
    done = runner.invoke(
        app,
        [
            "add-se",
            "test_resnet",
            "--checkpoint",
            str(ckpt),
            "--r",
            "4",
            "--position",
            "post",
            "--input-size",
            f"3,{SIZE},{SIZE}",
            "--output",
            str(out),
        ],
    )
    assert done.exit_code == 0, done.output
    assert f"saved {out} (load with retrofit.from_pretrained); card: {out / 'README.md'}" in done.output
    assert json.loads((out / "config.json").read_text())["weights"] == "checkpoint"
    data = make_folder(tmp_path / "data")
    tuned = runner.invoke(
        app, ["finetune", str(out), "--data", str(data), "-b", "8", "-j", "0", "--output-dir", str(tmp_path / "run")]
    )
    assert tuned.exit_code == 0, tuned.output
    adapter = runner.invoke(
        app,
        [
            "add-se",
            "test_resnet",
            "--checkpoint",
            str(ckpt),
            "--r",
            "4",
            "--input-size",
            f"3,{SIZE},{SIZE}",
            "--output",
            str(tmp_path / "ad"),
            "--adapter",
        ],
    )
    assert adapter.exit_code == 0, adapter.output
    assert f"`retrofit finetune ad/ --base ...`); card: {tmp_path / 'ad' / 'README.md'}" in adapter.output
    into = runner.invoke(app, ["add-se", "test_resnet", "--checkpoint", str(ckpt), "--output", str(tmp_path)])
    assert "input checkpoint" not in into.output  # plain.safetensors is not among the folder's files
    same = runner.invoke(
        app,
        [
            "add-se",
            "test_resnet",
            "--checkpoint",
            str(tmp_path / "x" / "model.safetensors"),
            "--output",
            str(tmp_path / "x"),
        ],
    )
    assert "error:" in one_error_line(same)
