"""The timm recipe on a plain model reproduces timm's native SE model: parameters, keys, outputs."""

import pytest
import timm
import torch
from conftest import randomize

import retrofit


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "plain, native", [("resnet50", "seresnet50"), ("resnet18", "seresnet18"), ("resnext50_32x4d", "seresnext50_32x4d")]
)
def test_timm_recipe_matches_native_se_model(plain, native):
    se = retrofit.add_se(timm.create_model(plain), recipe="timm", input_size=(3, 64, 64)).eval()
    reference = randomize(timm.create_model(native), seed=3)
    assert n_params(se) == n_params(reference)
    assert set(se.state_dict()) == set(reference.state_dict())
    se.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(se(x), reference(x), rtol=1e-5, atol=1e-5)


def test_native_checkpoint_file_loads_into_the_retrofit(tmp_path):
    """The round trip a user makes: timm's seresnet18 weights saved as a file, loaded strictly."""
    from safetensors.torch import load_file, save_file

    reference = randomize(timm.create_model("seresnet18"), seed=5)
    path = tmp_path / "seresnet18.safetensors"
    save_file(reference.state_dict(), str(path))
    se = retrofit.add_se(timm.create_model("resnet18"), recipe="timm", input_size=(3, 64, 64)).eval()
    se.load_state_dict(load_file(str(path)), strict=True)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(se(x), reference(x), rtol=1e-5, atol=1e-5)


def test_standard_block_sits_before_drop_path_as_in_timm():
    """Stochastic depth: timm's blocks apply SE, then drop-path, then the residual sum. In train mode with
    ``drop_path_rate > 0`` and one seed, the retrofit must draw the same masks on the same tensors; a block
    placed after the drop-path would see the rescaled branch (x / keep) and give other outputs."""
    se = retrofit.add_se(timm.create_model("resnet18", drop_path_rate=0.5), recipe="timm", input_size=(3, 32, 32))
    reference = randomize(timm.create_model("seresnet18", drop_path_rate=0.5), seed=3)
    se.load_state_dict(reference.state_dict(), strict=True)
    se.train(), reference.train()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    outs = []
    for model in (se, reference):
        torch.manual_seed(11)  # the same drop-path masks, drawn in the same order
        with torch.no_grad():
            outs.append(model(x))
    torch.manual_seed(12)
    with torch.no_grad():
        other_masks = reference(x)
    assert not torch.allclose(other_masks, outs[1])  # the masks do matter here
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
