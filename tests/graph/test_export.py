"""Export (issue 4, item 7; issue 10, item 4): a retrofitted model exports like the original, with
eager's outputs, with a dynamic batch and image size.

The rewritten forwards are Python functions installed on the module instances
(:mod:`retrofit.graph.forward`); these tests check that torch.export (non-strict, its default),
the ONNX exporter (torch.onnx.export, dynamo-based: needs the `export` extra; run in onnxruntime at
another batch and size than exported) and torch.compile
(dynamo with fullgraph=True, so a graph break fails the test; backend aot_eager, because inductor's
C++ compilation of a resnet18 takes about 90 s on this project's 2-core machine) trace through them.
"""

import pytest
import timm
import torch
from conftest import randomize
from torch.export import Dim

import retrofit
from support import custom_net

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


def test_torch_export_resnet18_with_dynamic_batch_and_size(models):
    se, x = models
    # from 64: below, the last map is 1x1, which the original resnet18 specialises on too
    batch, height, width = Dim("batch", min=1, max=64), Dim("height", min=64, max=512), Dim("width", min=64, max=512)
    exported = torch.export.export(se, (x,), dynamic_shapes={"x": {0: batch, 2: height, 3: width}})
    other = torch.randn(3, 3, 96, 80)
    with torch.no_grad():
        assert close(exported.module()(x), se(x)) and close(exported.module()(other), se(other))
    assert "layer4.1.se.fc2.weight" in exported.state_dict  # the blocks' weights are in the program


def test_torch_export_of_token_blocks_with_dynamic_batch_and_size():
    """A ViT's token-layout blocks (retrofit.blocks.se_layout) export with a dynamic grid too."""
    base = randomize(
        timm.create_model("vit_tiny_patch16_224", depth=2, img_size=32, dynamic_img_size=True, num_classes=10)
    )
    se = retrofit.add_se(base, init="paper", input_size=(3, 32, 32)).eval()
    x, other = torch.randn(2, 3, 32, 32), torch.randn(3, 3, 48, 64)
    exported = torch.export.export(se, (x,), dynamic_shapes={"x": {0: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO}})
    with torch.no_grad():
        assert close(exported.module()(other), se(other)) and not close(se(other), base(other))


def test_torch_export_graph_module():
    """A GraphModule keeps its forward in its graph; a plain custom network is exported by the tutorial."""
    net, x = custom_net(), torch.randn(2, 3, 32, 32)
    original = torch.fx.symbolic_trace(net)
    model = retrofit.add_se(
        original, position="inside", module="cbam", init="paper", r=4, input_size=(3, 32, 32)
    ).eval()
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        assert close(exported.module()(x), model(x)) and not close(model(x), original(x))


def test_torch_compile_resnet18_without_graph_breaks(models):
    se, x = models
    torch._dynamo.reset()
    compiled = torch.compile(se, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert close(compiled(x), se(x))


def test_onnx_export_resnet18_with_dynamic_axes(models):
    pytest.importorskip("onnxscript", reason="the ONNX exporter needs the `export` extra (onnx, onnxscript)")
    ort = pytest.importorskip("onnxruntime", reason="running the ONNX model needs the `export` extra")
    se, x = models
    program = torch.onnx.export(
        se,
        (x,),
        dynamo=True,
        verbose=False,
        input_names=["x"],
        dynamic_axes={"x": {0: "batch", 2: "height", 3: "width"}},
    )
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for inputs in (x, torch.randn(3, 3, 96, 80)):  # another batch and size than the exported one
        (out,) = session.run(None, {"x": inputs.numpy()})
        with torch.no_grad():
            assert close(out, se(inputs))
