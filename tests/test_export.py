"""Export (issue 4, item 7): a retrofitted model exports like the original, with eager's outputs.

The rewritten forwards are Python functions installed on the module instances
(:mod:`retrofit.graph_forward`); these tests check that torch.export (non-strict, its default),
the ONNX exporter (torch.onnx.export, dynamo-based: needs the `export` extra) and torch.compile
(dynamo with fullgraph=True, so a graph break fails the test; backend aot_eager, because inductor's
C++ compilation of a resnet18 takes about 90 s on this project's 2-core machine) trace through them.
"""
import pytest
import timm
import torch

import retrofit

from conftest import randomize
from test_surgery import custom_net

SIZE = (3, 64, 64)


@pytest.fixture(scope="module")
def models():
    base = randomize(timm.create_model("resnet18"))
    x = torch.randn(2, *SIZE, generator=torch.Generator().manual_seed(2))
    # random blocks (init paper) so a block dropped by an exporter changes the outputs
    se = retrofit.add_se(base, init="paper", input_size=SIZE).eval()
    with torch.no_grad():
        assert not torch.allclose(se(x), base(x), atol=1e-3)
    return se, x


def close(a, b):
    return torch.allclose(torch.as_tensor(a), b, rtol=1e-4, atol=1e-5)


def test_torch_export_resnet18(models):
    se, x = models
    exported = torch.export.export(se, (x,))
    with torch.no_grad():
        assert close(exported.module()(x), se(x))
    assert "layer4.1.se.fc2.weight" in exported.state_dict  # the blocks' weights are in the program


def test_torch_export_graph_module():
    """A GraphModule keeps its forward in its graph; a plain custom network is exported by the tutorial."""
    net, x = custom_net(), torch.randn(2, 3, 32, 32)
    original = torch.fx.symbolic_trace(net)
    model = retrofit.add_se(original, position="inside", module="cbam", init="paper", r=4, input_size=(3, 32, 32)).eval()
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        assert close(exported.module()(x), model(x)) and not close(model(x), original(x))


def test_torch_compile_resnet18_without_graph_breaks(models):
    se, x = models
    torch._dynamo.reset()
    compiled = torch.compile(se, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert close(compiled(x), se(x))


def test_onnx_export_resnet18(models):
    pytest.importorskip("onnxscript", reason="the ONNX exporter needs the `export` extra (onnx, onnxscript)")
    ort = pytest.importorskip("onnxruntime", reason="running the ONNX model needs the `export` extra")
    se, x = models
    program = torch.onnx.export(se, (x,), dynamo=True, verbose=False)
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert close(out, se(x))
