"""Folding constant gates (retrofit.surgery.fold, .neighbour): each neighbour kind is exact against the
unfolded model in float64 (train and eval mode), a neighbour another layer reads is never changed, and
strip / bypass mean one defined thing on a folded model."""

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import randomize
from torch import nn

import retrofit
from retrofit.surgery.fold import apply_folds, constant_scales, fold_scales, gates, info_of, scale_into

X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def constant_gates(model, seed=1):
    """Every gate input-independent (fc1 weights zero, as the preserving init leaves them) with a constant
    that is not 1 (fc2's bias drawn), so a fold that drops or misplaces it shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in gates(model)[0]:
            block = model.get_submodule(b.path)
            for name, p in block.named_parameters():
                if name.endswith("bias"):
                    p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def retrofitted(plain, **fields):
    torch.manual_seed(0)
    se = retrofit.add_se(plain, input_size=(3, 32, 32), **fields)
    return constant_gates(se)


def folded_copy(model):
    out = copy.deepcopy(model)
    folds = fold_scales(out, constant_scales(out))
    return out, folds


def outputs(model, train=False):
    model.train(train)
    torch.manual_seed(5)  # dropout-like layers draw alike
    with torch.no_grad():
        return model(X)


def test_standard_folds_into_the_branchs_last_norm_exactly_in_train_and_eval_mode():
    plain = randomize(timm.create_model("test_resnet", num_classes=5)).double()
    se = retrofitted(plain, r=4)
    folded, folds = folded_copy(se)
    assert [(f.into, f.neighbour) for f in folds][:2] == [("norm", "layer1.0.bn2"), ("norm", "layer2.0.bn2")]
    for train in (False, True):  # batch statistics in train mode: the norm's input does not change
        torch.testing.assert_close(outputs(folded, train), outputs(se, train), rtol=1e-12, atol=1e-12)
    assert not any(n.endswith(".se") for n, _ in folded.named_modules())  # the blocks are gone
    s = constant_scales(se)["layer1.0.se"]
    torch.testing.assert_close(folded.layer1[0].bn2.weight, se.layer1[0].bn2.weight * s, rtol=1e-15, atol=0)
    torch.testing.assert_close(folded.layer1[0].bn2.bias, se.layer1[0].bn2.bias * s, rtol=1e-15, atol=0)


@pytest.mark.parametrize(
    "position,into", [("pre", "conv_in"), ("inside", "conv_in"), ("post", "scale"), ("identity", None)]
)
def test_each_position_folds_exactly(position, into):
    plain = randomize(timm.create_model("test_resnet", num_classes=5)).double()
    se = retrofitted(plain, r=4, position=position)
    folded, folds = folded_copy(se)
    assert len(folds) == 4
    if into is not None:
        assert {f.into for f in folds} == {into}
    else:  # identity: the first unit's shortcut is the identity (a scale), the others' a downsample's norm
        assert [f.into for f in folds] == ["scale", "norm", "norm", "norm"]
    for train in (False, True):
        torch.testing.assert_close(outputs(folded, train), outputs(se, train), rtol=1e-12, atol=1e-12)


class ConvUnit(nn.Module):
    """x + conv2(relu(bn1(conv1(x)))): the standard block reads a convolution's output (with a bias);
    conv2 is grouped, so an inside block before it folds along grouped input channels."""

    def __init__(self, c=8, groups=4, padding_mode="zeros"):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, groups=groups, padding_mode=padding_mode)

    def forward(self, x):
        return torch.relu(x + self.conv2(torch.relu(self.bn1(self.conv1(x)))))


def unit_net(**kw):
    torch.manual_seed(0)
    return randomize(nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), ConvUnit(**kw), ConvUnit(**kw))).double()


def test_conv_output_and_grouped_input_channels_fold_exactly():
    net = unit_net()
    std, _ = folded_copy(retrofitted(net, r=2))
    assert {f.into for f in info_of(std).folds} == {"conv_out"}
    torch.testing.assert_close(outputs(std), outputs(retrofitted(net, r=2)), rtol=1e-12, atol=1e-12)
    inside = retrofitted(net, r=2, position="inside")
    folded, folds = folded_copy(inside)
    assert {(f.into, f.neighbour.rpartition(".")[2]) for f in folds} >= {("conv_in", "conv2")}
    for train in (False, True):
        torch.testing.assert_close(outputs(folded, train), outputs(inside, train), rtol=1e-12, atol=1e-12)


def test_the_weight_algebra_against_functional_calls():
    """scale_into against F.conv2d / F.linear / F.batch_norm on the scaled input or output (float64)."""
    g = torch.Generator().manual_seed(2)
    s = torch.rand(8, generator=g, dtype=torch.float64) + 0.5
    x = torch.randn(2, 8, 5, 5, generator=g, dtype=torch.float64)
    conv = nn.Conv2d(8, 6, 3, padding=1, groups=2).double()
    w, b = conv.weight.detach().clone(), conv.bias.detach().clone()
    scale_into(conv, "conv_in", s)
    torch.testing.assert_close(
        conv(x), F.conv2d(x * s.view(1, 8, 1, 1), w, b, padding=1, groups=2), rtol=1e-13, atol=1e-13
    )
    conv = nn.Conv2d(3, 8, 3, padding=1).double()
    w, b = conv.weight.detach().clone(), conv.bias.detach().clone()
    y = torch.randn(2, 3, 5, 5, generator=g, dtype=torch.float64)
    scale_into(conv, "conv_out", s)
    torch.testing.assert_close(conv(y), F.conv2d(y, w, b, padding=1) * s.view(1, 8, 1, 1), rtol=1e-13, atol=1e-13)
    lin = nn.Linear(8, 4).double()
    w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    t = torch.randn(2, 7, 8, generator=g, dtype=torch.float64)
    scale_into(lin, "linear_in", s)
    torch.testing.assert_close(lin(t), F.linear(t * s, w, b), rtol=1e-13, atol=1e-13)
    lin = nn.Linear(4, 8).double()
    w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    u = torch.randn(2, 7, 4, generator=g, dtype=torch.float64)
    scale_into(lin, "linear_out", s)
    torch.testing.assert_close(lin(u), F.linear(u, w, b) * s, rtol=1e-13, atol=1e-13)
    ln = nn.LayerNorm(8).double()
    with torch.no_grad():
        ln.weight.normal_(generator=g), ln.bias.normal_(generator=g)
    w, b = ln.weight.detach().clone(), ln.bias.detach().clone()
    scale_into(ln, "norm", s)
    torch.testing.assert_close(ln(t), F.layer_norm(t, (8,), w, b) * s, rtol=1e-13, atol=1e-13)


def test_reflect_padding_is_refused_for_an_input_channel_fold():
    """s * 0 == 0 only for zero padding: a reflect-padded convolution after the block must not take it."""
    net = unit_net(padding_mode="reflect")
    inside = retrofitted(net, r=2, position="inside")
    folded, folds = folded_copy(inside)
    before_conv2 = [f for f in folds if f.path.endswith("se_inside")]
    assert before_conv2 and all(f.into == "scale" and "reflect" in f.why for f in before_conv2)
    torch.testing.assert_close(outputs(folded), outputs(inside), rtol=1e-12, atol=1e-12)


class AlsoRead(nn.Module):
    """The branch's last norm is read by the sum AND by a second use: folding into it would change that use."""

    def __init__(self, c=8):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return torch.relu(x + y) + y.mean((2, 3), keepdim=True)


class CalledTwice(nn.Module):
    """One convolution called twice: its weights serve two places."""

    def __init__(self, c=8):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.conv(torch.relu(self.conv(x))))


class Tied(nn.Module):
    """Two convolutions sharing one weight tensor."""

    def __init__(self, c=8):
        super().__init__()
        self.a, self.b = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        self.b.weight = self.a.weight

    def forward(self, x):
        return torch.relu(x + self.b(torch.relu(self.a(x))))


@pytest.mark.parametrize(
    "unit,why", [(AlsoRead, "also read"), (CalledTwice, "called 2 times"), (Tied, "shares a parameter")]
)
def test_a_neighbour_another_layer_reads_is_not_changed(unit, why):
    torch.manual_seed(0)
    net = randomize(nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), unit())).double()
    se = retrofitted(net, r=2)
    folded, folds = folded_copy(se)
    assert [f.into for f in folds] == ["scale"] and why in folds[0].why, folds
    torch.testing.assert_close(outputs(folded), outputs(se), rtol=1e-12, atol=1e-12)


def test_input_dependent_gates_are_not_constant():
    plain = randomize(timm.create_model("test_resnet", num_classes=5)).double()
    se = retrofitted(plain, r=4)
    with torch.no_grad():
        se.layer2[0].se.fc1.weight.normal_()
    assert sorted(constant_scales(se)) == ["layer1.0.se", "layer3.0.se", "layer4.0.se"]


def test_strip_and_bypass_of_a_folded_model():
    """strip removes the blocks left and the channel scales and keeps the scales folded into neighbours;
    bypass computes the same network in place. Checked against the plain model with the neighbours' folded
    weights written in by hand."""
    plain = randomize(timm.create_model("test_resnet", num_classes=5)).double()
    se = retrofitted(plain, r=4, position="identity")  # layer1: a channel scale; layer2-4: downsample norms
    with torch.no_grad():
        se.layer3[0].se_identity.fc1.weight.normal_()  # one block stays live
    scales = constant_scales(se)
    folded = copy.deepcopy(se)
    fold_scales(folded, scales)
    by_hand = copy.deepcopy(plain)
    with torch.no_grad():
        for layer in ("layer2", "layer4"):
            norm = by_hand.get_submodule(f"{layer}.0.downsample.2")
            s = scales[f"{layer}.0.se_identity"]
            norm.weight.mul_(s), norm.bias.mul_(s)
    stripped = retrofit.strip(folded)
    assert stripped.state_dict().keys() == plain.state_dict().keys()
    torch.testing.assert_close(outputs(stripped), outputs(by_hand), rtol=0, atol=0)
    with retrofit.bypass(folded):
        torch.testing.assert_close(outputs(folded), outputs(by_hand), rtol=1e-13, atol=1e-13)
    assert not torch.allclose(outputs(folded), outputs(by_hand))  # outside bypass: the live block and the scale act


def test_apply_folds_rebuilds_the_structure_from_the_records():
    plain = randomize(timm.create_model("test_resnet", num_classes=5)).double()
    se = retrofitted(plain, r=4, position="identity")
    folded, folds = folded_copy(se)
    again = retrofit.add_se(plain, input_size=(3, 32, 32), r=4, position="identity")
    apply_folds(again, [type(f)(f.path, f.into, f.neighbour) for f in folds])
    assert again.state_dict().keys() == folded.state_dict().keys()
    again.load_state_dict(folded.state_dict())
    torch.testing.assert_close(outputs(again), outputs(folded), rtol=0, atol=0)
    with pytest.raises(retrofit.RetrofitError, match="not a layer"):
        apply_folds(
            retrofit.add_se(plain, input_size=(3, 32, 32), r=4),
            [type(folds[0])("layer1.0.se", "conv_in", "layer1.0.bn2")],
        )


def test_a_graph_module_folds_in_its_own_graph():
    """A GraphModule keeps its forward in its graph: the fold takes the block nodes out of it."""
    torch.manual_seed(0)
    net = torch.fx.symbolic_trace(randomize(nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), ConvUnit(), ConvUnit())).double())
    se = retrofitted(net, r=2)
    folded, folds = folded_copy(se)
    assert {f.into for f in folds} == {"conv_out"}
    assert not any(n.op == "call_module" and "se" in n.target for n in folded.graph.nodes)
    assert any(n.op == "call_module" and "se" in n.target for n in se.graph.nodes)  # the original's graph kept
    torch.testing.assert_close(outputs(folded), outputs(se), rtol=1e-12, atol=1e-12)
