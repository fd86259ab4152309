"""With init 'preserve' the retrofitted network computes what the original did, and still learns."""

import pytest
import timm
import torch
from conftest import max_rel_diff, randomize
from timm.models.rexnet import LinearBottleneck

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
    assert len(retrofit.get_info(se).blocks) == 11
    check(inception_v3_random, se, torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(8)), gate)


def test_inception_v3_has_no_site_for_inside(inception_v3_random):
    with pytest.raises(retrofit.RetrofitError, match="no site"):
        retrofit.add_se(inception_v3_random, position="inside", input_size=(3, 96, 96))


def test_paper_init_changes_the_function(resnet50_random):
    x = torch.randn(1, 3, 64, 64)
    se = retrofit.add_se(resnet50_random, init="paper", input_size=(3, 64, 64)).eval()
    with torch.no_grad():
        assert max_rel_diff(se(x), resnet50_random(x)) > 1e-3


@pytest.fixture(scope="module")
def partial_and_norm_models():
    return {name: randomize(timm.create_model(name)) for name in ("convnextv2_atto", "rexnet_100")}


@pytest.mark.parametrize(
    ("name", "position"),
    [("convnextv2_atto", p) for p in ("standard", "pre", "post", "identity")]
    + [("rexnet_100", p) for p in ("standard", "pre", "post", "identity", "inside")],
)
def test_one_block_per_unit_of_convnextv2_and_rexnet(partial_and_norm_models, name, position):
    """One block per ConvNeXt-V2 block (none in its GlobalResponseNorm) and per ReXNet bottleneck with a
    shortcut (none on its closing concatenation), as wide as the tensor it scales; outputs preserved."""
    model = partial_and_norm_models[name]
    se = retrofit.add_se(model, position=position, input_size=(3, 32, 32))
    if name == "rexnet_100":
        units = [m for m in model.modules() if isinstance(m, LinearBottleneck) and m.use_shortcut]
        wide = {"standard": "out_channels", "post": "out_channels", "identity": "in_channels"}.get(position)
        if wide is not None:  # standard: all of the branch before it is split; identity: the shortcut
            assert [b.channels for b in retrofit.get_info(se).blocks] == [getattr(m, wide) for m in units]
    else:
        units = [m for m in model.modules() if type(m).__name__ == "ConvNeXtBlock"]
        assert not any(".grn." in b.path for b in retrofit.get_info(se).blocks)
    assert len(retrofit.get_info(se).blocks) == len(units)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    check(model, se, x, "sigmoid")
