"""A channel gate's excitation (retrofit.blocks.excitation) and the channel scale a folded gate becomes
(retrofit.blocks.scale), against closed forms computed here."""

import pytest
import torch
from torch import nn

from retrofit.blocks.attention import ATTENTIONS, build_attention
from retrofit.blocks.config import BlockConfig
from retrofit.blocks.excitation import constant_scale, gate_of, input_independent, spec_problem
from retrofit.blocks.scale import ChannelScale


def test_the_registry_names_the_channel_gates_and_why_the_others_are_not():
    assert [n for n in ATTENTIONS if spec_problem(n) is None] == ["se", "ese", "eca", "ceca"]
    assert "spatial" in spec_problem("cbam")
    assert "adds" in spec_problem("gc")


@pytest.mark.parametrize("module", ["se", "ese", "eca", "ceca"])
def test_preserving_init_is_input_independent_and_its_constant_is_one(module):
    torch.manual_seed(0)
    block = build_attention(BlockConfig(module=module, **({"r": 4} if module == "se" else {})), 16)
    assert input_independent(block, module)
    assert torch.equal(constant_scale(block, 16), torch.ones(16))
    with torch.no_grad():  # any first map moved: the excitation depends on the input
        next(m for m in block.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))).weight.normal_()
    assert not input_independent(block, module)


def test_se_constant_against_the_closed_form():
    """fc1 weights zero: every image gets sigmoid(fc2(relu(b1))) / gate_origin, in float64."""
    torch.manual_seed(1)
    block = build_attention(BlockConfig(r=4), 16, dtype=torch.float64)
    with torch.no_grad():
        block.fc1.bias.normal_()
        block.fc2.bias.normal_()
    _, origin = gate_of(block)
    assert origin == 0.5
    hidden = torch.relu(block.fc1.bias)
    expected = torch.sigmoid(block.fc2.weight[:, :, 0, 0] @ hidden + block.fc2.bias) / 0.5
    torch.testing.assert_close(constant_scale(block, 16), expected.detach(), rtol=1e-15, atol=0)
    x = torch.randn(3, 16, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(block(x), x * expected.detach().view(1, 16, 1, 1), rtol=1e-15, atol=0)


@pytest.mark.parametrize("layout,shape", [("nchw", (2, 6, 3, 3)), ("nhwc", (2, 3, 3, 6)), ("tokens", (2, 10, 6))])
def test_channel_scale_scales_the_channel_axis_of_each_layout(layout, shape):
    scale = ChannelScale(6, layout, dtype=torch.float64)
    with torch.no_grad():
        scale.scale.copy_(torch.arange(1.0, 7.0))
    x = torch.randn(shape, dtype=torch.float64)
    axis = 1 if layout == "nchw" else -1
    want = x * torch.arange(1.0, 7.0, dtype=torch.float64).view(
        [-1 if d == axis % len(shape) else 1 for d in range(len(shape))]
    )
    assert torch.equal(scale(x), want)
    shortcut = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(scale(x, shortcut), want + shortcut, rtol=1e-15, atol=1e-15)
    assert sum(p.numel() for p in scale.parameters()) == 6


def test_constant_scale_of_a_token_block_reads_a_grid_token_not_the_prefix():
    torch.manual_seed(0)
    block = build_attention(BlockConfig(r=4), 8, layout="tokens", prefix=1)
    with torch.no_grad():
        block.fc2.bias.normal_()
    s = constant_scale(block, 8, "tokens", prefix=1)
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(block(x), x * s, rtol=0, atol=0)
