"""Surgery: the model stays the user's model, and each position puts the block where the notes say."""

import copy
import io
import pickle

import pytest
import timm
import torch
from conftest import max_rel_diff, randomize
from torch import fx, nn

import retrofit
from retrofit import RetrofitError
from retrofit.graph.forward import installed

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def test_model_keeps_class_methods_and_state_dict(resnet50_random):
    model = resnet50_random
    se = retrofit.add_se(model, input_size=(3, 64, 64))
    assert type(se) is type(model)
    assert type(se.layer1[0]) is type(model.layer1[0])  # blocks keep their class too
    for method in ("forward_features", "forward_head", "reset_classifier", "get_classifier", "zero_init_last"):
        assert hasattr(se, method) or hasattr(se.layer1[0], method)
    assert se.pretrained_cfg == model.pretrained_cfg
    before, after = model.state_dict(), se.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    new = set(after) - set(before)
    assert new and all(".se." in k for k in new)
    se.reset_classifier(10)
    assert se(X).shape == (2, 10)


def test_input_is_untouched_unless_inplace(resnet50_random):
    model = copy.deepcopy(resnet50_random)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    out = model(X)
    se = retrofit.add_se(model, position="post", input_size=(3, 64, 64), init="paper")
    assert se is not model
    assert not any("se" in k for k in model.state_dict())
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
    assert "forward" not in model.layer1[0].__dict__
    torch.testing.assert_close(model(X), out, rtol=0, atol=0)
    same = retrofit.add_se(model, inplace=True, input_size=(3, 64, 64))
    assert same is model and hasattr(model.layer1[0], "se")


def branch(b, x):
    """A timm Bottleneck's residual branch, written out."""
    x = b.act1(b.bn1(b.conv1(x)))
    x = b.act2(b.bn2(b.conv2(x)))
    return b.bn3(b.conv3(x))


EXPECTED = {  # the notes' formulas for a bottleneck unit with an identity shortcut
    "standard": lambda b, se, x: b.act3(se(branch(b, x)) + x),
    "pre": lambda b, se, x: b.act3(branch(b, se(x)) + x),
    "post": lambda b, se, x: se(b.act3(branch(b, x) + x)),
    "identity": lambda b, se, x: b.act3(branch(b, x) + se(x)),
    "inside": lambda b, se, x: b.act3(b.bn3(b.conv3(se(b.act2(b.bn2(b.conv2(b.act1(b.bn1(b.conv1(x))))))))) + x),
}


@pytest.mark.parametrize("position", list(EXPECTED))
def test_each_position_computes_the_notes_formula(resnet50_random, position):
    se_model = retrofit.add_se(resnet50_random, position=position, init="paper", input_size=(3, 64, 64))
    block = se_model.layer1[1]
    name = "se" if position == "standard" else f"se_{position}"
    se = getattr(block, name)
    x = torch.relu(torch.randn(2, 256, 16, 16, generator=torch.Generator().manual_seed(2)))
    with torch.no_grad():
        torch.testing.assert_close(block(x), EXPECTED[position](block, se, x))
        # and the block is not a no-op: without it the result differs
        plain = resnet50_random.layer1[1]
        assert not torch.allclose(block(x), plain(x))


def test_identity_position_on_a_projection_shortcut(resnet50_random):
    se_model = retrofit.add_se(resnet50_random, position="identity", init="paper", input_size=(3, 64, 64))
    b = se_model.layer2[0]
    x = torch.relu(torch.randn(1, 256, 16, 16))
    with torch.no_grad():
        torch.testing.assert_close(b(x), b.act3(branch(b, x) + b.se_identity(b.downsample(x))))


def test_inside_on_basicblock_goes_after_the_first_3x3_conv():
    model = randomize(timm.create_model("resnet18"))
    se_model = retrofit.add_se(model, position="inside", init="paper", input_size=(3, 64, 64))
    assert len(retrofit.get_info(se_model).blocks) == 8  # one per block, not one per 3x3 conv
    b = se_model.layer1[0]
    x = torch.relu(torch.randn(1, 64, 16, 16))
    with torch.no_grad():
        expected = b.act2(b.bn2(b.conv2(b.se_inside(b.act1(b.bn1(b.conv1(x)))))) + x)
        torch.testing.assert_close(b(x), expected)
    assert all(s.reason.startswith("inside: its output already ends") for s in retrofit.get_info(se_model).skipped)


def test_block_names_and_stage_restriction(resnet50_random):
    se = retrofit.add_se(resnet50_random, stages=[4], input_size=(3, 64, 64))
    paths = [b.path for b in retrofit.get_info(se).blocks]
    assert paths == [f"layer3.{i}.se" for i in range(6)]
    assert all(b.stage == 4 and b.stride == 16 for b in retrofit.get_info(se).blocks)
    se2 = retrofit.add_se(resnet50_random, position="inside", r=8, bias=False, stages=[2, 5], input_size=(3, 64, 64))
    assert [b.path for b in retrofit.get_info(se2).blocks] == [f"layer1.{i}.se_inside" for i in range(3)] + [
        f"layer4.{i}.se_inside" for i in range(3)
    ]
    assert se2.layer1[0].se_inside.fc1.bias is None and se2.layer1[0].se_inside.width == 8


def test_errors_for_impossible_requests(resnet50_random):
    with pytest.raises(RetrofitError, match=r"stage 6 does not exist in resnet50.*stages 2,3,4,5"):
        retrofit.add_se(resnet50_random, stages=[6], input_size=(3, 64, 64))
    with pytest.raises(RetrofitError, match="position 'inside' has no site in inception_v3.*0 conv3x3"):
        retrofit.add_se(timm.create_model("inception_v3"), position="inside", input_size=(3, 96, 96))
    with pytest.raises(RetrofitError, match="no residual or Inception merge at all"):
        retrofit.add_se(timm.create_model("vgg11"), input_size=(3, 64, 64))


def test_width_below_one_is_raised_with_a_warning(resnet50_random):
    with pytest.warns(retrofit.RetrofitWarning, match="below 1"):
        se = retrofit.add_se(resnet50_random, r=1000, input_size=(3, 64, 64))
    assert se.layer1[0].se.width == 1


def test_drop_path_keeps_working_in_train_mode():
    """Children keep their own forward: a DropPath traced as identity in eval still drops in train."""
    model = randomize(timm.create_model("resnet18", drop_path_rate=0.5))
    se = retrofit.add_se(model, input_size=(3, 64, 64))
    se.train()
    torch.manual_seed(0)
    a = se.layer1[0](torch.randn(4, 64, 8, 8))
    torch.manual_seed(0)
    b = model.train().layer1[0](torch.randn(4, 64, 8, 8))
    torch.testing.assert_close(a, b)  # same random drops: DropPath kept, SE (preserve) is the identity
    se.eval()
    x = torch.randn(4, 64, 8, 8)
    torch.testing.assert_close(se.layer1[0](x), se.layer1[0](x))


class ModeDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        if self.training:
            y = y * 0.5
        return x + y


def test_a_forward_that_depends_on_mode_gets_one_forward_per_mode():
    """ModeDependent scales its branch in train mode only: both modes are rebuilt, with the block before
    the scaling in each, and the retrofitted model follows train()/eval() like the original."""
    model = randomize(nn.Sequential(ModeDependent(), Residualish(), ModeDependent())).train()
    se = retrofit.add_se(model, r=4, init="paper", input_size=(8, 8, 8))
    assert [b.path for b in retrofit.get_info(se).blocks] == ["0.se", "1.se", "2.se"] and not retrofit.get_info(
        se
    ).skipped
    x = torch.randn(2, 8, 8, 8)
    for mode in (True, False):
        se.train(mode)
        block, conv = se[0].se, se[0].conv  # hand-run: x + s(y) * y, times 0.5 in train mode only
        expected = x + block(conv(x)) * (0.5 if mode else 1.0)
        torch.testing.assert_close(se[0](x), expected)
    stripped = retrofit.strip(se)
    preserved = retrofit.add_se(model, r=4, input_size=(8, 8, 8))
    for mode in (True, False):
        model.train(mode), preserved.train(mode), stripped.train(mode)
        torch.testing.assert_close(preserved(x), model(x), rtol=0, atol=0)
        torch.testing.assert_close(stripped(x), model(x), rtol=0, atol=0)


class Residualish(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return x + self.conv(x)


def test_deepcopy_and_pickle_keep_the_rewritten_forward(resnet50_random):
    se = retrofit.add_se(resnet50_random, init="paper", input_size=(3, 64, 64))
    expected = se(X)
    twin = copy.deepcopy(se)
    torch.testing.assert_close(twin(X), expected)
    with torch.no_grad():
        twin.layer1[0].se.fc2.bias.add_(1.0)  # the copy is independent
    torch.testing.assert_close(se(X), expected)
    assert not torch.allclose(twin(X), expected)
    buffer = io.BytesIO()
    torch.save(se, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(X), expected)
    holder = installed(loaded.layer2[0])  # the loaded forward is bound to the loaded module
    assert holder.module is loaded.layer2[0] and holder.code == installed(se.layer2[0]).code
    assert installed(pickle.loads(pickle.dumps(se)).layer2[0]) is not None


def test_graph_module_input_stays_a_graph_module():
    gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Residualish()))
    randomize(gm)
    se = retrofit.add_se(gm, r=4, input_size=(3, 16, 16))
    assert isinstance(se, fx.GraphModule) and hasattr(se, "se")
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(se(x), gm(x))
    assert any(n.target == "se" for n in se.graph.nodes)


def test_retrofitting_twice_adds_a_second_block(resnet50_random):
    once = retrofit.add_se(resnet50_random, input_size=(3, 64, 64))
    twice = retrofit.add_se(once, input_size=(3, 64, 64))
    assert hasattr(twice.layer1[0], "se") and hasattr(twice.layer1[0], "se_2")
    assert max_rel_diff(twice(X), resnet50_random(X)) <= 1e-5


def test_inception_modules_get_one_block_on_their_output():
    model = randomize(timm.create_model("inception_v3"))
    se = retrofit.add_se(model, init="paper", input_size=(3, 96, 96))
    inception = [n for n, m in se.named_modules() if n and type(m).__name__.startswith("Inception")]
    assert [b.path for b in retrofit.get_info(se).blocks] == [f"{n}.se" for n in inception]
    x = torch.randn(1, 288, 9, 9)
    with torch.no_grad():  # Mixed_6a's forward: the concatenation of its branches, then the block
        m = se.Mixed_6a
        torch.testing.assert_close(m(x), m.se(torch.cat(m._forward(x), 1)))
    v4 = retrofit.add_se(timm.create_model("inception_v4"), input_size=(3, 96, 96))
    assert len(retrofit.get_info(v4).blocks) == 19


def test_inception_resnet_units_get_the_block_on_their_residual_branch():
    model = randomize(timm.create_model("inception_resnet_v2"))
    se = retrofit.add_se(model, init="paper", input_size=(3, 96, 96))
    kinds = {b.site_kind for b in retrofit.get_info(se).blocks}
    assert kinds == {"residual", "inception"} and len(retrofit.get_info(se).blocks) == 43
    b = se.repeat[0]
    x = torch.relu(torch.randn(1, 320, 5, 5))
    with torch.no_grad():
        branch = b.conv2d(torch.cat((b.branch0(x), b.branch1(x), b.branch2(x)), 1)) * b.scale
        torch.testing.assert_close(b(x), b.act(b.se(branch) + x))


class Shared(nn.Module):
    """One residual block applied twice (tied weights)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = Residualish()
        self.other = Residualish()

    def forward(self, x):
        return self.other(self.block(self.block(self.stem(x))))


def test_a_module_called_twice_is_skipped_with_its_reason():
    se = retrofit.add_se(Shared(), r=4, input_size=(3, 8, 8))
    assert [b.path for b in retrofit.get_info(se).blocks] == ["other.se"]
    assert sum("called 2 times" in s.reason for s in retrofit.get_info(se).skipped) == 2
    assert "forward" not in se.block.__dict__


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            return x + self.conv(x)
        return x


def test_an_untraceable_model_keeps_its_forward_and_says_why():
    # its own forward is kept, what it calls is analysed (one conv here: no site), and the reason shown
    with pytest.raises(
        RetrofitError,
        match=r"no site in Untraceable.*torch.fx cannot trace Untraceable: "
        r"symbolically traced.*kept as is",
    ):
        retrofit.add_se(Untraceable(), input_size=(3, 8, 8))
    # a submodule: kept as one node, and here it held the only site
    with pytest.raises(RetrofitError, match=r"no site in Sequential.*torch.fx cannot trace Untraceable"):
        retrofit.add_se(nn.Sequential(nn.Identity(), Untraceable()), input_size=(3, 8, 8))
    # what the parts of a kept forward receive comes from one run: an input it does not take is one line
    with pytest.raises(
        RetrofitError,
        match=r"cannot trace Untraceable.*did not run on a random 1x4x8x8 input.*"
        r"input size it takes",
    ):
        retrofit.add_se(Untraceable(), input_size=(4, 8, 8))


def test_a_new_position_is_one_registered_function(resnet50_random):
    """Extensibility: 'unit_input' scales the unit's input for the branch and the shortcut alike."""
    from retrofit.surgery.positions import POSITIONS, Insertion, register_position

    @register_position("unit_input", kinds=("residual",), summary="on the unit's input, for both paths")
    def unit_input(site):
        return Insertion(site, site.refs.fork, tuple(site.refs.fork.users))

    try:
        se_model = retrofit.add_se(resnet50_random, position="unit_input", init="paper", input_size=(3, 64, 64))
        b = se_model.layer1[1]
        x = torch.relu(torch.randn(1, 256, 8, 8))
        with torch.no_grad():
            s = b.se_unit_input(x)
            torch.testing.assert_close(b(x), b.act3(branch(b, s) + s))
    finally:
        POSITIONS.pop("unit_input")
    with pytest.raises(retrofit.RecipeError, match="unknown value 'unit_input'"):
        retrofit.Recipe(position="unit_input")


def test_eval_caches_neither_leak_proxies_nor_break_tracing():
    """LeViT caches its attention biases in eval forwards; tracing such a model must neither read the
    cache as a constant nor leave fx Proxies in it (the user's model is the input: never changed)."""
    from torch.fx import Proxy

    model = timm.create_model("levit_128s", num_classes=10, img_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)  # fills the cache
    se_model = retrofit.add_se(model, input_size=(3, 64, 64))
    cached = [
        v for m in [*model.modules(), *se_model.modules()] for v in getattr(m, "attention_bias_cache", {}).values()
    ]
    assert not any(isinstance(v, Proxy) for v in cached)
    assert not model.training and not se_model.training
    with torch.no_grad():
        assert torch.equal(se_model(x), before) and torch.equal(model(x), before)


@pytest.mark.parametrize("base", ["seresnet18", "resnet18+standard"])
def test_inside_skips_a_second_conv_that_only_an_se_block_follows(base):
    """ResNet-18 has 2 + 2 + 2 + 2 BasicBlocks; `inside` goes after the first 3x3 conv of each. After
    the second one the branch ends, also when an SE block (timm's own, or one inserted before) sits
    between it and the sum."""
    if base == "seresnet18":
        model = timm.create_model("seresnet18", num_classes=10)
    else:
        model = retrofit.add_se(timm.create_model("resnet18", num_classes=10), input_size=(3, 64, 64))
    inside = [
        b
        for b in retrofit.get_info(retrofit.add_se(model, position="inside", input_size=(3, 64, 64))).blocks
        if b.position == "inside"
    ]
    assert len(inside) == 8 and len({b.site_module for b in inside}) == 8


class TwoReaders(nn.Module):
    """A residual unit whose branch output is read twice (by the sum and by a pooled term added after) and
    whose forward differs by mode (the sum halved in train mode only)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        out = x + y
        if self.training:
            out = out * 0.5
        return y.mean((2, 3), keepdim=True) + out


def test_a_branch_read_twice_in_a_forward_that_depends_on_mode_gets_its_block_in_both():
    """The mutation tool's survivors in surgery/: prepare.py:185 (the check that the readers of a block's
    tensor have counterparts in the other mode's graph, inverted) and sites.py:292 (a sum of two shapes,
    `!=` made `>`: the broadcast sum of a (1, 8, 1, 1) mean and a (1, 8, 8, 8) map then passed for a
    residual unit). One site, the sum x + y; its block gates y for the sum only, the mean reads y as it
    was; in both modes (hand-run of the same forward)."""
    model = randomize(nn.Sequential(TwoReaders()))
    sites = retrofit.find_sites(model, input_size=(8, 8, 8))
    assert sorted((s.kind, s.module) for s in sites) == [("conv3x3", "0"), ("residual", "0")]
    se = retrofit.add_se(model, r=4, init="paper", input_size=(8, 8, 8))
    info = retrofit.get_info(se)
    assert [b.path for b in info.blocks] == ["0.se"] and not info.skipped
    x = torch.randn(2, 8, 8, 8)
    for mode in (True, False):
        se.train(mode)
        y = se[0].conv(x)
        expected = y.mean((2, 3), keepdim=True) + (x + se[0].se(y)) * (0.5 if mode else 1.0)
        torch.testing.assert_close(se(x), expected)


def test_blocks_on_channels_last_maps_record_their_height_and_width():
    """The mutation tool's survivor at prepare.py:56 (an (N, H, W, C) map's size read as shape[1:2]): no
    test of the surgery read the size of a block on a channels-last map. Swin-T at 224: patch stride 4,
    then 2 per stage; every block's (H, W) is 224 over its stride, stages 2-5 at 56, 28, 14 and 7."""
    with torch.device("meta"):
        model = timm.create_model("swin_tiny_patch4_window7_224")
    blocks = retrofit.get_info(retrofit.add_se(model, input_size=(3, 224, 224))).blocks
    maps = {(b.stage, b.size) for b in blocks if b.layout == "nhwc"}  # the other blocks: on window tokens
    assert maps == {(2, (56, 56)), (3, (28, 28)), (4, (14, 14)), (5, (7, 7))}
