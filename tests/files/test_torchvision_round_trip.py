"""torchvision's classifiers through retrofit.save and retrofit.load(base=...) (issue 17, item 2).

A safetensors file has no state-dict ``_metadata`` (each module's version), and torchvision's MNASNet
refuses to load without one. One builder of each torchvision classifier family, at a small input, is
checked here (MaxViT and ViT as small configurations of their classes). The reference is the saved
model's own output, with its blocks moved off the identity so that a block whose weights did not load
would show. Left out for time: the larger members of each family (the same classes) and VGG (its
120 M-parameter classifier takes 5 s to build, save and load).
"""

from functools import partial

import pytest
import torch
import torchvision
from conftest import randomize

import retrofit
from support import moved_off_identity

SMALL = {  # the classes of maxvit_t and vit_b_32, small enough for a 32x32 input and a fast test
    "MaxVit": partial(
        torchvision.models.MaxVit,
        input_size=(32, 32),
        stem_channels=16,
        partition_size=2,
        block_channels=[16, 32],
        block_layers=[1, 1],
        head_dim=8,
        stochastic_depth_prob=0.0,
    ),
    "VisionTransformer": partial(
        torchvision.models.VisionTransformer,
        image_size=32,
        patch_size=16,
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        mlp_dim=64,
    ),
}
# builder (or class of SMALL): (input side, builder arguments, recipe fields); `at` where no merge is found
CLASSIFIERS = {
    "alexnet": (64, {}, dict(at=["features.1", "features.4"])),
    "convnext_tiny": (32, {}, {}),
    "densenet121": (32, {}, dict(at=["features.denseblock*"])),
    "efficientnet_b0": (32, {}, {}),
    "googlenet": (32, dict(aux_logits=False, init_weights=False), {}),
    "inception_v3": (75, dict(aux_logits=False, init_weights=False), {}),
    "MaxVit": (32, {}, {}),
    "mnasnet0_5": (32, {}, {}),  # _load_from_state_dict reads its version
    "mnasnet1_0": (32, {}, {}),
    "mobilenet_v2": (32, {}, {}),
    "mobilenet_v3_small": (32, {}, {}),
    "regnet_y_400mf": (32, {}, {}),
    "resnet18": (32, {}, {}),
    "shufflenet_v2_x0_5": (32, {}, {}),
    "squeezenet1_1": (32, {}, {}),
    "swin_t": (32, {}, {}),
    "VisionTransformer": (32, {}, {}),
}


@pytest.mark.parametrize("name", list(CLASSIFIERS))
def test_torchvision_classifier_round_trip(tmp_path, name):
    side, kwargs, recipe = CLASSIFIERS[name]
    build = SMALL.get(name, partial(torchvision.models.get_model, name))
    torch.manual_seed(0)
    plain = randomize(build(num_classes=10, **kwargs)).eval()
    se = retrofit.add_se(plain, r=8, input_size=(3, side, side), **recipe).eval()
    g = torch.Generator().manual_seed(1)
    moved_off_identity(se, plain, g)
    path = retrofit.save(se, tmp_path / f"{name}.safetensors")
    back = retrofit.load(path, base=build(num_classes=10, **kwargs)).eval()
    x = torch.randn(2, 3, side, side, generator=g)
    with torch.no_grad():
        assert torch.equal(back(x), se(x))
