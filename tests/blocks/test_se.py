import pytest
import torch
import torch.nn.functional as F
from timm.layers import SEModule

from retrofit import SqueezeExcite
from retrofit.blocks.se import GATES
from retrofit.blocks.se_layout import ChannelsLastSqueezeExcite


def reference(block: SqueezeExcite, x: torch.Tensor, squeeze: str, gate) -> torch.Tensor:
    """The paper's equations written out with plain tensor ops."""
    z = x.mean((2, 3)) if squeeze == "avg" else x.amax((2, 3))
    w1, b1 = block.fc1.weight.flatten(1), block.fc1.bias
    w2, b2 = block.fc2.weight.flatten(1), block.fc2.bias
    s = gate(F.linear(F.relu(F.linear(z, w1, b1)), w2, b2))
    return x * s[:, :, None, None]


GATE_FNS = {"sigmoid": torch.sigmoid, "hard_sigmoid": lambda t: F.relu6(t + 3) / 6, "tanh": torch.tanh, "relu": F.relu}


@pytest.mark.parametrize("squeeze", ["avg", "max"])
@pytest.mark.parametrize("gate", list(GATES))
def test_forward_matches_the_equations(squeeze, gate):
    torch.manual_seed(0)
    block = SqueezeExcite(32, 4, squeeze=squeeze, gate=gate, init="paper")
    x = torch.randn(3, 32, 5, 7)
    torch.testing.assert_close(block(x), reference(block, x, squeeze, GATE_FNS[gate]))


def test_parameter_layout_interchanges_with_timm_semodule():
    torch.manual_seed(0)
    theirs = SEModule(64, rd_ratio=1 / 16, rd_divisor=8)
    ours = SqueezeExcite(64, theirs.fc1.out_channels, init="paper")
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 64, 6, 6)
    torch.testing.assert_close(ours(x), theirs(x))


# timm's SEModule arguments (issue 23, item 6): the same arguments give timm's width, whatever rounding it does
TIMM_ARGS = [
    dict(),
    dict(rd_ratio=1 / 4),
    dict(rd_ratio=0.25, rd_divisor=1),
    dict(rd_ratio=1 / 16, rd_divisor=32),
    dict(rd_channels=10),
    dict(rd_channels=10, rd_ratio=0.5),
    dict(rd_channels=0, rd_ratio=1 / 8),
    dict(rd_divisor=4),
    dict(rd_ratio=0.3, rd_divisor=8),
]


@pytest.mark.parametrize("channels", [24, 64, 100, 2048])
@pytest.mark.parametrize("kwargs", TIMM_ARGS)
def test_timm_names_give_timm_semodules_width(channels, kwargs):
    theirs = SEModule(channels, **kwargs)
    ours = SqueezeExcite(channels, **kwargs)
    assert ours.width == ours.fc1.out_channels == theirs.fc1.out_channels, kwargs
    ours.load_state_dict(theirs.state_dict(), strict=True)  # the same shapes, key for key


def test_a_width_and_timm_names_together_are_two_widths():
    with pytest.raises(TypeError, match="give width or timm's rd_ratio, not both"):
        SqueezeExcite(64, 4, rd_ratio=1 / 4)
    assert SqueezeExcite(64, 4).width == 4  # the width alone, as before


# without biases only gates non-zero at 0 can preserve (the recipe rejects the others: test_recipe)
@pytest.mark.parametrize("gate, bias", [(g, True) for g in GATES] + [(g, False) for g in GATES if GATES[g].at_zero])
def test_preserving_init_is_an_identity_that_learns(gate, bias):
    torch.manual_seed(0)
    block = SqueezeExcite(48, 6, gate=gate, bias=bias, init="preserve")
    x = torch.randn(4, 48, 5, 5, requires_grad=True)
    y = block(x)
    if gate == "tanh":  # tanh(0.5) is not a binary fraction: equal to float rounding
        assert (y - x).abs().max().item() <= 1e-6 * x.abs().max().item()
    else:  # gate(constant) / gate_origin is exactly 1
        assert torch.equal(y, x)
    (y * torch.randn_like(y)).sum().backward()
    grads = {n: p.grad for n, p in block.named_parameters()}
    learning = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias") if bias else ("fc2.weight",)
    for name in learning:
        assert grads[name] is not None and grads[name].abs().sum() > 0, name


def test_paper_init_is_random_and_divides_by_nothing():
    torch.manual_seed(0)
    block = SqueezeExcite(16, 4, init="paper")
    assert block.gate_origin == 1.0
    x = torch.randn(2, 16, 3, 3)
    assert not torch.allclose(block(x), x)


@pytest.mark.parametrize("squeeze", ["avg", "max"])
@pytest.mark.parametrize(
    "shape, prefix", [((2, 5, 7, 16), 0), ((2, 1 + 12, 16), 1), ((2, 12, 16), 0), ((2, 3, 4, 5, 16), 0)]
)
def test_channels_last_block_at_any_rank_traced_and_scripted(squeeze, shape, prefix):
    """(N, ..., C) maps and token sequences: the equations written out per rank (the prefix tokens left
    out of the squeeze, every token scaled); a plain torch.fx.symbolic_trace (which does not keep the
    block as a leaf, as a user's or torchvision's tracer does not) and TorchScript compute the same."""
    torch.manual_seed(0)
    block = ChannelsLastSqueezeExcite(16, 4, squeeze=squeeze, prefix=prefix, init="paper")
    for x in (torch.randn(*shape), torch.randn(*reversed(shape)).permute(*reversed(range(len(shape))))):
        grid = x[:, prefix:]
        axes = tuple(range(1, x.dim() - 1))
        z = grid.mean(axes) if squeeze == "avg" else grid.amax(axes)
        s = torch.sigmoid(
            F.linear(
                F.relu(F.linear(z, block.fc1.weight.flatten(1), block.fc1.bias)),
                block.fc2.weight.flatten(1),
                block.fc2.bias,
            )
        )
        expected = x * s.reshape(shape[0], *[1] * (x.dim() - 2), 16)
        torch.testing.assert_close(block(x), expected)
        torch.testing.assert_close(torch.fx.symbolic_trace(block)(x), expected)
        torch.testing.assert_close(torch.jit.script(block)(x), expected)
