"""The insertion and the plan, where the suite did not notice wrong code (issue 22's hand mutations of
surgery/insert.py and surgery/plan.py): a failure halfway leaves the user's model as it was, a second
retrofit keeps the weights' provenance, fx's constants stay out of the state dict, the narrow-width
warning is for blocks that read r, a position with no usable site is an error, and an insertion read in
two submodules is owned by the forward that holds both."""

import warnings

import pytest
import timm
import torch
from conftest import randomize
from torch import nn

import retrofit
from retrofit import RetrofitError
from retrofit.graph.forward import installed
from retrofit.surgery import insert as insert_module
from retrofit.surgery.info import update_info

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def forwards(model: nn.Module) -> list[str]:
    """The modules running a rewritten forward."""
    return [name for name, m in model.named_modules() if installed(m) is not None]


@pytest.mark.parametrize("fail_at", [1, 3, 8])
def test_a_failure_halfway_leaves_the_model_as_it_was(fail_at, monkeypatch):
    """Issue 22's mutation of insert.py:155 (no rollback) went unnoticed, and with it a real gap: the
    rollback undid only the rewrite that failed, so with inplace=True a failure (or a Ctrl-C) in the
    third of eight rewrites left the first two blocks in the user's model. Now every rewrite is undone."""
    model = randomize(timm.create_model("resnet18"))
    keys, out = list(model.state_dict()), model.eval()(X)
    real, calls = insert_module.install_forward, []

    def install(module, graphs, *args):
        calls.append(module)
        if len(calls) == fail_at:
            raise KeyboardInterrupt  # what a Ctrl-C raises wherever it lands
        real(module, graphs, *args)

    monkeypatch.setattr(insert_module, "install_forward", install)
    with pytest.raises(KeyboardInterrupt):
        retrofit.add_se(model, inplace=True, input_size=(3, 32, 32))
    assert len(calls) == fail_at
    assert list(model.state_dict()) == keys and forwards(model) == [] and retrofit.get_info(model) is None
    assert not any(name.endswith(".se") for name, _ in model.named_modules())
    assert torch.equal(model(X), out)
    monkeypatch.setattr(insert_module, "install_forward", real)
    assert (
        len(retrofit.get_info(retrofit.add_se(model, inplace=True, input_size=(3, 32, 32))).blocks) == 8
    )  # and it still can


def test_a_failed_second_retrofit_leaves_the_first(monkeypatch):
    """Rolled back to the first retrofit's forwards, not to the class's."""
    model = retrofit.add_se(randomize(timm.create_model("resnet18")), init="paper", input_size=(3, 32, 32))
    before, out = forwards(model), model.eval()(X)
    real, calls = insert_module.install_forward, []

    def install(module, graphs, *args):
        calls.append(module)
        if len(calls) == 4:
            raise RuntimeError("fails halfway")
        real(module, graphs, *args)

    monkeypatch.setattr(insert_module, "install_forward", install)
    with pytest.raises(RuntimeError, match="fails halfway"):
        retrofit.add_se(model, position="post", inplace=True, input_size=(3, 32, 32))
    assert forwards(model) == before and len(retrofit.get_info(model).blocks) == 8 and torch.equal(model(X), out)


def test_a_second_retrofit_keeps_the_provenance_of_the_weights(tmp_path):
    """Issue 22's mutation of insert.py:118: the weights' provenance lost after a second add_se."""
    se = retrofit.add_se(timm.create_model("test_resnet"), r=4, input_size=(3, 32, 32))
    update_info(se, weights="checkpoint")  # what `add-se --checkpoint` records
    loaded = retrofit.load(retrofit.save(se, tmp_path / "se.safetensors"))
    assert retrofit.get_info(loaded).weights == "checkpoint"
    again = retrofit.add_se(loaded, position="post", stages=[5], r=4, input_size=(3, 32, 32))
    info = retrofit.get_info(again)
    assert info.weights == "checkpoint" and len(info.blocks) == len(retrofit.get_info(se).blocks) + 1


SCALE = torch.linspace(0.5, 1.5, 8).reshape(1, 8, 1, 1)  # a tensor no module holds: fx keeps it as a constant


class ScaledUnit(nn.Module):
    """A residual unit whose forward reads a tensor that is no parameter, buffer or attribute of any
    module: tracing stores it as a constant (``_tensor_constant0``), the rewritten forward reads it from
    the module (``_retrofit_constant0``)."""

    def __init__(self, c=8):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.conv(x) * SCALE


def test_fx_constants_do_not_change_the_state_dict():
    """Issue 22's mutation of insert.py:135: fx constants registered as persistent buffers put new keys
    in the state dict (`_tensor_constant0`), which no file of the original model has."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), ScaledUnit(), ScaledUnit())
    keys = set(model.state_dict())
    se = retrofit.add_se(model, r=2, input_size=(3, 16, 16))
    blocks = {k for k in se.state_dict() if any(k.startswith(b.path + ".") for b in retrofit.get_info(se).blocks)}
    assert len(retrofit.get_info(se).blocks) == 2 and blocks
    assert set(se.state_dict()) == keys | blocks
    assert [name for name, _ in se[1].named_buffers()] == ["_retrofit_constant0"]  # the constant is there
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(se(x), model(x))  # preserving init


def narrow_warnings(**recipe) -> list[str]:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), ScaledUnit(), ScaledUnit())  # sites of 8 channels
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        retrofit.add_se(model, input_size=(3, 16, 16), **recipe)
    return [str(w.message) for w in caught if "reduced width below 1" in str(w.message)]


def test_the_narrow_width_warning_is_for_blocks_that_read_r():
    """Issue 22's mutation of insert.py:138: SE with r = 16 on 8 channels has a width of 0.5, raised to
    1 with a warning; ECA (no r, one 1-d conv) on the same sites has nothing to raise."""
    assert narrow_warnings(module="se") == [
        "r=16 gives a reduced width below 1 for 2 block(s) (fewest channels: 8); raised to min_width=1"
    ]
    assert narrow_warnings(module="eca") == []
    assert narrow_warnings(module="se", r=8) == []  # 8 / 8 = 1: not below


class OneConvUnit(nn.Module):
    """x + bn(conv3x3(x)): its one 3x3 conv ends the residual branch."""

    def __init__(self, c=8):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn(self.conv(x)))


def test_a_position_with_no_usable_site_is_an_error():
    """Issue 22's mutation of plan.py:52: with the error off, a recipe whose every site is skipped gave
    a model without blocks, silently. `inside` skips a 3x3 conv that ends the branch (that block would
    be the standard position)."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), OneConvUnit(), OneConvUnit())
    with pytest.raises(
        RetrofitError,
        match="position 'inside' has no usable site in Sequential: inside: its output "
        "already ends the residual branch: a block there is the standard position",
    ):
        retrofit.add_se(model, position="inside", input_size=(3, 16, 16))
    assert len(retrofit.get_info(retrofit.add_se(model, position="standard", r=8, input_size=(3, 16, 16))).blocks) == 2


class TwoReaders(nn.Module):
    """A unit whose branch reads its input in two submodules: x + a(x) * b(x)."""

    def __init__(self, c=8):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(c, c, 1), nn.Sigmoid())

    def forward(self, x):
        return x + self.a(x) * self.b(x)


def test_an_insertion_read_in_two_submodules_is_owned_by_their_common_forward():
    """Issue 22's mutation of plan.py:152 (the owner of an insertion taken from its first user only):
    `pre` puts the block on the unit's input for the branch, which reads it in `a` and in `b`; only the
    unit's own forward holds both edges. Checked against the formula run by hand on the model's modules:
    x + a(se(x)) * b(se(x))."""
    unit = randomize(TwoReaders())
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), unit).eval()
    se = randomize(retrofit.add_se(model, position="pre", r=2, init="paper", input_size=(3, 16, 16))).eval()
    assert [b.path for b in retrofit.get_info(se).blocks] == ["1.se_pre"] and forwards(se) == ["1"]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        h = se[0](x)
        s = se[1].se_pre(h)
        assert torch.allclose(se(x), h + se[1].a(s) * se[1].b(s), atol=1e-6)
        assert not torch.allclose(se(x), h + se[1].a(s) * se[1].b(h), atol=1e-3)  # the block reaches b too
