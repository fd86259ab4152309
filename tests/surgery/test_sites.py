from collections import Counter

import pytest
import timm
import torch
import torchvision
from conftest import ChannelsLast
from timm.models.rexnet import LinearBottleneck
from torch import fx, nn

from retrofit import find_sites
from retrofit.surgery.sites import scan


def kinds(sites):
    return Counter(s.kind for s in sites)


def test_resnet50_sites():
    sites = find_sites(timm.create_model("resnet50"))
    residual = [s for s in sites if s.kind == "residual"]
    assert kinds(sites) == {"residual": 16, "conv3x3": 16}
    assert Counter(s.detail for s in residual) == {"projection": 4, "identity": 12}
    # ResNet-50: 3, 4, 6, 3 blocks at output strides 4..32 = stages 2..5, widths 256..2048
    assert Counter(s.stage for s in residual) == {2: 3, 3: 4, 4: 6, 5: 3}
    assert {s.stage: s.channels for s in residual} == {2: 256, 3: 512, 4: 1024, 5: 2048}
    assert {s.stage: s.stride for s in residual} == {2: 4, 3: 8, 4: 16, 5: 32}
    assert [s.module for s in residual][:4] == ["layer1.0", "layer1.1", "layer1.2", "layer2.0"]
    convs = [s for s in sites if s.kind == "conv3x3"]
    assert {s.detail for s in convs} == {f"layer{i}.{j}.conv2" for i, n in enumerate((3, 4, 6, 3), 1) for j in range(n)}


def test_stage_rule_does_not_depend_on_input_size():
    big = find_sites(timm.create_model("resnet50"), input_size=(3, 224, 224))
    small = find_sites(timm.create_model("resnet50"), input_size=(3, 64, 64))
    assert [s.stage for s in big] == [s.stage for s in small]


def test_basicblock_resnet18_has_two_3x3_convs_per_branch():
    sites = find_sites(timm.create_model("resnet18"), input_size=(3, 64, 64))
    assert kinds(sites) == {"residual": 8, "conv3x3": 16}


def test_inception_v3_one_site_per_inception_module():
    model = timm.create_model("inception_v3")
    found = scan(model, (3, 299, 299))
    modules = {n for n, m in model.named_modules() if n and type(m).__name__.startswith("Inception")}
    assert len(modules) == 11
    assert {s.module for s in found.sites if s.kind == "inception"} == modules
    assert kinds(found.sites) == {"inception": 11}
    assert sum("nested" in s.reason for s in found.skipped) == 4  # 7b, 7c: two inner concats each


def test_inception_v4_one_site_per_inception_module():
    model = timm.create_model("inception_v4")
    classes = {"Mixed3a", "Mixed4a", "Mixed5a", "InceptionA", "ReductionA", "InceptionB", "ReductionB", "InceptionC"}
    modules = {n for n, m in model.named_modules() if type(m).__name__ in classes}
    sites = find_sites(model)
    assert {s.module for s in sites if s.kind == "inception"} == modules and len(modules) == 19


def test_inception_resnet_v2_units_are_residual():
    model = timm.create_model("inception_resnet_v2")
    units = {n for n, m in model.named_modules() if type(m).__name__ in ("Block35", "Block17", "Block8")}
    found = scan(model, (3, 299, 299))
    assert {s.module for s in found.sites if s.kind == "residual"} == units and len(units) == 40
    assert {s.module for s in found.sites if s.kind == "inception"} == {"mixed_5b", "mixed_6a", "mixed_7a"}
    assert all(s.detail == "identity" for s in found.sites if s.kind == "residual")
    assert sum("residual branch" in s.reason for s in found.skipped) == 40  # their inner concats


def test_densenet_concatenations_are_not_inception_merges():
    found = scan(timm.create_model("densenet121"), (3, 64, 64))
    assert found.sites == []
    assert any("DenseNet" in s.reason for s in found.skipped)


class Residual(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))


class TwoBranch(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.a, self.b = nn.Conv2d(c, 4, 1), nn.Sequential(nn.Conv2d(c, 4, 1), nn.Conv2d(4, 6, 3, padding=1))

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x), nn.functional.max_pool2d(x, 3, 1, 1)], dim=1)


class Dense(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.f = nn.Conv2d(c, 4, 3, padding=1)

    def forward(self, x):
        return torch.cat([x, self.f(x)], 1)


class Twin(nn.Module):  # a sum of two equally deep paths: no shortcut
    def __init__(self, c=8):
        super().__init__()
        self.a, self.b = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        return self.a(x) + self.b(x)


@pytest.mark.parametrize(
    "net, expected",
    [(Residual(), {"residual": 1, "conv3x3": 2}), (TwoBranch(), {"inception": 1}), (Dense(), {}), (Twin(), {})],
)
def test_custom_modules(net, expected):
    sites = find_sites(nn.Sequential(nn.Conv2d(3, 8, 3), net), input_size=(3, 16, 16))
    assert kinds(sites) == expected


def test_graph_module_and_torchvision_style_code():
    gm = fx.symbolic_trace(Residual())
    assert kinds(find_sites(gm, input_size=(8, 16, 16))) == {"residual": 1, "conv3x3": 2}
    tv = torchvision.models.resnet18()  # one ReLU module shared by every activation of a block
    sites = find_sites(tv, input_size=(3, 64, 64))
    assert kinds(sites) == {"residual": 8, "conv3x3": 16}
    assert sites[1].module == "layer1.0"


def test_res2net_hierarchical_sums_belong_to_their_bottleneck():
    found = scan(timm.create_model("res2net50_14w_8s"), (3, 64, 64))
    assert found.count("residual") == 16  # one per Bottle2neck, like ResNet-50
    assert sum("channel split" in s.reason for s in found.skipped) == 72  # 12 blocks x 6 inner sums


class PoolMixer(nn.Module):  # PoolFormer: a parameter-free branch on an identity shortcut
    def __init__(self):
        super().__init__()
        self.pool = nn.AvgPool2d(3, 1, 1)

    def forward(self, x):
        return x + (self.pool(x) - x)


def test_layouts_and_parameter_free_branches():
    found = scan(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), ChannelsLast()), (3, 16, 16))
    assert [(s.kind, s.layout, s.channels, s.size) for s in found.sites] == [("residual", "nhwc", 8, (16, 16))]
    sites = find_sites(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), PoolMixer()), input_size=(3, 16, 16))
    assert [(s.kind, s.detail, s.module) for s in sites] == [("residual", "identity", "1")]


def test_convnextv2_sums_inside_global_response_norm_are_not_sites():
    """ConvNeXt-V2's GRN computes ``x + gamma * (x * nx) + beta``: a norm's formula, not a residual unit.
    Exactly one site per ConvNeXt block, the block's own sum; each GRN sum is skipped with why."""
    model = timm.create_model("convnextv2_atto")
    found = scan(model, (3, 32, 32))
    blocks = [n for n, m in model.named_modules() if type(m).__name__ == "ConvNeXtBlock"]
    norms = [n for n, m in model.named_modules() if type(m).__name__ == "GlobalResponseNorm"]
    assert len(blocks) == len(norms) == 12  # depths 2, 2, 6, 2
    assert [(s.kind, s.module, s.channels) for s in found.sites] == [
        ("residual", n, model.get_submodule(n).conv_dw.out_channels) for n in blocks
    ]
    inside = [s.where.split(" ")[0] for s in found.skipped if "one layer (GlobalResponseNorm" in s.reason]
    assert inside == norms


def test_rexnet_partial_residual_is_one_site_per_bottleneck():
    """ReXNet's LinearBottleneck ends in ``cat([y[:, :C] + x, y[:, C:]])``: one residual unit (its identity
    covers the first C channels), anchored at the concatenation; no Inception merge, no second site."""
    model = timm.create_model("rexnet_100")
    found = scan(model, (3, 32, 32))
    units = {n: m for n, m in model.named_modules() if isinstance(m, LinearBottleneck) and m.use_shortcut}
    assert len(units) == 11
    assert kinds(found.sites) == {"residual": 11, "conv3x3": 11}
    residual = [s for s in found.sites if s.kind == "residual"]
    assert [(s.module, s.channels, s.detail) for s in residual] == [
        (n, m.out_channels, f"identity, on {m.in_channels} of {m.out_channels} channels") for n, m in units.items()
    ]
    assert all(s.refs.anchor.target is torch.cat for s in residual)
