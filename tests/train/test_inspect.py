"""retrofit.inspect on an ImageFolder: the evaluation it reports, and the constancy at the model's output
against a reference computed here (the block's forward replaced by hand with its mean scale)."""

import copy

import pytest
import torch

import retrofit
from retrofit.surgery.fold import gates, info_of
from retrofit.train.data import ImageFolderData
from support import make_folder, reference_top1, se_model


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("inspect"))


def trained_like(position="standard"):
    """test_resnet with its blocks moved off the preserving init: layer2's gate depends on the input,
    the others stay input-independent with a constant that is not 1."""
    model = se_model(position=position)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for b in gates(model)[0]:
            model.get_submodule(b.path).fc2.bias.copy_(torch.randn(b.channels, generator=g))
        model.get_submodule(info_of(model).blocks[1].path).fc1.weight.normal_(generator=g)
    return model.eval()


def val_images(model, root):
    data = ImageFolderData.open(root, model, input_size=(3, 32, 32), augment=False)
    batches = list(data.val_loader(64, workers=0))
    return torch.cat([b.images for b in batches]), torch.cat([b.targets for b in batches])


def test_inspect_reports_constancy_at_the_output_against_a_hand_replacement(data):
    model = trained_like()
    report = retrofit.inspect(model, data)
    assert abs(report.top1 - reference_top1(model, data)) < 1e-9
    assert [b.constant for b in report.blocks] == [True, False, True, True]
    for b in report.blocks:
        if b.constant:
            assert (b.image_spread, b.class_spread, b.local_change, b.logit_change, b.loss_change) == (0, 0, 0, 0, 0)
    x, y = val_images(model, data)
    path = report.blocks[1].path
    block = model.get_submodule(path)
    seen = []
    handle = block.gate.register_forward_hook(lambda m, a, out: seen.append(out.detach().flatten(1)))
    with torch.no_grad():
        logits = model(x)
    handle.remove()
    scale = (torch.cat(seen).double().mean(0) / block.gate_origin).float()
    by_hand = copy.deepcopy(model)
    by_hand.get_submodule(path).forward = lambda u, shortcut=None: (
        u * scale.view(1, -1, 1, 1) + (0 if shortcut is None else shortcut)
    )
    with torch.no_grad():
        replaced = by_hand(x)
    change = ((replaced.double() - logits.double()).norm() / logits.double().norm()).item()
    loss = (
        torch.nn.functional.cross_entropy(replaced.double(), y) - torch.nn.functional.cross_entropy(logits.double(), y)
    ).item()
    r = report.blocks[1]
    assert r.logit_change > 1e-3 and abs(r.logit_change - change) < 1e-5 * max(1, change)
    assert abs(r.loss_change - loss) < 1e-5
    assert report.images == len(y) == 12 and report.classes == ["class0", "class1", "class2"]


def test_images_reads_an_evenly_spaced_subset_of_every_class(data):
    report = retrofit.inspect(trained_like(), data, images=6, output_change=False)
    assert report.images == 6 and all(b.logit_change is None for b in report.blocks)
    assert all(len(m) for m in report.blocks[1].class_means)  # each of the 3 classes seen


def test_blocks_that_are_not_channel_gates_are_listed_with_why(data):
    model = se_model(module="cbam")
    with pytest.raises(retrofit.RetrofitError, match="no channel gate.*spatial gate"):
        retrofit.inspect(model, data)
