"""Saved retrofitted models: round trips, non-timm models, damaged files, atomic writes."""

import os

import pytest
import timm
import torch
from conftest import randomize
from torch import nn

import retrofit
from retrofit import RetrofitError
from support import Net


def test_custom_model_needs_its_architecture(tmp_path):
    se = retrofit.add_se(randomize(Net()), r=4, init="paper", input_size=(3, 8, 8))
    path = retrofit.save(se, tmp_path / "net.safetensors")
    with pytest.raises(RetrofitError, match="not from timm: pass the plain network"):
        retrofit.load(path)
    again = retrofit.load(path, base=Net())
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(again(x), se(x))


def test_save_requires_a_retrofitted_model(tmp_path):
    with pytest.raises(RetrofitError, match="add_se first"):
        retrofit.save(Net(), tmp_path / "x.safetensors")


def test_damaged_and_foreign_files(tmp_path):
    se = retrofit.add_se(timm.create_model("resnet18"), input_size=(3, 32, 32))
    good = retrofit.save(se, tmp_path / "good.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(RetrofitError, match="cannot read"):
        retrofit.load(truncated)
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(RetrofitError, match="not a retrofit file"):
        retrofit.load(plain)
    with pytest.raises(RetrofitError, match="not found"):
        retrofit.load(tmp_path / "none.safetensors")


def test_weights_that_do_not_fit(tmp_path):
    se = retrofit.add_se(randomize(Net()), r=4, input_size=(3, 8, 8))
    path = retrofit.save(se, tmp_path / "net.safetensors")
    other = Net()
    other.conv = nn.Conv2d(16, 16, 5, padding=2)
    with pytest.raises(RetrofitError, match="do not fit the rebuilt model: .*shape mismatches"):
        retrofit.load(path, base=other)


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    se = retrofit.add_se(randomize(Net()), r=4, input_size=(3, 8, 8))
    target = tmp_path / "net.safetensors"
    target.write_bytes(b"previous")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(
        RetrofitError, match="No space left on device; the previous net.safetensors is kept; free space"
    ):
        retrofit.save(se, target)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["net.safetensors"]


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_own_checkpoint_keeps_its_head_unless_another_size_is_asked(tmp_path, suffix):
    """timm drops a file's head when num_classes differs from its config's 1000; a user's own 3-class
    checkpoint must come back whole, with or without --num-classes 3, and --num-classes 5 gets a new head."""
    from safetensors.torch import save_file

    from retrofit.files.models import create_model

    saved = randomize(timm.create_model("resnet10t", num_classes=3)).state_dict()
    path = tmp_path / f"mine{suffix}"
    save_file(saved, str(path)) if suffix == ".safetensors" else torch.save(saved, path)
    for kwargs in ({}, {"num_classes": 3}):
        model = create_model("resnet10t", checkpoint=path, **kwargs)
        assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    other = create_model("resnet10t", checkpoint=path, num_classes=5)
    assert other.fc.out_features == 5
    assert all(torch.equal(v, saved[k]) for k, v in other.state_dict().items() if not k.startswith("fc."))
