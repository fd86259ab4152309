"""The installed forward (retrofit/graph/forward.py) under what people do with a model: replicate it
for nn.DataParallel, pickle it, script it, build it on the meta device, switch train/eval mode.

Each test of a defect found from outside (issue 10, item 5) failed on the code before the fix."""

import copy
import io

import pytest
import timm
import torch
from conftest import randomize
from timm.models._features_fx import create_feature_extractor, get_graph_node_names
from torch import fx, nn

import retrofit
from retrofit.blocks.se_layout import ChannelsLastSqueezeExcite
from retrofit.graph.forward import install_forward, installed
from support import DropBranch

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def resnet():
    model = randomize(timm.create_model("resnet10t", num_classes=10))
    return model, retrofit.add_se(model, init="paper", input_size=(3, 32, 32))


def replicate_like_data_parallel(network: nn.Module, params: dict) -> nn.Module:
    """What torch.nn.parallel.replicate does for one device, on the cpu: every module's
    _replicate_for_data_parallel(), then children, parameters (the device's copies: ``params``) and
    buffers set on the replicas."""
    modules = list(network.modules())
    copies = [m._replicate_for_data_parallel() for m in modules]
    index = {m: i for i, m in enumerate(modules)}
    for module, replica in zip(modules, copies):
        for key, child in module._modules.items():
            if child is None:
                replica._modules[key] = None
            else:
                setattr(replica, key, copies[index[child]])
        for key, param in module._parameters.items():
            if param is None:
                replica._parameters[key] = None
            else:
                setattr(replica, key, params[param])  # replicas hold plain tensors, not Parameters
        for key, buf in module._buffers.items():
            setattr(replica, key, buf)
    return copies[0]


def test_data_parallel_replica_computes_with_its_own_weights(resnet):
    _, se = resnet
    with torch.no_grad():
        before = se(X)
        doubled = {p: p.detach() * 2 for p in se.parameters()}  # what the replica's device holds
        replica = replicate_like_data_parallel(se, doubled)
        reference = copy.deepcopy(se)
        for p in reference.parameters():
            p.mul_(2)
        expected = reference(X)
        assert not torch.allclose(expected, before, atol=1e-3)
        torch.testing.assert_close(replica(X), expected)
        assert installed(replica.layer1[0]).module is replica.layer1[0]
        torch.testing.assert_close(se(X), before)  # the original keeps its own


def test_torch_save_of_inception_v3(inception_v3_random):
    """F.max_pool2d is a local boolean_dispatch wrapper: the pickled graph names it by import."""
    se = retrofit.add_se(inception_v3_random, init="paper", input_size=(3, 75, 75))
    x = torch.randn(1, 3, 75, 75)
    buffer = io.BytesIO()
    torch.save(se, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), se(x))
        torch.testing.assert_close(copy.deepcopy(loaded)(x), se(x))  # an EMA copy of the loaded model
    assert any(installed(m) is not None for m in loaded.modules())


def test_a_forward_that_pickle_cannot_name_is_one_clear_error():
    def local_relu(x):  # a function pickle cannot import
        return x.clamp(min=0)

    module = nn.Sequential(nn.Conv2d(2, 2, 1))
    graph = fx.symbolic_trace(module).graph
    out = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(out):
        relu = graph.call_function(local_relu, (out.args[0],))
    out.args = (relu,)
    install_forward(module, graph)
    with pytest.raises(retrofit.RetrofitError, match="rewritten forward of Sequential.*retrofit.save"):
        torch.save(module, io.BytesIO())


def test_torch_jit_script_of_a_retrofitted_timm_model(resnet):
    _, se = resnet
    scripted = torch.jit.script(se)
    with torch.no_grad():
        torch.testing.assert_close(scripted(X), se(X))
    assert "self.se" in getattr(scripted.layer1, "0").code  # the rewritten forward, not the class's


def test_script_of_an_fx_trace_of_a_token_block():
    """timm's fx feature extraction keeps the token-layout SE block as a leaf; scripting the traced
    model compiles the block's forward (no tuple of a range, no starred arguments)."""
    model = randomize(timm.create_model("vit_tiny_patch16_224", depth=1, img_size=32, num_classes=10))
    se = retrofit.add_se(model, init="paper", input_size=(3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    _, nodes = get_graph_node_names(se)
    traced = create_feature_extractor(se, return_nodes=[nodes[-1]]).eval()
    assert any(isinstance(m, ChannelsLastSqueezeExcite) for m in traced.modules())
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(traced)(x)[nodes[-1]], se(x))


def test_a_second_retrofit_of_a_rewritten_root_keeps_the_first_blocks():
    """fx traces a root's class forward; retrofit's tracer traces the forward installed on it."""

    class Net(nn.Module):  # the residual sum is in the model's own forward
        def __init__(self):
            super().__init__()
            self.stem, self.conv, self.bn = (
                nn.Conv2d(3, 8, 3, padding=1),
                nn.Conv2d(8, 8, 3, padding=1),
                nn.BatchNorm2d(8),
            )

        def forward(self, x):
            x = self.stem(x)
            return x + self.bn(self.conv(x))

    net, x = randomize(Net()), torch.randn(2, 3, 8, 8)
    once = retrofit.add_se(net, init="paper", r=4, input_size=(3, 8, 8))
    twice = retrofit.add_se(once, init="paper", r=4, position="post", input_size=(3, 8, 8))
    with torch.no_grad():
        torch.testing.assert_close(twice(x), twice.se_post(once(x)))


def test_scripted_modules_of_one_class_keep_their_own_forwards():
    """TorchScript compiles one forward per class and attribute set; a rewritten module must not
    share the class's (or another rewrite's) code."""

    class Unit(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)

        def forward(self, x):
            return x + self.conv(x)

    plain, rewritten = Unit(), Unit()
    graph = fx.symbolic_trace(rewritten).graph
    for node in graph.nodes:
        if node.op == "call_function":
            node.target = torch.sub
    install_forward(rewritten, graph)
    model, x = nn.Sequential(plain, rewritten), torch.randn(1, 2, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(model)(x), model(x))


def test_add_se_on_a_meta_device_model():
    with torch.device("meta"):
        model = timm.create_model("resnet10t", num_classes=10)
        se = retrofit.add_se(model, input_size=(3, 32, 32))
        eca = retrofit.add_se(model, module="eca", input_size=(3, 32, 32))
    assert se.layer1[0].se.fc1.weight.is_meta and eca.layer1[0].se.conv.weight.is_meta
    real = retrofit.add_se(randomize(timm.create_model("resnet10t", num_classes=10)), input_size=(3, 32, 32))
    assert se.layer1[0].se.gate_origin == real.layer1[0].se.gate_origin == 0.5
    se.load_state_dict(real.state_dict(), assign=True)  # materialised from real weights
    se.eval()
    with torch.no_grad():
        torch.testing.assert_close(se(X), real(X))


def assert_preserves_in_both_modes(model, se, x):
    for mode in (True, False):
        model.train(mode), se.train(mode)
        torch.manual_seed(0)  # the same random drops in both
        expected = model(x)
        torch.manual_seed(0)
        torch.testing.assert_close(se(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("traced_in", ["train", "eval"])
def test_a_train_eval_dependent_forward_preserves_in_both_modes(traced_in):
    model = randomize(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), DropBranch(), DropBranch()))
    model.train(traced_in == "train")
    se = retrofit.add_se(model, r=4, input_size=(3, 8, 8))
    assert [b.path for b in retrofit.get_info(se).blocks] == ["1.se", "2.se"] and installed(se[1]).two_modes
    x = torch.randn(4, 3, 8, 8)
    assert_preserves_in_both_modes(model, se, x)
    twice = retrofit.add_se(se, r=4, position="post", input_size=(3, 8, 8))  # from the graphs of both modes
    assert len(retrofit.get_info(twice).blocks) == 4 and not retrofit.get_info(twice).skipped
    assert_preserves_in_both_modes(model, twice, x)
    paper = retrofit.add_se(model, r=4, init="paper", input_size=(3, 8, 8))
    scripted = torch.jit.script(paper)
    outputs = []
    for mode in (True, False):  # the scripted model switches mode too (with the same random drops)
        paper.train(mode), scripted.train(mode)
        torch.manual_seed(0)
        outputs.append(paper(x))
        torch.manual_seed(0)
        torch.testing.assert_close(scripted(x), outputs[-1])
    assert not torch.allclose(*outputs)


def test_a_timm_block_with_a_train_eval_dependent_forward():
    """timm's ParallelScalingBlock passes dropout_p only in train mode (attn_drop_rate > 0): its
    forward is rebuilt in both modes, and the model preserves in both (the same random dropout)."""
    model = randomize(
        timm.create_model("vit_pwee_patch16_reg1_gap_256", depth=2, img_size=32, attn_drop_rate=0.2, num_classes=10)
    )
    se = retrofit.add_se(model, input_size=(3, 32, 32))
    assert all(installed(b).two_modes for b in se.blocks)
    assert_preserves_in_both_modes(model, se, torch.randn(2, 3, 32, 32))
