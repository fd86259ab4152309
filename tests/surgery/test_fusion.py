"""A standard-position block fused with the residual sum it feeds (x * s + shortcut in one
torch.addcmul pass) computes what the unfused block and sum compute, up to the rounding of one
multiply-add (bit for bit under the preserving init, where s = 1), and stays analysable."""

from unittest import mock

import timm
import torch
from conftest import randomize
from torch import nn

import retrofit
from retrofit.graph.forward import installed

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def unfused(model, **fields):
    with mock.patch("retrofit.surgery.prepare._fusable_sum", lambda *a: None):
        return retrofit.add_se(model, input_size=(3, 64, 64), **fields).eval()


def calls(module):
    """(name, number of arguments) of the SE block calls in a rebuilt forward."""
    return [
        (n.target, len(n.args))
        for n in installed(module).graphs[False].nodes
        if n.op == "call_module" and n.target.startswith("se")
    ]


def test_fused_equals_unfused_with_random_blocks():
    plain = randomize(timm.create_model("resnet18"))
    torch.manual_seed(1)
    fused = retrofit.add_se(plain, init="paper", input_size=(3, 64, 64)).eval()
    reference = unfused(plain, init="paper")
    reference.load_state_dict(fused.state_dict())
    assert ("se", 2) in calls(fused.layer1[0]) and ("se", 1) in calls(reference.layer1[0])
    assert not any(
        n.target in ("add", "iadd") or getattr(n.target, "__name__", "") in ("add", "iadd")
        for n in installed(fused.layer1[0]).graphs[False].nodes
    )  # the sum is gone into the block
    with torch.no_grad():
        torch.testing.assert_close(
            fused(X), reference(X), rtol=1e-5, atol=1e-5
        )  # addcmul rounds once (an FMA), x * s + y twice
        assert not torch.allclose(fused(X), plain(X))  # random blocks: they do change the output


def test_other_positions_are_not_fused():
    se = retrofit.add_se(timm.create_model("resnet18"), position="identity", input_size=(3, 64, 64))
    assert ("se_identity", 1) in calls(se.layer1[0])


def test_a_fused_model_is_analysed_and_retrofitted_again():
    plain = randomize(timm.create_model("resnet18"))
    once = retrofit.add_se(plain, input_size=(3, 64, 64))
    assert sum(s.kind == "residual" for s in retrofit.find_sites(once, (3, 64, 64))) == 8
    twice = retrofit.add_se(once, input_size=(3, 64, 64)).eval()
    assert calls(twice.layer1[0]) == [("se", 1), ("se_2", 2)]
    with torch.no_grad():
        assert torch.equal(twice(X), plain(X))  # preserving init: still exactly the original


class Nested(nn.Module):
    """A residual unit whose branch ends in an inner unit's sum, both in one forward."""

    def __init__(self, c=16):
        super().__init__()
        self.stem, self.c1 = nn.Conv2d(3, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        self.c2, self.c3 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        x = self.stem(x)
        y = self.c1(x)
        y = y + self.c3(torch.relu(self.c2(y)))
        return x + y


def test_nested_sums_in_one_forward():
    net = Nested().eval()
    torch.manual_seed(2)
    fused = retrofit.add_se(net, r=4, init="paper", input_size=(3, 64, 64)).eval()
    reference = unfused(net, r=4, init="paper")
    reference.load_state_dict(fused.state_dict())
    assert [b.path for b in retrofit.get_info(fused).blocks] == [b.path for b in retrofit.get_info(reference).blocks]
    assert len(retrofit.get_info(fused).blocks) == 2 and all(k == 2 for _, k in calls(fused))
    with torch.no_grad():
        torch.testing.assert_close(
            fused(X), reference(X), rtol=1e-5, atol=1e-5
        )  # addcmul rounds once (an FMA), x * s + y twice
