"""A rewritten forward follows its module's attributes: timm's ``set_input_size`` (new windows, a shift
turned on or off) then a forward computes what the original computes after the same call.

References: the unretrofitted model after the same call, in float64, with the preserving init (the
blocks are exact identities, so the outputs must be equal bit for bit). Where the blocks cannot follow,
one RetrofitError line, never another computation.
"""

import copy
import pickle

import pytest
import timm
import torch
from conftest import randomize
from timm.layers import get_notrace_functions, get_notrace_modules, set_layer_config
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import retrofit


def same_after(original, se, size, **change):
    """Outputs of both models after the same ``set_input_size(**change)``, on one ``size`` input."""
    original, se = copy.deepcopy(original), copy.deepcopy(se)
    original.set_input_size(**change)
    se.set_input_size(**change)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(size), dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(se(x), original(x), rtol=0, atol=0)
    return se


@pytest.fixture(scope="module")
def swin_tiny():
    original = randomize(timm.create_model("swin_tiny_patch4_window7_224")).double()
    return original, retrofit.add_se(original).eval()


def test_swin_tiny_after_set_input_size_computes_what_the_original_does(swin_tiny):
    """288: every window grows to 9 (49 -> 81 tokens each); 448 with window_size=7: the last stage (14x14)
    now shifts its windows, where at 224 (7x7, one window) it did not."""
    original, se = swin_tiny
    blocks = [m for m in se.modules() if type(m).__name__ == "SwinTransformerBlock"]
    assert len(retrofit.get_info(se).blocks) == 2 * len(blocks) == 24
    same_after(original, se, 288, img_size=(288, 288))
    after = same_after(original, se, 448, img_size=(448, 448), window_size=7)
    last = after.layers[3].blocks[1]
    assert last.shift_size == (3, 3) and "roll" in last.forward.code  # derived again: the shift is in it


FAMILIES = {  # tiny configurations; (input size, set_input_size arguments)
    "swinv2_tiny_window8_256": (
        dict(embed_dim=24, depths=(2, 2, 2, 2), num_heads=(1, 1, 1, 1)),
        [(320, dict(img_size=(320, 320))), (512, dict(img_size=(512, 512), window_size=8))],
    ),
    "swinv2_cr_tiny_ns_224": (
        dict(embed_dim=24, depths=(2, 2, 2, 2), num_heads=(1, 1, 1, 1)),
        [(288, dict(img_size=(288, 288)))],
    ),
    "maxvit_pico_rw_256": ({}, [(320, dict(img_size=(320, 320)))]),
    # EVA's rope is a tensor its root makes outside the trace and passes each block: an input of the
    # rewritten block forward, not a constant of it
    "eva02_tiny_patch14_224": (dict(depth=2), [(252, dict(img_size=(252, 252)))]),
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_window_and_rope_families_after_set_input_size(name):
    kwargs, changes = FAMILIES[name]
    original = randomize(timm.create_model(name, **kwargs)).double()
    se = retrofit.add_se(original).eval()
    assert retrofit.get_info(se).blocks
    for size, change in changes:
        same_after(original, se, size, **change)


def test_script_pickle_copy_fx_and_a_second_retrofit_follow_too():
    """What reads a forward without calling it first: TorchScript (through ``__prepare_scriptable__``),
    pickle, deepcopy, torchvision's fx feature extraction, retrofit's own tracer."""
    with set_layer_config(scriptable=True):
        original = randomize(
            timm.create_model("swin_tiny_patch4_window7_224", embed_dim=24, depths=(2, 2, 2, 2), num_heads=(1, 1, 1, 1))
        ).double()
    se = retrofit.add_se(original).eval()
    original.set_input_size(img_size=(288, 288))
    se.set_input_size(img_size=(288, 288))
    x = torch.randn(1, 3, 288, 288, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    tracer = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    with torch.no_grad():
        expected = original(x)
        torch.testing.assert_close(torch.jit.script(copy.deepcopy(se))(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(pickle.loads(pickle.dumps(se))(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(copy.deepcopy(se)(x), expected, rtol=0, atol=0)
        train_nodes, eval_nodes = get_graph_node_names(se, tracer_kwargs=tracer)
        extractor = create_feature_extractor(
            se, train_return_nodes=train_nodes[-1:], eval_return_nodes=eval_nodes[-1:], tracer_kwargs=tracer
        ).eval()
        torch.testing.assert_close(next(iter(extractor(x).values())), expected, rtol=0, atol=0)
        twice = retrofit.add_se(se, position="post", input_size=(3, 288, 288)).eval()
        assert len(retrofit.get_info(twice).blocks) == 2 * len(retrofit.get_info(se).blocks)
        torch.testing.assert_close(twice(x), expected, rtol=0, atol=0)


class Unit(nn.Module):
    """A residual unit whose forward reads two of its attributes: a roll of the branch, and whether to
    add the shortcut at all."""

    def __init__(self, c=8):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        self.shift = 0
        self.residual = True

    def forward(self, x):
        y = self.conv2(torch.relu(self.conv1(x)))
        if self.shift:
            y = torch.roll(y, self.shift, dims=2)
        return x + y if self.residual else y


def test_a_changed_attribute_is_followed_or_refused_in_one_line():
    original = randomize(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Unit())).double()
    se = retrofit.add_se(original, init="paper", input_size=(3, 16, 16)).eval()  # blocks that change the output
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        before = se(x)
        original[1].shift = se[1].shift = 3
        # the block stays on the branch, before the sum: after the roll now (reference: the same model's
        # block applied by hand to the rolled branch, fused with the sum as the standard position is)
        branch = torch.roll(se[1].conv2(torch.relu(se[1].conv1(se[0](x)))), 3, dims=2)
        torch.testing.assert_close(se(x), se[1].se(branch, se[0](x)), rtol=0, atol=0)
        assert not torch.equal(se(x), before)
        se[1].shift = 0
        torch.testing.assert_close(se(x), before, rtol=0, atol=0)
        se[1].residual = False  # no sum left for the block to go before: refused, not computed otherwise
        with pytest.raises(
            retrofit.RetrofitError,
            match=r"^Unit was retrofitted for other values of residual: "
            r"True -> False.*retrofit the model after the change",
        ):
            se(x)
