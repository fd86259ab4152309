"""With init 'preserve' the retrofitted network computes what the original did, and still learns."""
import pytest
import torch
from conftest import max_rel_diff

import retrofit
from retrofit.blocks.se import GATES, SqueezeExcite

GATE_NAMES = list(GATES)


def check(model, se_model, x, gate):
    with torch.no_grad():
        reference = model(x)
        out = se_model.eval()(x)
    assert max_rel_diff(out, reference) <= 1e-5
    if gate != "tanh":  # the block is then an exact identity, and the rebuilt forwards run the same ops
        assert torch.equal(out, reference)
    se_model.zero_grad()
    se_model(x).square().mean().backward()
    blocks = [m for m in se_model.modules() if isinstance(m, SqueezeExcite)]
    assert blocks
    for block in blocks:
        for name, p in block.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("position", ["standard", "pre", "post", "identity", "inside"])
@pytest.mark.parametrize("gate", GATE_NAMES)
def test_resnet50_every_position_and_gate(resnet50_random, position, gate):
    se = retrofit.add_se(resnet50_random, position=position, gate=gate, input_size=(3, 64, 64))
    check(resnet50_random, se, torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(7)), gate)


@pytest.mark.parametrize("position", ["standard", "pre", "post", "identity"])
@pytest.mark.parametrize("gate", GATE_NAMES)
def test_inception_v3_every_position_and_gate(inception_v3_random, position, gate):
    se = retrofit.add_se(inception_v3_random, position=position, gate=gate, input_size=(3, 96, 96))
    assert len(se._retrofit.blocks) == 11
    check(inception_v3_random, se, torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(8)), gate)


def test_inception_v3_has_no_site_for_inside(inception_v3_random):
    with pytest.raises(retrofit.RetrofitError, match="no site"):
        retrofit.add_se(inception_v3_random, position="inside", input_size=(3, 96, 96))


def test_paper_init_changes_the_function(resnet50_random):
    x = torch.randn(1, 3, 64, 64)
    se = retrofit.add_se(resnet50_random, init="paper", input_size=(3, 64, 64)).eval()
    with torch.no_grad():
        assert max_rel_diff(se(x), resnet50_random(x)) > 1e-3
