"""`retrofit check`: a fixed subset of timm families, graceful degradation, layouts, bad input.

Models are the smallest variants (some scaled down further through timm's own constructor
arguments) at small inputs, so the whole file runs in about a minute on two CPU cores.
"""

import json

import pytest
import timm
import torch
from conftest import ChannelsLast, Residual, randomize
from torch import nn
from typer.testing import CliRunner

import retrofit
from retrofit.blocks.se_layout import ChannelsLastSqueezeExcite
from retrofit.cli import app
from retrofit.surgery.sites import scan
from retrofit.sweep.check import check_model, check_models, se_params, smallest_per_family, summarize


def timm_model(name, **kwargs):
    return timm.create_model(name, num_classes=10, **kwargs)


def uninitialised(name):
    """Built on meta and given empty memory: skips timm's init of tens of millions of parameters,
    which the check overwrites anyway (it randomises every parameter and norm statistic; these
    models have no other buffers)."""
    with torch.device("meta"):
        model = timm_model(name)
    assert all(isinstance(m, nn.BatchNorm2d) for m in model.modules() if list(m.buffers(recurse=False)))
    return model.to_empty(device="cpu")


def one_of_each(name):
    """An Inception net with one module of each kind (the repeats cut): every kind of merge the
    family has, at a fraction of the compute."""
    model = uninitialised(name)
    if name == "inception_v4":  # features: stem, Mixed3a/4a/5a, 4 InceptionA, ReductionA, 7 B, ReductionB, 3 C
        seen, kept = set(), []
        for m in model.features:
            if type(m).__name__ not in seen or not type(m).__name__.startswith("Inception"):
                kept.append(m)
            seen.add(type(m).__name__)
        model.features = nn.Sequential(*kept)
    else:  # inception_resnet_v2: 10 Block35, 20 Block17, 9 Block8 units in three Sequentials
        model.repeat, model.repeat_1, model.repeat_2 = model.repeat[:1], model.repeat_1[:1], model.repeat_2[:1]
    return model


def vgg_style():  # plain convolutions: no merge anywhere
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


# family -> (model, input side, status, expected sites by kind); sites counted by hand from each
# architecture's definition (blocks per stage, Inception modules), not by the pass.
FAMILIES = {
    "resnet": (lambda: timm_model("resnet10t"), 32, "ok", {"residual": 4, "conv3x3": 8}),  # BasicBlocks
    "resnext": (lambda: timm_model("resnext50_32x4d", layers=(1, 1, 1, 1)), 32, "ok", {"residual": 4, "conv3x3": 4}),
    "regnet": (lambda: timm_model("regnetx_002"), 32, "ok", {"residual": 13, "conv3x3": 13}),  # depths 1,1,4,7
    "efficientnet": (lambda: timm_model("tinynet_e"), 32, "ok", None),
    "mobilenetv3": (lambda: timm_model("mobilenetv3_small_050"), 32, "ok", None),
    "convnext": (lambda: timm_model("convnext_atto", depths=(1, 1, 1, 1)), 32, "ok", {"residual": 4}),
    "densenet": (lambda: timm_model("densenet121", block_config=(1, 1, 1, 1)), 64, "no sites", {}),
    "inception_v3": (lambda: uninitialised("inception_v3"), 75, "ok", {"inception": 11}),
    # Mixed3a, Mixed4a, Mixed5a, InceptionA, ReductionA, InceptionB, ReductionB, InceptionC
    "inception_v4": (lambda: one_of_each("inception_v4"), 75, "ok", {"inception": 8}),
    # Block35, Block17, Block8 and the final Block8 (residual); mixed_5b/6a/7a (Inception); Block35 has
    # three 3x3 convs, Block17 and Block8 use 1x7/7x1 and 1x3/3x1
    "inception_resnet_v2": (
        lambda: one_of_each("inception_resnet_v2"),
        75,
        "ok",
        {"residual": 4, "inception": 3, "conv3x3": 3},
    ),
    "dpn": (lambda: timm_model("dpn48b"), 32, "ok", None),
    # scale 8: seven 3x3 convs per unit; ResNeSt: one split-attention 3x3 conv per unit
    "res2net": (lambda: timm_model("res2net50_14w_8s", layers=(1, 1, 1, 1)), 32, "ok", {"residual": 4, "conv3x3": 28}),
    "resnest": (lambda: timm_model("resnest14d"), 32, "ok", {"residual": 4, "conv3x3": 4}),
    "vgg": (vgg_style, 64, "no sites", {}),
    "vit": (lambda: timm_model("vit_tiny_patch16_224", img_size=64, depth=2), 64, "ok", {"residual": 4}),
    "swin": (
        lambda: timm_model("swin_tiny_patch4_window7_224", img_size=64, window_size=4, depths=(1, 1, 1, 1)),
        64,
        "ok",
        {"residual": 8},
    ),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family(family):
    build, side, status, sites = FAMILIES[family]
    result = check_model(build(), input_size=(3, side, side), name=family, inplace=True)
    assert result.status == status, result.reason
    if sites is not None:
        assert {k: n for k, n in result.sites.items() if n} == sites
    if status == "ok":
        assert result.blocks["standard"] == result.sites["residual"] + result.sites["inception"]
        assert all(d <= 1e-5 for d in result.max_diff.values())
    else:
        assert "no residual or Inception merge" in result.reason and not result.blocks


def test_resnet10t_params_by_hand():
    # one BasicBlock per stage on 64..512 channels, r 16: 2*C*C/16 + C/16 + C each
    expected = sum(2 * c * (c // 16) + c // 16 + c for c in (64, 128, 256, 512))
    result = check_model(timm_model("resnet10t"), input_size=(3, 32, 32), inplace=True)
    assert result.params_added["standard"] == expected == 44540
    assert se_params(64) == 580 and se_params(8) == 8 * 2 * 1 + 1 + 8  # width rounds, never below 1


class Gate(nn.Module):
    """Data-dependent control flow: fx cannot trace it."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        if y.mean() > 0:
            return x + y
        return x - y


def untraceable_net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Residual(8), Gate(8), Residual(8))


def test_untraceable_block_is_skipped_and_the_rest_retrofitted():
    net = randomize(untraceable_net())
    found = scan(net, (3, 16, 16))
    assert [s.module for s in found.sites if s.kind == "residual"] == ["1", "3"]
    assert [s.where for s in found.skipped] == ["2"] and "cannot trace" in found.skipped[0].reason
    se = retrofit.add_se(net, r=4, input_size=(3, 16, 16)).eval()
    assert [b.path for b in retrofit.get_info(se).blocks] == ["1.se", "3.se"]
    assert any(s.where == "2" for s in retrofit.get_info(se).skipped)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(se(x), net(x)) and torch.equal(se(-x), net(-x))  # both sides of the branch
    assert check_model(untraceable_net(), input_size=(3, 16, 16)).status == "ok"


class Tokens(nn.Module):
    """A ViT-style block on (B, 1 + H*W, C): one class token in front of the patch grid."""

    def __init__(self, c):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(c), nn.Linear(c, c)

    def forward(self, x):
        return x + self.fc(self.norm(x))


class TinyViT(nn.Module):
    num_prefix_tokens = 1

    def __init__(self, c=16):
        super().__init__()
        self.patch = nn.Conv2d(3, c, 4, stride=4)
        self.cls = nn.Parameter(torch.zeros(1, 1, c))
        self.blocks = nn.Sequential(Tokens(c), Tokens(c))

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        return self.blocks(x)[:, 0]


def test_token_sites_squeeze_the_patch_grid_only():
    net = randomize(TinyViT())
    sites = [s for s in scan(net, (3, 16, 16)).sites]
    assert [(s.layout, s.prefix, s.size, s.stage, s.channels) for s in sites] == [("tokens", 1, (4, 4), 2, 16)] * 2
    se = retrofit.add_se(net, r=4, input_size=(3, 16, 16)).eval()
    block = se.blocks[0].se
    assert isinstance(block, ChannelsLastSqueezeExcite)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(se(x), net(x))
    # the squeeze reads the 16 grid tokens, not the class token; every token is scaled
    block.reset_parameters("paper")
    t = torch.randn(2, 17, 16)
    z = t[:, 1:].mean(1)
    gate = torch.sigmoid(
        nn.functional.linear(
            torch.relu(nn.functional.linear(z, block.fc1.weight.flatten(1), block.fc1.bias)),
            block.fc2.weight.flatten(1),
            block.fc2.bias,
        )
    )
    torch.testing.assert_close(block(t), t * gate[:, None, :])
    t2 = t.clone()
    t2[:, 0] += 100.0  # the class token does not move the gate
    torch.testing.assert_close(block(t2)[:, 1:], block(t)[:, 1:])


def test_channels_last_sites():
    net = randomize(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), ChannelsLast()))
    (site,) = scan(net, (3, 16, 16)).sites
    assert (site.layout, site.channels, site.size) == ("nhwc", 8, (16, 16))
    se = retrofit.add_se(net, r=4, input_size=(3, 16, 16)).eval()
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(se(x), net(x))
    block = se[1].se
    block.reset_parameters("paper")
    y = torch.randn(2, 5, 5, 8)
    ref = block.__class__.__mro__[1].forward(block, y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # NCHW SE
    torch.testing.assert_close(block(y), ref)
    assert sum(p.numel() for p in block.parameters()) == se_params(8, 4)


class Broken(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom")


def test_sweep_reports_bad_models_instead_of_crashing():
    results = check_models([("resnet", "no_such_model")])
    assert (results[0].family, results[0].status) == ("resnet", "fail")
    assert "unknown model 'no_such_model'" in results[0].reason
    broken = check_model(nn.Sequential(nn.Conv2d(3, 4, 1), Broken()), input_size=(3, 16, 16))
    assert broken.status == "fail" and "boom" in broken.reason
    plain = check_model(vgg_style(), input_size=(3, 16, 16))
    good = check_model(untraceable_net(), input_size=(3, 16, 16))
    assert summarize(results + [broken, plain, good]) == {
        "models": 4,
        "ok": 1,
        "no sites": 1,
        "unsupported": 0,
        "fail": 2,
        "success_rate": 1 / 3,
    }


def test_smallest_per_family_counts_parameters():
    picked = dict(smallest_per_family(only=["resnest", "vgg"], cache=False))
    assert picked == {"resnest": "resnest14d", "vgg": "vgg11"}  # 10.6 M (vs 17 M..), 133 M (vs 139 M..)


def test_cli(tmp_path):
    out = tmp_path / "check.json"
    result = CliRunner().invoke(app, ["check", "resnet10t", "no_such_model", "--json", str(out)])
    assert result.exit_code == 1, result.output
    assert "resnet10t" in result.output and "unknown model 'no_such_model'" in result.output
    assert "1 ok" in result.output and "1 fail" in result.output
    data = json.loads(out.read_text())
    assert [r["status"] for r in data["results"]] == ["ok", "fail"]
    assert data["summary"]["models"] == 2
    usage = CliRunner().invoke(app, ["check"])
    assert usage.exit_code == 2 and "error:" in usage.output and "--all-families" in usage.output


def test_a_model_that_resizes_its_input_is_checked_at_a_size_its_tokens_fit():
    """CrossViT resizes any input to its own; at 64x64 its 197-token sums fit no patch grid of the
    input, so the sweep must go on to a larger size instead of calling the model unsupported."""
    result = check_model("crossvit_tiny_240")
    assert result.status == "ok", result.reason
    # depth [[1, 4, 0]] * 3: 3 multi-scale blocks of 1 + 4 transformer blocks, 2 residual sums each
    assert result.input_size != (3, 64, 64) and result.sites["residual"] == 3 * (1 + 4) * 2
