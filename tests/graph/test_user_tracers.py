"""Users' fx tools on a retrofitted model (issue 17, items 3 and 4).

A retrofitted model must stay as traceable as the one the user brought: ``torch.fx.symbolic_trace``
and torchvision's ``get_graph_node_names`` / ``create_feature_extractor``, with no timm leaf list,
trace into the channels-last block (they do not know timm's notrace registry), and the graph they
make must compute what the model computes (the reference: the model's own eager output, with the
blocks moved off the identity so a dropped block shows). A user's trace that fails part-way must
leave the model exactly as it was.
"""

import copy
import re
import warnings

import pytest
import timm
import torch
import torchvision
from conftest import randomize
from torch import fx, nn
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import retrofit
from retrofit.blocks.se import SqueezeExcite
from retrofit.graph.forward import traced_as_root
from support import DropBranch, Net, moved_off_identity

# small configurations of the token-layout (ViT, Swin) and channels-last (ConvNeXt) models
MODELS = {
    "tv_vit": (
        lambda: torchvision.models.VisionTransformer(
            image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
        ),
        32,
    ),
    "tv_swin": (
        lambda: torchvision.models.SwinTransformer(
            patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=[2, 2], num_classes=10
        ),
        32,
    ),
    "tv_convnext": (lambda: ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=10), 32),
    "timm_vit": (lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=10), 32),
    "timm_swin": (
        lambda: timm.create_model(
            "swin_tiny_patch4_window7_224",
            img_size=32,
            window_size=2,
            depths=(1, 1),
            embed_dim=16,
            num_heads=(1, 2),
            num_classes=10,
        ),
        32,
    ),
    "timm_convnext": (lambda: timm.create_model("convnext_atto", num_classes=10), 32),
}
# the other token-layout models the suite retrofits (tests/graph/test_timm_checks.py)
TOKENS = {
    "timm_xcit": (lambda: timm.create_model("xcit_nano_12_p16_224", img_size=32, depth=2, num_classes=10), 32)
}  # not levit_128s: timm's attention-bias cache keeps a user tracer's Proxies (on the original too)
# the models whose forward differs between train and eval mode that the suite retrofits
TWO_MODES = {
    "drop_branch": (lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), DropBranch(), DropBranch()), 8),
    "timm_vit_attn_drop": (
        lambda: timm.create_model(
            "vit_pwee_patch16_reg1_gap_256", depth=2, img_size=32, attn_drop_rate=0.2, num_classes=10
        ),
        32,
    ),
}


def retrofitted(build, side):
    """The model retrofitted, its blocks moved off the identity as a fine-tune moves them; eval mode."""
    torch.manual_seed(0)
    plain = randomize(build()).eval()
    se = retrofit.add_se(plain, r=4, input_size=(3, side, side)).eval()
    g = torch.Generator().manual_seed(1)
    return moved_off_identity(se, plain, g), torch.randn(2, 3, side, side, generator=g)


@pytest.mark.parametrize("name", list(MODELS))
def test_users_fx_tools_trace_a_retrofitted_model(name):
    se, x = retrofitted(*MODELS[name])
    with torch.no_grad():
        reference = se(x)
        torch.testing.assert_close(fx.symbolic_trace(se)(x), reference)  # the blocks are in the graph
        train_nodes, eval_nodes = get_graph_node_names(se)
        assert not se.training  # torchvision puts the mode back only when both traces succeed
        extractor = create_feature_extractor(
            se, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]]
        ).eval()
        (out,) = extractor(x).values()
        torch.testing.assert_close(out, reference)
    assert not se.training
    assert any(isinstance(m, SqueezeExcite) for m in se.modules())


class FailingTracer(fx.Tracer):
    """A user's tracer that raises part-way: at its ``k``-th module call, or at the first call of a
    retrofit block (``k`` None)."""

    def __init__(self, k=None):
        super().__init__()
        self.k, self.calls = k, 0

    def call_module(self, m, forward, args, kwargs):
        self.calls += 1
        if self.calls == self.k or (self.k is None and isinstance(m, SqueezeExcite)):
            raise RuntimeError("the user's tracer failed")
        return super().call_module(m, forward, args, kwargs)


def state_of(model):
    """What a trace could leave changed: every module's attributes (tensors by value) and its
    class's dictionary."""
    modules = []
    for name, m in model.named_modules():
        # fx's Tracer.create_arg puts each tensor constant it meets on the root (``_tensor_constant0``...),
        # on the original model as well (timm's Swin): torch.fx's doing, not a state retrofit set
        values = {
            k: copy.copy(v) if isinstance(v, (dict, list, set)) else v
            for k, v in vars(m).items()
            if k not in ("_parameters", "_buffers", "_modules") and not re.fullmatch(r"_tensor_constant\d+", k)
        }
        tensors = {k: t.detach().clone() for k, t in [*m._parameters.items(), *m._buffers.items()] if t is not None}
        modules.append((name, values, tensors, dict(m._modules)))
    classes = {c: {k: v for k, v in vars(c).items() if k != "__annotations__"} for c in map(type, model.modules())}
    return modules, classes


def same(a, b):
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    return type(a) is type(b) and a == b


def assert_same_state(before, after):
    (modules, classes), (modules_after, classes_after) = before, after
    assert len(modules) == len(modules_after)
    for (name, values, tensors, children), (_, values2, tensors2, children2) in zip(modules, modules_after):
        assert values.keys() == values2.keys() and all(same(values[k], values2[k]) for k in values), name
        assert tensors.keys() == tensors2.keys() and all(torch.equal(tensors[k], tensors2[k]) for k in tensors), name
        assert children == children2, name
    assert classes == classes_after


def outputs(model, x):
    """The eval output, and the train-mode output under a fixed seed (dropout and drop-path draws) of
    a copy (a train-mode forward updates BatchNorm's running statistics)."""
    with torch.no_grad():
        result = [model(x)]
        twin = copy.deepcopy(model).train()
        torch.manual_seed(0)
        return result + [twin(x)]


@pytest.mark.parametrize("name", [*MODELS, *TOKENS, *TWO_MODES])
def test_a_failed_user_trace_leaves_the_model_as_it_was(name):
    se, x = retrofitted(*{**MODELS, **TOKENS, **TWO_MODES}[name])
    before, state = outputs(se, x), state_of(se)
    counter = FailingTracer(k=0)
    counter.trace(se)  # a whole trace, counting the module calls: then fail at the first block, early, halfway, last
    for k in (None, 2, counter.calls // 2, counter.calls):
        with pytest.raises(RuntimeError, match="the user's tracer failed"):
            FailingTracer(k).trace(se)
        assert_same_state(state, state_of(se))
    for a, b in zip(before, outputs(se, x)):
        assert torch.equal(a, b)


def test_a_failed_trace_of_a_rewritten_root_restores_its_class():
    """``traced_as_root`` (how a tracer traces a root whose own forward was rewritten) puts the
    installed code on the class while tracing: a trace that raises must take it off again."""
    torch.manual_seed(0)
    with pytest.warns(retrofit.RetrofitWarning, match="forward of the model itself"):
        se = retrofit.add_se(randomize(Net()), position="post", r=4, input_size=(3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    before, state = outputs(se, x), state_of(se)
    tracer = FailingTracer()
    with pytest.raises(RuntimeError, match="the user's tracer failed"), traced_as_root(tracer, se):
        tracer.trace(se)
    assert_same_state(state, state_of(se))
    assert tracer.traced_func_name == "forward"
    for a, b in zip(before, outputs(se, x)):
        assert torch.equal(a, b)


def test_a_block_in_the_roots_own_forward_is_said_once_with_the_way_out():
    """fx traces a root's class forward: blocks in the root's own forward are not in a user's trace
    (the reference: the retrofitted model's eager output). add_se says so in one warning and points to
    retrofitting a GraphModule, whose graph is its forward; blocks below the root need no notice."""
    torch.manual_seed(0)
    net, x = randomize(Net()).eval(), torch.randn(2, 3, 8, 8)
    with pytest.warns(retrofit.RetrofitWarning) as caught:
        se = retrofit.add_se(net, position="post", r=4, init="paper", input_size=(3, 8, 8)).eval()
    (notice,) = [str(w.message) for w in caught]
    assert "1 block(s) went into the forward of the model itself (Net)" in notice
    assert "retrofit.add_se(torch.fx.symbolic_trace(model))" in notice and "\n" not in notice
    with torch.no_grad():
        assert not torch.allclose(fx.symbolic_trace(se)(x), se(x))  # what the notice warns of
        gm = retrofit.add_se(fx.symbolic_trace(net), position="post", r=4, init="paper", input_size=(3, 8, 8))
        gm.load_state_dict(se.state_dict())
        torch.testing.assert_close(fx.symbolic_trace(gm)(x), se(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        retrofit.add_se(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), DropBranch()), r=4, input_size=(3, 8, 8))
