"""Sites the user names (`at:`): a block on the output of any module, for models with no merge."""

import json

import pytest
import timm
import torch
from conftest import randomize
from torch import nn
from typer.testing import CliRunner

import retrofit
from retrofit.blocks.se_layout import ChannelsLastSqueezeExcite
from retrofit.cli import app
from retrofit.surgery.named import path_matches

runner = CliRunner()
X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(11))


def closed_form(c, r=16):
    """The paper's block with biases: fc1 C x w (+ w), fc2 w x C (+ C); w = C / r rounded, at least 1."""
    w = max(1, int(c / r + 0.5))
    return 2 * c * w + w + c, 2 * c * w  # parameters, multiply-adds (two 1x1 convs on the pooled vector)


def test_globs_match_name_by_name():
    assert path_matches("features.denseblock1", "features.denseblock*")
    assert not path_matches("features.denseblock1.denselayer1", "features.denseblock*")  # not the layers inside
    assert path_matches("features.denseblock1.denselayer1", "features.**")
    assert path_matches("stages.0.1", "stages.*.*") and not path_matches("stages.0", "stages.*.*")


def test_densenet121_blocks_and_transitions(tmp_path):
    model = randomize(timm.create_model("densenet121"))
    se = retrofit.add_se(model, at=["features.denseblock*", "features.transition*"], input_size=(3, 64, 64))
    names = [f"{kind}{i}" for i in range(1, 5) for kind in ("denseblock", "transition")][:-1]
    assert [b.path for b in retrofit.get_info(se).blocks] == [f"features.se_{n}" for n in names]
    channels = [256, 128, 512, 256, 1024, 512, 1024]  # densenet121's growth: 64 + 6 x 32 = 256, halved...
    assert [b.channels for b in retrofit.get_info(se).blocks] == channels
    assert [b.stride for b in retrofit.get_info(se).blocks] == [4, 8, 8, 16, 16, 32, 32]
    with torch.no_grad():
        reference = model(X)
        assert torch.equal(se.eval()(X), reference)
    report = retrofit.measure_overhead(model, se, input_size=(3, 64, 64))
    assert report.added_params == sum(closed_form(c)[0] for c in channels)
    assert [b.macs for b in report.blocks] == [closed_form(c)[1] for c in channels]
    path = retrofit.save(se, tmp_path / "densenet_at.safetensors")
    again = retrofit.load(path).eval()  # the recipe's `at` is stored, the same blocks come back
    assert retrofit.get_info(again).recipe.at == ("features.denseblock*", "features.transition*")
    with torch.no_grad():
        assert torch.equal(again(X), reference)
    plain = retrofit.strip(se).eval()
    assert list(plain.state_dict()) == list(model.state_dict())
    with torch.no_grad():
        assert torch.equal(plain(X), reference)
    se.train()(X).square().mean().backward()  # last: a training step moves the norm statistics
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0
        for b in retrofit.get_info(se).blocks
        for p in se.get_submodule(b.path).parameters()
    )


VGG_STAGES = ["features.1", "features.4", "features.9", "features.14", "features.19"]  # each stage's last ReLU


def test_vgg11_stage_ends_preserve():
    model = randomize(timm.create_model("vgg11"))
    with torch.no_grad():
        reference = model(X)
    se = retrofit.add_se(model, at=VGG_STAGES, input_size=(3, 64, 64), inplace=True).eval()
    assert [b.path for b in retrofit.get_info(se).blocks] == [f"features.se_{p[9:]}" for p in VGG_STAGES]
    with torch.no_grad():
        assert torch.equal(se(X), reference)


def test_vgg11_cli_counts_the_closed_form():
    result = runner.invoke(
        app, ["add-se", "vgg11", "--input-size", "3,64,64", "--at", ",".join(VGG_STAGES), "--json", "-"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    channels = [64, 128, 256, 512, 512]
    assert [(b["channels"], b["stride"], b["site"], b["position"]) for b in data["blocks"]] == [
        (c, s, "module", "at") for c, s in zip(channels, (1, 2, 4, 8, 16))
    ]
    assert [(b["params"], b["macs"]) for b in data["blocks"]] == [closed_form(c) for c in channels]
    assert data["added"]["params"] == sum(closed_form(c)[0] for c in channels)
    assert data["recipe"]["at"] == VGG_STAGES and data["sites"]["counts"]["module"] == 5


@pytest.mark.parametrize(
    "args, message",
    [
        (["--at", "features.x"], "error: at: 'features.x' matches no module of vgg11; did you mean features."),
        (["--at", "head.fc"], "error: at: head.fc (Linear) outputs a (1, 1000) tensor, not a 4-d feature map"),
        (["--at", "features.1", "--kinds", "residual"], "error: recipe fields 'kinds', 'at'"),
        (["--at", ","], "error: recipe field 'at': expected a list of module-path globs"),
    ],
)
def test_bad_at_is_one_error_line(args, message):
    result = runner.invoke(app, ["add-se", "vgg11", "--input-size", "3,64,64", *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr


def test_nfnet_blocks_as_a_whole_and_vit_tokens():
    """NF-Net blocks are timm notrace leaves (no site inside); a ViT block's output is a token sequence."""
    nfnet = randomize(timm.create_model("test_nfnet"))
    se = retrofit.add_se(nfnet, at=["stages.*.*"], input_size=(3, 64, 64)).eval()
    assert [(b.path, b.stage) for b in retrofit.get_info(se).blocks] == [(f"stages.{i}.se_0", i + 2) for i in range(4)]
    with torch.no_grad():
        assert torch.equal(se(X), nfnet(X))
    vit = randomize(timm.create_model("test_vit"))
    se = retrofit.add_se(vit, at=["blocks.*"])
    blocks = [se.get_submodule(b.path) for b in retrofit.get_info(se).blocks]
    assert len(blocks) == len(vit.blocks) and all(
        isinstance(b, ChannelsLastSqueezeExcite) and b.prefix == 1 for b in blocks
    )
    x = torch.randn(2, *vit.pretrained_cfg["input_size"])
    with torch.no_grad():
        assert torch.equal(se.eval()(x), vit(x))


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.other = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.conv(self.conv(x))


def test_at_with_discovered_kinds_and_bad_modules():
    model = randomize(timm.create_model("resnet18"))
    se = retrofit.add_se(model, at=["layer2"], kinds=["residual", "module"], input_size=(3, 64, 64)).eval()
    assert [b.path for b in retrofit.get_info(se).blocks][-3:] == ["layer4.0.se", "layer4.1.se", "se_layer2"]
    with torch.no_grad():
        assert torch.equal(se(X), model(X))
    with pytest.raises(retrofit.RetrofitError, match=r"at: conv \(Conv2d\) is called 2 times"):
        retrofit.add_se(Twice(), at=["conv"], input_size=(3, 8, 8))
    with pytest.raises(retrofit.RetrofitError, match=r"at: other \(Conv2d\) is not called"):
        retrofit.add_se(Twice(), at=["other"], input_size=(3, 8, 8))
