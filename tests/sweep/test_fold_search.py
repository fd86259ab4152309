"""retrofit.fold: which gates go at each tolerance, its cost bound counted, and the folded model is still a
retrofit model (files, card, fine-tune, strip, export)."""

import copy
import json
import math

import pytest
import timm
import torch
from conftest import randomize
from safetensors import safe_open

import retrofit
import retrofit.train.inspect as inspect_module
from retrofit.surgery.fold import gates, info_of
from support import CLASSES, FAST, make_folder, se_model

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("fold"))


def moved(model, varying=(1,), seed=3):
    """Every gate's constant moved off 1 (fc2's bias); the gates ``varying`` made input-dependent."""
    g = torch.Generator().manual_seed(seed)
    found = gates(model)[0]
    with torch.no_grad():
        for b in found:
            model.get_submodule(b.path).fc2.bias.copy_(torch.randn(b.channels, generator=g))
        for i in varying:
            model.get_submodule(found[i].path).fc1.weight.normal_(generator=g)
    return model.eval()


def test_tolerance_zero_folds_exactly_the_input_independent_gates_without_data():
    model = moved(se_model())
    result = retrofit.fold(model)
    assert [b.path for b in result.blocks] == ["layer1.0.se", "layer3.0.se", "layer4.0.se"]
    assert all(b.constant and b.into == "norm" for b in result.blocks)
    assert result.before is None and result.evaluations == 0
    with torch.no_grad():
        torch.testing.assert_close(result.model.eval()(X), model(X), rtol=1e-5, atol=1e-6)
    assert [b.path for b in info_of(result.model).blocks] == ["layer2.0.se"]  # the input-dependent one stays
    saved = sum(b.params_saved for b in result.blocks)
    assert result.overhead_before.added_params - result.overhead_after.added_params == saved > 0
    assert "layer1.0.se" in dict(model.named_modules())  # the model given is not changed


def test_tolerance_needs_data_and_a_range():
    model = moved(se_model())
    with pytest.raises(retrofit.RetrofitError, match="needs|need"):
        retrofit.fold(model, tolerance=0.5)
    for bad in (-0.1, 100.5, float("nan"), "1", True):
        with pytest.raises(retrofit.RetrofitError, match="tolerance must be"):
            retrofit.fold(model, tolerance=bad)
    with pytest.raises(retrofit.RetrofitError, match="names no block"):
        retrofit.fold(model, blocks=["layer9.*"])


def resnet18_8_gates():
    torch.manual_seed(0)
    plain = randomize(timm.create_model("resnet18", num_classes=CLASSES))
    return moved(retrofit.add_se(plain, input_size=(3, 32, 32), r=16), varying=range(8))


@pytest.mark.parametrize("tolerance", [0.0001, 100.0])
def test_the_search_costs_at_most_log2_blocks_plus_two_evaluations(data, monkeypatch, tolerance):
    """Counted at the evaluation function itself: every pass over the val images goes through it."""
    calls = []
    real = inspect_module.evaluate
    monkeypatch.setattr(inspect_module, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = resnet18_8_gates()
    result = retrofit.fold(model, data, tolerance=tolerance)
    assert len(calls) == result.evaluations <= math.log2(8) + 2  # 5, where one per gate would be 9
    assert result.candidates == 8
    assert result.after["top1"] >= result.before["top1"] - tolerance
    if tolerance == 100.0:  # every prefix passes: the bisection walks up to all 8
        assert len(result.blocks) == 8 and [p["folded"] for p in result.probes] == [4, 6, 7, 8]
    folded_by = [b.local_change for b in result.blocks]
    assert folded_by == sorted(folded_by)  # least input-dependent first


def test_blocks_fold_the_named_gates_by_their_mean(data):
    model = moved(se_model())
    result = retrofit.fold(model, data, blocks=["layer2.*"])
    assert [b.path for b in result.blocks] == ["layer2.0.se"] and not result.blocks[0].constant
    assert result.blocks[0].local_change > 0 and result.evaluations == 2
    with pytest.raises(retrofit.RetrofitError, match="depends on its input"):
        retrofit.fold(model, blocks=["layer2.*"])  # its mean needs the data


def test_a_folded_model_saves_and_loads_full_and_as_an_adapter(tmp_path):
    plain = randomize(timm.create_model("test_resnet", num_classes=CLASSES))
    from safetensors.torch import save_model

    save_model(plain, str(tmp_path / "plain.safetensors"))
    model = moved(se_model(plain=plain, position="identity"))  # a channel scale and norm folds
    folded = retrofit.fold(model).model.eval()
    with torch.no_grad():
        want = folded(X)
    retrofit.save(folded, tmp_path / "full.safetensors", card=True)
    with safe_open(tmp_path / "full.safetensors", "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["folds"])[:2] == [
        ["layer1.0.se_identity", "scale", ""],
        ["layer3.0.se_identity", "norm", "layer3.0.downsample.2"],
    ]
    assert meta["blocks"] == "4"
    card = (tmp_path / "full.README.md").read_text()
    assert "## Folded blocks" in card and "`layer3.0.downsample.2`" in card
    loaded = retrofit.load(tmp_path / "full.safetensors").eval()
    retrofit.save(folded, tmp_path / "adapter.safetensors", adapter=True)
    with safe_open(tmp_path / "adapter.safetensors", "pt") as f:
        keys = set(f.keys())
    assert {"layer3.0.downsample.2.weight", "layer3.0.downsample.2.bias", "layer1.0.se_identity.scale"} <= keys
    assert "layer1.0.conv1.weight" not in keys
    rebuilt = retrofit.load(tmp_path / "adapter.safetensors", base=tmp_path / "plain.safetensors").eval()
    with torch.no_grad():
        assert torch.equal(loaded(X), want) and torch.equal(rebuilt(X), want)
    assert info_of(loaded).folds == tuple(type(f)(f.path, f.into, f.neighbour) for f in info_of(folded).folds)


def test_fine_tune_trains_what_remains(data):
    model = moved(se_model(position="post"))  # channel scales and one live gate
    folded = retrofit.fold(model).model
    neighbours = {k: v.clone() for k, v in folded.state_dict().items() if ".se_post" not in k}
    before = {k: v.clone() for k, v in folded.state_dict().items() if ".se_post" in k}
    result = retrofit.finetune(folded, data, epochs=1, augment=False, **FAST)
    assert result.rows[-1]["name"] == "epoch 1"
    after = folded.state_dict()
    assert all(torch.equal(after[k], v) for k, v in neighbours.items() if "fc." not in k)  # backbone frozen
    assert not torch.equal(after["layer1.0.se_post.scale"], before["layer1.0.se_post.scale"])  # a scale trains
    assert not torch.equal(after["layer2.0.se_post.fc1.weight"], before["layer2.0.se_post.fc1.weight"])


def test_a_folded_model_exports_to_onnx():
    pytest.importorskip("onnxscript", reason="the ONNX exporter needs the `export` extra")
    ort = pytest.importorskip("onnxruntime", reason="running the ONNX model needs the `export` extra")
    folded = retrofit.fold(moved(se_model(position="identity"))).model.eval()
    program = torch.onnx.export(folded, (X,), dynamo=True, verbose=False, input_names=["x"])
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"x": X.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.as_tensor(out), folded(X), rtol=1e-4, atol=1e-5)


def test_fold_again_and_strip_after_all_blocks_are_gone():
    model = moved(se_model(), varying=())
    folded = retrofit.fold(model).model
    assert not info_of(folded).blocks and len(info_of(folded).gone) == 4
    with pytest.raises(retrofit.RetrofitError, match="no channel gate"):
        retrofit.fold(folded)
    plain = retrofit.strip(folded)
    assert plain.state_dict().keys() == se_model().state_dict().keys() - {
        k for k in se_model().state_dict() if ".se." in k
    }
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(X), folded.eval()(X), rtol=0, atol=0)
    assert info_of(copy.deepcopy(folded)).folds == info_of(folded).folds


def test_an_all_folded_model_fine_tunes_its_head_and_saves_its_run(data, tmp_path):
    """Nothing of the retrofit is left to train, but the model is still a retrofit model: its run saves."""
    folded = retrofit.fold(moved(se_model(), varying=())).model
    with pytest.raises(retrofit.RetrofitError, match="every block of this model was folded"):
        retrofit.finetune(folded, data, epochs=1, **FAST)
    retrofit.finetune(folded, data, epochs=1, train_head=True, output_dir=tmp_path / "run", augment=False, **FAST)
    best = retrofit.load(tmp_path / "run" / "best.safetensors")
    assert [f.path for f in info_of(best).folds] == [f.path for f in info_of(folded).folds]
    with torch.no_grad():
        torch.testing.assert_close(best.eval()(X), folded.eval()(X), rtol=0, atol=0)
