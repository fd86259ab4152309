"""Custom graphs, site selection, other attention modules and strip (issue 4, items 4-6)."""

import copy

import pytest
import timm
import torch
from conftest import randomize
from torch import nn
from typer.testing import CliRunner

import retrofit
from retrofit.cli import app
from retrofit.surgery.recipe import Recipe
from support import Unit, custom_net

SIZE = (3, 64, 64)
RESNET18_UNITS = ["layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1", "layer4.0", "layer4.1"]


@pytest.fixture(scope="module")
def resnet18():
    return randomize(timm.create_model("resnet18"))


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, *SIZE, generator=torch.Generator().manual_seed(1))


def paths(model):
    return [b.path for b in retrofit.get_info(model).blocks]


# -- selection ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fields, expected",
    [
        (dict(only=["layer3.*"]), ["layer3.0.se", "layer3.1.se"]),
        (
            dict(only="layer3,layer4.1"),
            ["layer3.0.se", "layer3.1.se", "layer4.1.se"],
        ),  # a parent path selects inside it
        (dict(skip=["layer[12].*", "layer4.0"]), ["layer3.0.se", "layer3.1.se", "layer4.1.se"]),
        (dict(only=["layer4*"], skip=["*.1"]), ["layer4.0.se"]),
        (dict(position="inside", kinds=["inside"], only=["layer2.0"]), ["layer2.0.se_inside"]),
        (dict(kinds="residual"), [u + ".se" for u in RESNET18_UNITS]),
    ],
)
def test_only_skip_and_kinds_select_sites(resnet18, fields, expected):
    assert paths(retrofit.add_se(resnet18, input_size=SIZE, **fields)) == expected


def test_kinds_pick_residual_or_inception_sites():
    class Mixed(nn.Module):  # one residual unit, then one Inception-style merge
        def __init__(self):
            super().__init__()
            self.unit = Unit(8)
            self.a, self.b = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            x = self.unit(x)
            return torch.cat([self.a(x), self.b(x)], 1)

    net = Mixed().eval()
    assert paths(retrofit.add_se(net, kinds="inception", r=2, input_size=(8, 16, 16))) == ["se"]
    assert paths(retrofit.add_se(net, kinds="residual", r=2, input_size=(8, 16, 16))) == ["unit.se"]
    assert paths(retrofit.add_se(net, r=2, input_size=(8, 16, 16))) == ["unit.se", "se"]


def test_selection_is_a_recipe_field_in_yaml_and_survives_save_and_load(tmp_path, resnet18, x):
    (tmp_path / "r.yaml").write_text("position: standard\nmodule: eca\nonly: [layer4.*]\nskip: layer4.1\n")
    recipe = Recipe.load(tmp_path / "r.yaml")
    assert recipe.only == ("layer4.*",) and recipe.skip == ("layer4.1",) and recipe.module == "eca"
    model = retrofit.add_se(resnet18, recipe, init="paper", input_size=SIZE)
    assert paths(model) == ["layer4.0.se"]
    retrofit.save(model, tmp_path / "m.safetensors")
    again = retrofit.load(tmp_path / "m.safetensors")
    assert paths(again) == ["layer4.0.se"] and type(again.layer4[0].se).__name__ == "EcaModule"
    assert torch.equal(again.eval()(x), model.eval()(x))


# -- other attention modules ------------------------------------------------------------------------
def test_eca_through_the_pass_is_timms_ecaresnet():
    """timm's ecaresnet26t is resnet26t with ECA on the residual branch: same parameters, same keys,
    and with its weights the retrofitted network computes what it computes."""
    native = randomize(timm.create_model("ecaresnet26t"))
    model = retrofit.add_se(timm.create_model("resnet26t"), module="eca", init="paper", input_size=SIZE)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in native.parameters())
    model.load_state_dict(native.state_dict(), strict=True)
    x = torch.randn(1, *SIZE)
    assert torch.equal(model.eval()(x), native(x))


@pytest.mark.parametrize("module", ["ese", "eca", "ceca", "cbam", "gc"])
def test_other_modules_preserve_and_are_measured(module):
    net, x = custom_net(), torch.randn(2, 3, 32, 32)
    model = retrofit.add_se(net, module=module, input_size=(3, 32, 32))
    assert torch.equal(model(x), net(x))  # preserving init: exact, as for SE
    train = copy.deepcopy(model).train()
    assert torch.equal(train(x), copy.deepcopy(net).train()(x))  # batch statistics too (CBAM's BN)
    report = retrofit.measure_overhead(net, model, input_size=(3, 32, 32))
    assert [b.path for b in report.blocks] == ["1.se", "2.se", "4.se"]
    blocks = [model.get_submodule(b.path) for b in report.blocks]
    assert all(type(b).__name__ == type(timm.layers.create_attn(module, 16)).__name__ for b in blocks)
    assert report.added_params == sum(p.numel() for b in blocks for p in b.parameters())
    assert [b.params for b in report.blocks] == [sum(p.numel() for p in b.parameters()) for b in blocks]
    assert report.added_macs > 0 and [b.channels for b in report.blocks] == [16, 16, 32]
    model.train()(x).square().mean().backward()
    assert all(p.grad is not None for b in blocks for p in b.parameters())


def test_eca_parameter_count_is_the_papers_kernel_formula(resnet18):
    # ECA's kernel: k = nearest odd of (log2(C) + 1) / 2, at least 3; one weight per tap, no bias
    def k(c):
        t = int((torch.log2(torch.tensor(float(c))).item() + 1) / 2)
        return max(t if t % 2 else t + 1, 3)

    channels = [64, 64, 128, 128, 256, 256, 512, 512]
    model = retrofit.add_se(resnet18, module="eca", input_size=SIZE)
    report = retrofit.measure_overhead(resnet18, model, input_size=SIZE)
    assert report.added_params == sum(k(c) for c in channels) == 36


def test_se_stays_the_default_and_the_timm_recipe_is_unchanged(resnet18):
    assert Recipe().module == "se" and Recipe.load("timm").module == "se"
    model = retrofit.add_se(timm.create_model("resnet18"), recipe="timm", input_size=SIZE)
    native = timm.create_model("seresnet18")
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in native.parameters())
    model.load_state_dict(native.state_dict(), strict=True)


# -- strip ----------------------------------------------------------------------------------------
def assert_same(model, original, x):
    a, b = model.state_dict(), original.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert torch.equal(model.eval()(x), original.eval()(x))


@pytest.mark.parametrize("position", ["standard", "inside"])
def test_strip_round_trip_resnet18(resnet18, x, position):
    model = retrofit.add_se(resnet18, position=position, init="paper", input_size=SIZE)
    assert not torch.equal(model(x), resnet18(x))  # random blocks: the round trip has something to undo
    plain = retrofit.strip(model)
    assert_same(plain, resnet18, x)
    assert type(plain) is type(resnet18) and retrofit.get_info(plain) is None
    assert all(plain.get_submodule(u).se is None for u in RESNET18_UNITS)  # timm's None is back
    assert paths(model)  # a copy by default: the retrofitted model keeps its blocks


@pytest.mark.parametrize("position", ["standard", "inside"])
@pytest.mark.parametrize("module", ["se", "cbam"])  # se at the standard position is fused with its sum
def test_strip_round_trip_custom_net_and_graph_module(position, module):
    net = custom_net()
    x = torch.randn(2, 3, 32, 32)
    for original in (net, torch.fx.symbolic_trace(net)):
        model = retrofit.add_se(original, position=position, module=module, init="paper", r=4, input_size=(3, 32, 32))
        assert not torch.equal(model(x), original(x))
        assert_same(retrofit.strip(model), original, x)
    copied = copy.deepcopy(model)  # a GraphModule's deepcopy keeps what add_se did: strip still works
    assert paths(copied) == paths(model)
    assert_same(retrofit.strip(copied), original, x)


def test_strip_in_place_after_two_retrofits(resnet18, x):
    model = retrofit.add_se(resnet18, only="layer1", init="paper", input_size=SIZE)
    retrofit.add_se(model, position="post", module="eca", only="layer1", init="paper", inplace=True, input_size=SIZE)
    assert len(paths(model)) == 4
    assert retrofit.strip(model, inplace=True) is model
    assert_same(model, resnet18, x)


def test_strip_a_model_without_blocks_is_an_error(resnet18):
    with pytest.raises(retrofit.RetrofitError, match="no blocks from retrofit.add_se; nothing to strip"):
        retrofit.strip(resnet18)


# -- bad input: one clear message each ------------------------------------------------------------
@pytest.mark.parametrize(
    "fields, message",
    [
        (
            dict(only=["layer9.*"]),
            "only glob 'layer9.*' matches no site of position 'standard' in resnet18; site modules: layer1.0",
        ),
        (dict(skip=["head"]), "skip glob 'head' matches no site"),
        (dict(only=["layer1.*"], skip=["layer1"]), "leave no site of position 'standard'"),
        (dict(module="nope"), "recipe field 'module': unknown value 'nope'; allowed: se, ese, eca, ceca, cbam, gc"),
        (dict(module="eca", r=8), "recipe field 'r' does not apply to module 'eca'"),
        (dict(module="cbam", gate="tanh"), "init 'preserve' for module 'cbam' needs a gate that is non-zero at 0"),
        (dict(kinds=["inception"]), "kinds inception have no site in resnet18"),
        (dict(kinds=["nope"]), "recipe field 'kinds': unknown value 'nope'"),
        (dict(position="inside", kinds=["residual"]), "position 'inside' applies to conv3x3 sites, not to residual"),
        (dict(only=[""]), "recipe field 'only': expected a list of module-path globs"),
    ],
)
def test_bad_selection_or_module_is_one_clear_error(resnet18, fields, message):
    with pytest.raises(retrofit.RetrofitError) as err:
        retrofit.add_se(resnet18, input_size=SIZE, **fields)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_model_without_any_site_is_one_clear_error():
    plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    with pytest.raises(
        retrofit.RetrofitError, match="has no site in Sequential.*no residual or Inception merge at all"
    ):
        retrofit.add_se(plain, input_size=(3, 16, 16))


@pytest.mark.parametrize(
    "args, message",
    [
        (["resnet18", "--only", "layer9.*"], "error: only glob 'layer9.*' matches no site"),
        (["resnet18", "--skip", "fc"], "error: skip glob 'fc' matches no site"),
        (["resnet18", "--module", "nope"], "error: recipe field 'module': unknown value 'nope'"),
        (["resnet18", "--kinds", "inception"], "error: kinds inception have no site in resnet18"),
        (["lcnet_035"], "error: position 'standard' has no site in lcnet_035"),  # no residual merge at all
    ],
)
def test_cli_bad_selection_is_one_error_line(args, message):
    result = CliRunner().invoke(app, ["add-se", *args, "--input-size", "3,64,64"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr


def test_cli_selection_and_module_options(tmp_path):
    import json

    report = tmp_path / "r.json"
    result = CliRunner().invoke(
        app,
        [
            "add-se",
            "resnet18",
            "--module",
            "eca",
            "--only",
            "layer3.*,layer4.0",
            "--input-size",
            "3,64,64",
            "--json",
            str(report),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert [b["path"] for b in data["blocks"]] == ["layer3.0.se", "layer3.1.se", "layer4.0.se"]
    assert data["recipe"]["module"] == "eca" and data["recipe"]["only"] == ["layer3.*", "layer4.0"]
    assert data["added"]["params"] == 5 + 5 + 5  # ECA kernels for 256, 256 and 512 channels
    assert "ECA blocks inserted" in result.output and "SE blocks" not in result.output
