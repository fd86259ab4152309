"""timm's own model checks (those of timm's tests/test_models.py), run on retrofitted models.

The test bodies are written here, after timm's: forward, backward (every parameter gets a gradient,
the new blocks' included), torchscript, fx forward/backward and fx + torchscript (timm's feature
extraction, torchvision's train/eval graph pair), intermediates (what ``features_only`` models return),
gradient checkpointing with a training step; plus what people deploy with: forward_features /
forward_head, reset_classifier, pretrained_cfg, bfloat16 and float16, channels_last, deepcopy and
pickle. One model per family, small configurations and inputs, ``num_classes=10``.

``preserve`` (the default init) must give the original's outputs exactly; ``paper`` (random blocks)
must change them, so a check that lost the blocks on the way would fail.
"""

import copy
import pickle
from types import SimpleNamespace
from unittest import mock

import pytest
import timm
import torch
import torch.utils.checkpoint
from conftest import randomize
from timm.layers import get_notrace_functions, get_notrace_modules, set_layer_config
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import retrofit

MODELS = {  # name: (input size, creation arguments)
    "resnet10t": (32, {}),
    "regnetx_002": (32, {}),
    "mobilenetv3_small_050": (32, {}),
    "tinynet_e": (32, {}),  # EfficientNet
    "convnext_atto": (32, {}),
    "resnest14d": (32, {}),
    "inception_v3": (75, {}),
    "vit_tiny_patch16_224": (32, dict(depth=2, img_size=32)),
    "xcit_nano_12_p16_224": (32, dict(depth=2, img_size=32)),
    "swin_tiny_patch4_window7_224": (
        64,
        dict(depths=(1, 1, 1, 1), embed_dim=24, num_heads=(1, 1, 1, 1), window_size=2, img_size=64),
    ),
    "levit_128s": (64, dict(img_size=64)),  # attention biases cached in eval mode
}
TRACER = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())  # timm's fx setup


@pytest.fixture(scope="module", params=list(MODELS))
def case(request):
    size, kwargs = MODELS[request.param]
    with set_layer_config(scriptable=True):  # as timm's torchscript test builds its models
        original = randomize(timm.create_model(request.param, num_classes=10, **kwargs))
    se = retrofit.add_se(original, input_size=(3, size, size)).eval()
    paper = copy.deepcopy(se)
    for block in retrofit.get_info(paper).blocks:
        paper.get_submodule(block.path).reset_parameters("paper")
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    return SimpleNamespace(name=request.param, original=original, se=se, paper=paper, x=x)


def blocks_of(model, case):
    return [model.get_submodule(b.path) for b in retrofit.get_info(case.se).blocks]


def test_forward(case):
    with torch.no_grad():
        out, paper = case.se(case.x), case.paper(case.x)
        assert out.shape == (2, 10) and torch.isfinite(out).all()
        torch.testing.assert_close(out, case.original(case.x), rtol=0, atol=0)
        assert not torch.allclose(paper, out, atol=1e-4)


def test_backward(case):
    model = copy.deepcopy(case.se).train()
    model(case.x).mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    for block in blocks_of(model, case):  # the preserving init still trains every block parameter
        assert all(p.grad.abs().sum() > 0 for p in block.parameters())


def test_torchscript(case):
    scripted = torch.jit.script(case.paper)
    with torch.no_grad():
        torch.testing.assert_close(scripted(case.x), case.paper(case.x))


def test_fx_forward_backward_and_torchscript(case):
    """timm's fx check: the feature extractor of the last node, traced in train and eval mode."""
    train_nodes, eval_nodes = get_graph_node_names(case.paper, tracer_kwargs=TRACER)
    fx_model = create_feature_extractor(
        case.paper, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=TRACER
    ).eval()
    with torch.no_grad():
        (out,) = fx_model(case.x).values()
        torch.testing.assert_close(out, case.paper(case.x))
        (scripted,) = torch.jit.script(fx_model)(case.x).values()
        torch.testing.assert_close(scripted, out)
    fx_model.train()
    sum(v.mean() for v in fx_model(case.x).values()).backward()
    assert [n for n, p in fx_model.named_parameters() if p.grad is None] == []


def test_forward_intermediates(case):
    ours = case.se.forward_intermediates(case.x, intermediates_only=True)
    theirs = case.original.forward_intermediates(case.x, intermediates_only=True)
    paper = case.paper.forward_intermediates(case.x, intermediates_only=True)
    assert len(ours) == len(theirs) > 1
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(paper, theirs))


def test_grad_checkpointing_training_step(case):
    model, reference = copy.deepcopy(case.paper).train(), copy.deepcopy(case.paper).train()
    try:
        case.original.set_grad_checkpointing(True)
    except AssertionError:  # timm has no checkpointing for this model (inception_v3): neither has ours
        case.original.set_grad_checkpointing(False)
        with pytest.raises(AssertionError, match="not supported"):
            model.set_grad_checkpointing(True)
        return
    case.original.set_grad_checkpointing(False)
    model.set_grad_checkpointing(True)
    with mock.patch.object(torch.utils.checkpoint, "checkpoint", wraps=torch.utils.checkpoint.checkpoint) as spy:
        torch.manual_seed(0)  # the same drop-path draws (swin's default drop_path_rate) in both runs
        model(case.x).mean().backward()
    assert spy.called
    torch.manual_seed(0)
    reference(case.x).mean().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    before = [b.fc2.bias.clone() for b in blocks_of(model, case)]
    torch.optim.SGD(model.parameters(), lr=0.1).step()  # the step reaches every block
    assert all(not torch.equal(b.fc2.bias, w) for b, w in zip(blocks_of(model, case), before))


def test_forward_features_and_head(case):
    with torch.no_grad():
        ours, theirs = case.se.forward_features(case.x), case.original.forward_features(case.x)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        torch.testing.assert_close(case.se.forward_head(ours), case.original.forward_head(theirs), rtol=0, atol=0)
        torch.testing.assert_close(case.paper.forward_head(case.paper.forward_features(case.x)), case.paper(case.x))


def rel(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def test_half_bfloat16_and_channels_last(case):
    """In float16/bfloat16 the block's constants are rounded (the preserving init is exact in float32),
    so the outputs are the original's to that precision: as far from the float32 outputs as the
    original's own at most twice (non-finite where the random-weight original overflows)."""
    with torch.no_grad():
        reference = case.original(case.x)
        for dtype in (torch.float16, torch.bfloat16):
            ours = copy.deepcopy(case.se).to(dtype)(case.x.to(dtype))
            theirs = copy.deepcopy(case.original).to(dtype)(case.x.to(dtype))
            assert ours.dtype == dtype
            finite = torch.isfinite(theirs)
            assert torch.equal(torch.isfinite(ours), finite)
            if finite.all():
                assert rel(ours, reference) <= 2 * rel(theirs, reference) + 1e-3
        ours = copy.deepcopy(case.se).to(memory_format=torch.channels_last)
        theirs = copy.deepcopy(case.original).to(memory_format=torch.channels_last)
        x = case.x.to(memory_format=torch.channels_last)
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)


def test_copies_classifier_and_config(case):
    with torch.no_grad():
        expected = case.paper(case.x)
        torch.testing.assert_close(pickle.loads(pickle.dumps(case.paper))(case.x), expected)
        twin = copy.deepcopy(case.paper)
        for p in blocks_of(twin, case)[0].parameters():
            p.add_(1.0)  # the copy is independent
        torch.testing.assert_close(case.paper(case.x), expected)
        assert not torch.allclose(twin(case.x), expected)
    assert case.se.pretrained_cfg == case.original.pretrained_cfg
    assert case.se.feature_info == case.original.feature_info
    model = copy.deepcopy(case.paper)
    model.reset_classifier(5)
    with torch.no_grad():
        assert model(case.x).shape == (2, 5)
        torch.testing.assert_close(model.forward_features(case.x), case.paper.forward_features(case.x))
