"""Adapters (only the blocks and what changed, on a base named by its hash), model cards, retrofit.bypass
and the trainable-parameters line."""

import copy
import json
import re

import pytest
import timm
import torch
from conftest import randomize
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner

import retrofit
from retrofit import RetrofitError, RetrofitWarning
from retrofit.cli import app
from retrofit.files.header import read_header
from retrofit.files.models import create_model
from support import CLASSES, FAST, SIZE, Net, make_folder, one_error_line

runner = CliRunner()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("data"))


def perturb_blocks(model, seed=1):
    """Blocks that have 'learnt': random values instead of the preserving init's zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in retrofit.get_info(model).blocks:
            for p in model.get_submodule(b.path).parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def adapter_keys(path):
    with safe_open(str(path), "pt") as f:
        return set(f.keys())


def test_resnet50_standard_r16_round_trip(resnet50_random, tmp_path):
    """The acceptance case: a standard r 16 resnet50 adapter is about a tenth of the full file and
    rebuilds, on its base file, bitwise the saved full model; another base is refused in one line."""
    base = tmp_path / "resnet50.safetensors"
    save_file(resnet50_random.state_dict(), str(base))
    se = perturb_blocks(retrofit.add_se(resnet50_random, position="standard", r=16))
    full = retrofit.save(se, tmp_path / "full.safetensors")
    adapter = retrofit.save(se, tmp_path / "adapter.safetensors", adapter=True)
    blocks = {k for k in se.state_dict() if ".se." in k}
    assert adapter_keys(adapter) == blocks  # nothing else changed: the base is all taken from the base
    ratio = adapter.stat().st_size / full.stat().st_size
    assert 0.08 < ratio < 0.11, ratio
    rebuilt = retrofit.load(adapter, base=base)
    assert_same_state(rebuilt.state_dict(), load_file(str(full)))
    assert type(rebuilt) is type(resnet50_random)
    wrong = copy.deepcopy(resnet50_random)
    with torch.no_grad():
        wrong.layer3[0].conv2.weight[0, 0, 0, 0] += 1e-3  # one weight of 25 million
    with pytest.raises(
        RetrofitError,
        match=r"was made on another base: resnet50 \(sha256 \w{12} over 320 tensors\), "
        r"the base given \(resnet50\) has \w{12} over 320; give the base it was "
        r"made on",
    ):
        retrofit.load(adapter, base=wrong)
    with pytest.warns(RetrofitWarning, match="rebuilt on it anyway"):
        forced = retrofit.load(adapter, base=wrong, force=True)
    assert torch.equal(forced.layer3[0].conv2.weight, wrong.layer3[0].conv2.weight)
    with pytest.raises(RetrofitError, match="is an adapter .* give that base"):
        retrofit.load(adapter)


def test_phase2_finetuned_resnet18_round_trip(data, tmp_path):
    """Phase 2 moves the backbone and a new head is made: the adapter carries exactly the tensors that
    differ from the base, and rebuilds on it bitwise the saved full model."""
    base_model = randomize(timm.create_model("resnet18"))
    base = tmp_path / "resnet18.pth"
    torch.save(base_model.state_dict(), base)
    se = retrofit.add_se(create_model("resnet18", checkpoint=base), input_size=(3, SIZE, SIZE), r=8)
    retrofit.finetune(se, data, epochs=1, phase2_epochs=1, augment=False, restore_best=False, **FAST)
    full = retrofit.save(se, tmp_path / "full.safetensors")
    adapter = retrofit.save(se, tmp_path / "adapter.safetensors", adapter=True)
    before = base_model.state_dict()
    changed = {
        k
        for k, v in se.state_dict().items()
        if k not in before or v.shape != before[k].shape or not torch.equal(v, before[k])
    }
    assert adapter_keys(adapter) == changed  # computed here from the base itself, not from the digests
    assert {"fc.weight", "fc.bias", "conv1.weight", "bn1.running_mean"} <= changed  # new head, phase 2
    rebuilt = retrofit.load(adapter, base=base)
    assert_same_state(rebuilt.state_dict(), load_file(str(full)))
    assert rebuilt.num_classes == CLASSES


def test_adapter_of_a_network_not_from_timm(tmp_path):
    net = randomize(Net())
    se = perturb_blocks(retrofit.add_se(net, r=4, input_size=(3, 8, 8)))
    adapter = retrofit.save(se, tmp_path / "net.safetensors", adapter=True)
    rebuilt = retrofit.load(adapter, base=net)
    assert_same_state(rebuilt.state_dict(), se.state_dict())
    assert retrofit.get_info(net) is None  # the base given is not changed
    save_file(net.state_dict(), str(tmp_path / "weights.safetensors"))
    with pytest.raises(RetrofitError, match="not from timm: pass the base network"):
        retrofit.load(adapter, base=tmp_path / "weights.safetensors")


def test_adapter_command_line_and_cards(data, tmp_path):
    """add-se --adapter writes the adapter and its card and says its size against the full model's;
    finetune ADAPTER --base B rebuilds and fine-tunes it, --adapter again gives an adapter on the same
    base; a wrong or missing base is one error line."""
    base = tmp_path / "base.safetensors"
    save_file(randomize(timm.create_model("test_resnet", num_classes=CLASSES)).state_dict(), str(base))
    out = tmp_path / "se.safetensors"
    made = runner.invoke(
        app,
        [
            "add-se",
            "test_resnet",
            "--checkpoint",
            str(base),
            "--r",
            "4",
            "--input-size",
            f"3,{SIZE},{SIZE}",
            "--output",
            str(out),
            "--adapter",
        ],
    )
    assert made.exit_code == 0, made.output
    se = retrofit.load(out, base=base)
    expected = retrofit.trainable_parameters(se)
    assert str(expected) in made.output
    match = re.search(r"saved adapter .*: ([\d.]+) MB, ([\d.]+)% of the full model's ([\d.]+) MB", made.output)
    full = retrofit.save(se, tmp_path / "full.safetensors").stat().st_size
    assert match and float(match.group(2)) == pytest.approx(100 * out.stat().st_size / full, abs=0.2)
    card = (tmp_path / "se.README.md").read_text()
    header = read_header(out)
    for part in (
        "## Base model",
        "test_resnet, weights base.safetensors",
        header.base_sha256,
        "## Recipe",
        "## Overhead",
        f"| total |  | {len(retrofit.get_info(se).blocks)} | {expected.trainable:,} |",
    ):
        assert part in card, part

    tuned = runner.invoke(
        app,
        [
            "finetune",
            str(out),
            "--base",
            str(base),
            "--data",
            str(data),
            "--epochs",
            "1",
            "-b",
            "8",
            "-j",
            "0",
            "--adapter",
            "-o",
            str(tmp_path / "run"),
        ],
    )
    assert tuned.exit_code == 0, tuned.output
    assert f"phase 1, 1 epoch(s): SE blocks train, the rest is frozen ({expected})" in tuned.output
    again = retrofit.load(tmp_path / "run" / "adapter.safetensors", base=base)
    assert_same_state(again.state_dict(), load_file(str(tmp_path / "run" / "best.safetensors")))
    card = (tmp_path / "run" / "adapter.README.md").read_text()
    assert "## Fine-tuning" in card and "retrofitted, step 0" in card and "base weights: base.safetensors" in card

    wrong = tmp_path / "wrong.safetensors"
    save_file(randomize(timm.create_model("test_resnet", num_classes=CLASSES), seed=5).state_dict(), str(wrong))
    line = one_error_line(runner.invoke(app, ["finetune", str(out), "--base", str(wrong), "--data", str(data)]))
    assert "was made on another base: test_resnet, weights base.safetensors" in line and "--force" in line
    line = one_error_line(runner.invoke(app, ["finetune", str(out), "--data", str(data)]))
    assert "is an adapter" in line and "--base FILE" in line
    line = one_error_line(
        runner.invoke(app, ["add-se", "test_resnet", "--output", str(tmp_path / "x.safetensors"), "--adapter"])
    )
    assert "--adapter needs a base others can rebuild" in line


def test_bypass_gives_the_original_network_after_training():
    """Inside retrofit.bypass the model computes what the plain network computes, bitwise, whatever the
    blocks learnt; outside it, the blocks work again (also after an exception inside)."""
    plain = randomize(timm.create_model("resnet18")).eval()
    for position in ("standard", "post"):  # standard: blocks fused with the residual sum
        model = perturb_blocks(retrofit.add_se(plain, position=position, r=8, input_size=(3, 64, 64))).eval()
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            trained = model(x)
            assert not torch.equal(trained, plain(x))
            with retrofit.bypass(model) as same:
                assert same is model
                assert torch.equal(model(x), plain(x))
                assert torch.equal(model(x), retrofit.strip(model)(x))
            assert torch.equal(model(x), trained)
            with pytest.raises(ZeroDivisionError), retrofit.bypass(model):
                1 / 0  # noqa: B018 (it raises inside the context)
            assert torch.equal(model(x), trained)
    with pytest.raises(RetrofitError, match="nothing to bypass"), retrofit.bypass(plain):
        pass


def test_trainable_parameters_against_timm_and_the_fine_tune(data):
    """The count against an independent one (timm's seresnet50 minus resnet50 for the timm recipe), the
    classifier when a head trains, and what phase 1 of a fine-tune really leaves trainable."""
    with torch.device("meta"):
        se = retrofit.add_se(timm.create_model("resnet50"), recipe="timm")
        seresnet = sum(p.numel() for p in timm.create_model("seresnet50").parameters())
        plain = sum(p.numel() for p in timm.create_model("resnet50").parameters())
    count = retrofit.trainable_parameters(se)
    assert count == (seresnet - plain, seresnet)
    assert (
        str(count) == f"trainable parameters: {seresnet - plain:,} || all: {seresnet:,} || "
        f"{100 * (seresnet - plain) / seresnet:.3g}%"
    )
    assert retrofit.trainable_parameters(se, head=True).trainable == seresnet - plain + 2048 * 1000 + 1000
    result = json.loads(runner.invoke(app, ["add-se", "resnet50", "--recipe", "timm", "--json", "-"]).stdout)
    assert result["trainable_parameters"] == {"trainable": seresnet - plain, "total": seresnet}

    tuned = retrofit.add_se(randomize(timm.create_model("test_resnet", num_classes=5)), r=4, input_size=(3, SIZE, SIZE))
    retrofit.finetune(tuned, data, epochs=1, **FAST)  # 3 classes in the data: a new head trains in phase 1
    really = sum(p.numel() for p in tuned.parameters() if p.requires_grad)
    assert retrofit.trainable_parameters(tuned, head=True).trainable == really
    with pytest.raises(RetrofitError, match="add_se"):
        retrofit.trainable_parameters(nn.Linear(2, 2))
