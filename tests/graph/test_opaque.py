"""Models fx cannot trace as a whole: their forward is kept, the parts they call are retrofitted.

Each model of the issue: blocks in the traceable parts (which ones is asserted), outputs equal to the
original's under the preserving init in eval mode (a detector's boxes, scores, labels, masks) and in
training mode (losses, seeded alike), every block's parameters get gradients, and strip gives the
original back. Weights are randomised (tests/conftest.py): fresh ones would hide a wrong insertion.
"""

import pytest
import timm
import torch
from conftest import Residual, randomize
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models import detection, segmentation

import retrofit
from retrofit.measure.report import sites_json
from retrofit.surgery.sites import scan

SIDE = 128  # detectors resize every image to this (min_size = max_size): small, CPU-friendly


def blocks_of(se):
    return [b.path for b in retrofit.get_info(se).blocks]


def kept_of(traced):
    return {path for path, _ in traced.opaque}


def check_grads(se, loss):
    se.zero_grad()
    loss.backward()
    for path in blocks_of(se):
        for name, p in se.get_submodule(path).named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{path}.{name}"


def check_strip(se, model, run):
    """strip gives the original back: its state dict (keys and values, the norm statistics the training
    step moved included) and, in eval mode, its outputs; ``run(m)`` returns a list of tensors."""
    plain = retrofit.strip(se).eval()
    assert list(plain.state_dict()) == list(model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), model.state_dict().values()))
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(run(plain), run(model.eval())))


# -- torchvision detectors ---------------------------------------------------------------------------
RESNET50_UNITS = [f"backbone.body.layer{i}.{j}.se" for i, n in ((1, 3), (2, 4), (3, 6), (4, 3)) for j in range(n)]
DETECTORS = {  # builder, FPN merges: `pyramid` sites, off by default (their lateral 1x1 conv looks like a shortcut)
    "fasterrcnn_resnet50_fpn": (detection.fasterrcnn_resnet50_fpn, 3),
    "maskrcnn_resnet50_fpn": (detection.maskrcnn_resnet50_fpn, 3),
    "retinanet_resnet50_fpn": (detection.retinanet_resnet50_fpn, 2),  # FPN on layer2..4 only
}
# what each keeps as is: the model (loops over images), its transform, what gets an ImageList or sizes
KEPT = {
    "fasterrcnn_resnet50_fpn": {
        "",
        "transform",
        "rpn",
        "rpn.anchor_generator",
        "roi_heads",
        "roi_heads.box_roi_pool",
        "roi_heads.box_predictor",
    },
    "retinanet_resnet50_fpn": {"", "transform", "anchor_generator"},
}
KEPT["maskrcnn_resnet50_fpn"] = KEPT["fasterrcnn_resnet50_fpn"] | {"roi_heads.mask_roi_pool"}


# fewer proposals and detections than the defaults: the RoI heads' cost grows with them
FEW = {
    "rpn_pre_nms_top_n_test": 100,
    "rpn_post_nms_top_n_test": 50,
    "rpn_pre_nms_top_n_train": 100,
    "rpn_post_nms_top_n_train": 50,
    "box_batch_size_per_image": 32,
    "box_detections_per_img": 10,
}


def detector(name, max_size=SIDE):
    build, _ = DETECTORS[name]
    torch.manual_seed(0)
    few = FEW if "rcnn" in name else {"detections_per_img": 20}
    return randomize(build(weights=None, weights_backbone=None, num_classes=3, min_size=SIDE, max_size=max_size, **few))


def images_and_targets():
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, SIDE, SIDE, generator=g), torch.rand(3, 96, 120, generator=g)]
    targets = []
    for (h, w), box, label in zip(
        ((SIDE, SIDE), (96, 120)), ([10.0, 20.0, 60.0, 80.0], [5.0, 5.0, 50.0, 40.0]), (1, 2)
    ):
        mask = torch.zeros(1, h, w, dtype=torch.uint8)
        mask[0, int(box[1]) : int(box[3]), int(box[0]) : int(box[2])] = 1
        targets.append({"boxes": torch.tensor([box]), "labels": torch.tensor([label]), "masks": mask})
    return images, targets


@pytest.mark.parametrize("name", list(DETECTORS))
def test_detector(name):
    model = detector(name)
    se = retrofit.add_se(model)  # the input size comes from the transform: 3 x SIDE x SIDE
    assert sorted(blocks_of(se)) == sorted(RESNET50_UNITS)  # the FPN's merges are no residual units
    strides = {b.path.split(".")[2]: b.stride for b in retrofit.get_info(se).blocks if ".body." in b.path}
    assert strides == {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}  # of the resized image
    assert {s.where for s in retrofit.get_info(se).skipped if "kept as is" in s.reason} == {
        p or "<model>" for p in KEPT[name]
    }

    images, targets = images_and_targets()
    with torch.no_grad():
        reference, out = model(images), se.eval()(images)
    assert sum(len(r["boxes"]) for r in reference) > 0  # random weights still detect: something to compare
    for r, o in zip(reference, out):
        assert r.keys() == o.keys() and all(torch.equal(r[k], o[k]) for k in r)  # boxes, scores, labels, masks

    model.train(), se.train()
    torch.manual_seed(2)  # the RPN and RoI samplers draw from torch's generator
    losses = model(images, targets)
    torch.manual_seed(2)
    se_losses = se(images, targets)
    assert losses.keys() == se_losses.keys() and all(torch.equal(losses[k], se_losses[k]) for k in losses)
    check_grads(se, sum(se_losses.values()))

    check_strip(se, model, lambda m: [r[k] for r in m(images) for k in sorted(r)])


@pytest.mark.parametrize("name", list(DETECTORS))
def test_fpn_merges_are_pyramid_sites_off_by_default(name):
    """Issue 17, item 5: an FPN's top-down sums (a coarser map upsampled plus the lateral 1x1 conv) were
    taken for residual units with a projection shortcut, and got 3 of fasterrcnn's 19 blocks. They are
    sites of their own kind, which only `kinds` selects. The reference counts are torchvision's: 16
    bottlenecks in ResNet-50, one merge per FPN level below the top (4 levels; retinanet's FPN has 3)."""
    model = detector(name)
    found = scan(model, (3, SIDE, SIDE))
    assert sorted(s.module + ".se" for s in found.sites if s.kind == "residual") == sorted(RESNET50_UNITS)
    pyramid = [s for s in found.sites if s.kind == "pyramid"]
    assert len(pyramid) == DETECTORS[name][1] and {s.module for s in pyramid} == {"backbone.fpn"}
    assert found.summary().endswith(f"{DETECTORS[name][1]} pyramid") and "not a residual unit" in found.pyramid_note()
    se = retrofit.add_se(model, kinds=["residual", "pyramid"])
    fpn = [p for p in blocks_of(se) if p.startswith("backbone.fpn.")]
    assert len(fpn) == DETECTORS[name][1] and len(blocks_of(se)) == 16 + len(fpn)
    only = retrofit.add_se(model, kinds=["pyramid"], position="post")
    assert [p.rsplit(".", 1)[0] for p in blocks_of(only)] == ["backbone.fpn"] * DETECTORS[name][1]
    images, _ = images_and_targets()
    with torch.no_grad():
        for r, o in zip(model(images), se.eval()(images)):
            assert r.keys() == o.keys() and all(torch.equal(r[k], o[k]) for k in r)
    with pytest.raises(retrofit.RetrofitError, match="position 'identity' applies to residual and inception sites"):
        retrofit.add_se(model, kinds=["pyramid"], position="identity")


def test_sites_says_why_pyramid_merges_are_not_residual_units(monkeypatch):
    from typer.testing import CliRunner

    import retrofit.cli.sites

    monkeypatch.setattr("retrofit.files.create.build_named", lambda *args, **kwargs: detector("retinanet_resnet50_fpn"))
    result = CliRunner().invoke(retrofit.cli.app, ["sites", "retinanet", "--input-size", f"3,{SIDE},{SIDE}"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert sum(" pyramid " in line and "top-down + lateral" in line for line in lines) == 2  # the sites table
    (note,) = [line for line in lines if "pyramid site(s)" in line]
    assert (
        note.startswith(
            "2 pyramid site(s), feature-pyramid merges: a coarser map upsampled plus a lateral "
            "projection of this level, not a residual unit"
        )
        and "--kinds residual,pyramid" in note
    )


def test_detector_strides_are_of_the_image_its_backbone_sees():
    model = detector("fasterrcnn_resnet50_fpn", max_size=2 * SIDE)
    found = scan(model, (3, 64, 96))  # the transform scales it up to 128 x 192 (short side = min_size)
    assert found.traced.image_size == (SIDE, 192)
    units = {
        s.module.split(".")[2]: (s.size, s.stage) for s in found.sites if s.kind == "residual" and ".body." in s.module
    }
    assert units == {"layer1": ((32, 48), 2), "layer2": ((16, 24), 3), "layer3": ((8, 12), 4), "layer4": ((4, 6), 5)}


# -- segmentation and timm feature extractors (they trace whole: nothing is kept) ---------------------
def test_deeplabv3():
    torch.manual_seed(0)
    model = randomize(
        segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=3, aux_loss=True)
    )
    se = retrofit.add_se(model, input_size=(3, 64, 64))
    # 16 bottlenecks (dilated: layer3 and layer4 stay at stride 8) and ASPP's five-branch concatenation
    assert sorted(blocks_of(se)) == sorted(
        [p.replace("backbone.body.", "backbone.") for p in RESNET50_UNITS] + ["classifier.0.se"]
    )
    assert {b.stride for b in retrofit.get_info(se).blocks if b.path.startswith("backbone.layer4")} == {8}
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference, out = model(x), se.eval()(x)
    assert reference.keys() == out.keys() == {"out", "aux"}
    assert all(torch.equal(reference[k], out[k]) for k in reference)
    model.train(), se.train()
    torch.manual_seed(6)  # the heads' dropout
    train_ref = model(x)
    torch.manual_seed(6)
    train_out = se(x)
    assert all(torch.equal(train_ref[k], train_out[k]) for k in train_ref)
    check_grads(se, train_out["out"].square().mean())
    check_strip(se, model, lambda m: list(m(x).values()))


@pytest.mark.parametrize("feature_cls", ["list", "dict", "getter"])
def test_timm_features_only(feature_cls):
    kwargs = {} if feature_cls == "list" else {"feature_cls": feature_cls}
    model = randomize(timm.create_model("resnet18", features_only=True, **kwargs))
    assert (
        type(model).__name__
        == {"list": "FeatureListNet", "dict": "FeatureDictNet", "getter": "FeatureGetterNet"}[feature_cls]
    )
    se = retrofit.add_se(model, input_size=(3, 64, 64))
    prefix = "model." if feature_cls == "getter" else ""
    assert blocks_of(se) == [f"{prefix}layer{i}.{j}.se" for i in range(1, 5) for j in range(2)]
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))

    def values(out):
        return list(out.values()) if isinstance(out, dict) else out

    with torch.no_grad():
        reference, out = model(x), se.eval()(x)
    assert type(reference) is type(out) and all(torch.equal(a, b) for a, b in zip(values(reference), values(out)))
    model.train(), se.train()
    train_ref, train_out = values(model(x)), values(se(x))
    assert all(torch.equal(a, b) for a, b in zip(train_ref, train_out))
    check_grads(se, sum(f.square().mean() for f in train_out))
    check_strip(se, model, lambda m: values(m(x)))


# -- Hugging Face transformers (random init from their config classes) --------------------------------
def hf_model(kind):
    transformers = pytest.importorskip("transformers")  # a guard only: the test extra installs it (CI)
    torch.manual_seed(0)
    if kind == "resnet":
        config = transformers.ResNetConfig(
            embedding_size=16, hidden_sizes=[16, 32, 48, 64], depths=[1, 2, 1, 1], layer_type="bottleneck", num_labels=5
        )
        return randomize(transformers.ResNetForImageClassification(config))
    config = transformers.ConvNextConfig(hidden_sizes=[16, 32, 48, 64], depths=[1, 2, 1, 1], num_labels=5)
    return randomize(transformers.ConvNextForImageClassification(config))


HF_KEPT = {  # the model, its base model (return_dict and hidden-state flags), the stem's channel check
    "resnet": {"", "resnet", "resnet.embedder", "resnet.encoder"},
    "convnext": {"", "convnext", "convnext.embeddings"},
}


@pytest.mark.parametrize("kind", ["resnet", "convnext"])
def test_hugging_face(kind):
    model = hf_model(kind)
    se = retrofit.add_se(model, input_size=(3, 64, 64))
    base = "resnet" if kind == "resnet" else "convnext"
    units = [f"{base}.encoder.stages.{i}.layers.{j}.se" for i, n in enumerate((1, 2, 1, 1)) for j in range(n)]
    assert blocks_of(se) == units
    assert [b.stage for b in retrofit.get_info(se).blocks] == [2, 3, 3, 4, 5]
    kept = {s.where for s in retrofit.get_info(se).skipped if "kept as is" in s.reason}
    assert kept == {p or "<model>" for p in HF_KEPT[kind]}
    counter = FlopCounterMode(display=False)  # the kept forwards hold no multiply-add of their own
    with counter, torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert scan(model, (3, 64, 64), macs=True).macs == counter.get_total_flops() // 2
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference, out = model(x, output_hidden_states=True), se.eval()(x, output_hidden_states=True)
    assert type(out) is type(reference) and torch.equal(out.logits, reference.logits)
    assert all(torch.equal(a, b) for a, b in zip(reference.hidden_states, out.hidden_states))  # the flag still works
    model.train(), se.train()
    labels = torch.tensor([1, 3])
    loss, se_loss = model(x, labels=labels).loss, se(x, labels=labels).loss
    assert torch.equal(loss, se_loss)
    check_grads(se, se_loss)
    check_strip(se, model, lambda m: [m(x).logits])


def test_at_on_a_part_called_by_a_kept_forward_ends_its_own_forward():
    """The stages are called by a kept forward (the encoder): the block goes at the end of their own."""
    model = hf_model("resnet")
    se = retrofit.add_se(model, at=["resnet.encoder.stages.*"], input_size=(3, 64, 64)).eval()
    assert blocks_of(se) == [f"resnet.encoder.stages.{i}.se_out" for i in range(4)]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(se(x).logits, model(x).logits)
    with pytest.raises(
        retrofit.RetrofitError,
        match=r"at: resnet.embedder.pooler \(MaxPool2d\) is called by a "
        r"forward kept as is \(resnet.embedder",
    ):
        retrofit.add_se(model, at=["resnet.embedder.pooler"], input_size=(3, 64, 64))


# -- a kept module inside a traced forward --------------------------------------------------------------
class Gate(nn.Module):
    """Data-dependent control flow around a residual unit: fx cannot trace it, it can trace the unit."""

    def __init__(self, c):
        super().__init__()
        self.unit = Residual(c)

    def forward(self, x):
        y = self.unit(x)
        return y if y.mean() > 0 else -y


def test_a_kept_module_inside_is_gone_into_and_counted_once():
    net = randomize(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Gate(8), Residual(8)))
    found = scan(net, (3, 16, 16), macs=True)
    assert [s.module for s in found.sites if s.kind == "residual"] == ["1.unit", "2"]
    assert sites_json(found)["kept"] == [{"module": "1", "reason": found.traced.opaque[0][1]}]
    assert "torch.fx cannot trace Gate" in found.traced.opaque[0][1]
    counter = FlopCounterMode(display=False)  # the reference: one real forward, counted by torch
    with counter, torch.no_grad():
        net(torch.randn(1, 3, 16, 16))
    assert found.macs == counter.get_total_flops() // 2  # Gate's node and its traced unit: once
    se = retrofit.add_se(net, r=4, input_size=(3, 16, 16)).eval()
    assert blocks_of(se) == ["1.unit.se", "2.se"]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(se(x), net(x)) and torch.equal(se(-x), net(-x))  # both sides of the branch


class Output(dict):
    """A dict subclass like Hugging Face's ModelOutput."""


class DictUnit(nn.Module):
    def __init__(self, returns):
        super().__init__()
        self.conv, self.returns = nn.Conv2d(4, 4, 3, padding=1), returns

    def forward(self, x):
        return self.returns(y=torch.relu(x + self.conv(x)))


class DictNet(nn.Module):
    def __init__(self, returns):
        super().__init__()
        self.stem, self.unit = nn.Conv2d(3, 4, 1), DictUnit(returns)

    def forward(self, x):
        return self.unit(self.stem(x))["y"]


def test_a_rebuilt_forward_returns_the_same_container_type():
    from collections import OrderedDict

    net = randomize(DictNet(OrderedDict))  # torchvision's FPN returns one
    se = retrofit.add_se(net, r=2, input_size=(3, 8, 8)).eval()
    x = torch.randn(1, 3, 8, 8)
    assert type(se.unit(se.stem(x))) is OrderedDict and torch.equal(se(x), net(x))
    with pytest.raises(retrofit.RetrofitError, match="it returns a Output, which a rebuilt forward cannot build"):
        retrofit.add_se(DictNet(Output), r=2, input_size=(3, 8, 8))


class PerImage(nn.Module):
    """Called by a kept forward with one tensor per image: a rewrite would be fixed to that count."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, xs):
        return [torch.relu(x + self.conv(x)) for x in xs]


class Loop(nn.Module):
    def __init__(self):
        super().__init__()
        self.head, self.unit = PerImage(), Residual(3)

    def forward(self, x):
        return [self.unit(y) for y in self.head(list(x.unbind(0)))]  # fx cannot iterate x


def test_a_part_given_a_list_by_a_kept_forward_is_not_rewritten():
    net = randomize(Loop())
    se = retrofit.add_se(net, r=1, input_size=(3, 8, 8))
    assert blocks_of(se) == ["unit.se"]
    skipped = retrofit.get_info(se).skipped
    assert any(s.where.startswith("head") and "passes it a list of 1" in s.reason for s in skipped)
    x = torch.randn(3, 3, 8, 8)  # three images where the recorded run had one
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(se.eval()(x), net(x)))


def test_blocks_timm_marks_untraceable_are_in_the_models_skipped_list():
    """TinyViT: the 10 TinyVitBlocks of stages 1-3 are timm notrace modules (2 residual sums each, out of
    the pass's sight); the retrofitted model's skipped list names each, and why."""
    model = timm.create_model("tiny_vit_5m_224")
    blocks = [n for n, m in model.named_modules() if type(m).__name__ == "TinyVitBlock"]
    assert len(blocks) == 10
    se = retrofit.add_se(model, input_size=(3, 64, 64))
    assert {b.path.rsplit(".", 1)[0] for b in retrofit.get_info(se).blocks} == {
        "stages.0.blocks.0",
        "stages.0.blocks.1",
    }
    listed = [s for s in retrofit.get_info(se).skipped if s.reason.startswith("TinyVitBlock is a timm notrace module")]
    assert [s.where for s in listed] == blocks
