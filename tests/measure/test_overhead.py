"""Overhead numbers: consistent with each other and with independent counts."""

import pytest
import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import retrofit
from retrofit.measure.overhead import Overhead, measure_overhead


def real_macs(model, size):
    """Multiply-adds counted by torch's flop counter on a real CPU forward (no meta tensors)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(torch.randn(1, *size))
    return counter.get_total_flops() // 2


def test_meta_counts_equal_a_real_forward():
    model = timm.create_model("resnet18")
    se = retrofit.add_se(model, position="inside", input_size=(3, 64, 64))
    report = measure_overhead(model, se, input_size=(3, 64, 64))
    assert report.base_macs == real_macs(model, (3, 64, 64))
    assert report.macs == real_macs(se, (3, 64, 64))
    assert report.base_params == sum(p.numel() for p in model.parameters())
    assert report.params == sum(p.numel() for p in se.parameters())


def test_totals_are_sums_of_blocks_and_stages():
    model = timm.create_model("resnet50")
    for position in ("standard", "pre", "post", "identity", "inside"):
        se = retrofit.add_se(model, position=position, r=8)
        report = measure_overhead(model, se)
        assert report.added_params == sum(b.params for b in report.blocks) == sum(s.params for s in report.stages())
        assert report.added_macs == sum(b.macs for b in report.blocks) == sum(s.macs for s in report.stages())
        assert [b.path for b in report.blocks] == [b.path for b in retrofit.get_info(se).blocks]
        for b in report.blocks:  # each block: 2 C w multiply-adds, C H W per pass (hand formula)
            assert b.macs == 2 * b.channels * b.width
            assert b.pool_ops == b.scale_ops == b.channels * b.size[0] * b.size[1]


def test_per_stage_counts_follow_the_stride_rule():
    model = timm.create_model("resnet50")
    report = measure_overhead(model, retrofit.add_se(model, stages=[2]))
    assert [(s.stage, s.stride, s.blocks) for s in report.stages()] == [(2, 4, 3)]
    assert all(b.size == (56, 56) for b in report.blocks)


def test_any_pair_of_models_compares_timm_native_too():
    report = measure_overhead(timm.create_model("resnet50"), timm.create_model("seresnet50"))
    assert len(report.blocks) == 16 and report.blocks[0].path == "layer1.0.se"
    assert report.added_params == 28088024 - 25557032  # timm's documented sizes of the two models
    assert report.blocks[0].width == 16


def test_inception_stages_round_log2_of_the_stride():
    model = timm.create_model("inception_v3")
    report = measure_overhead(model, retrofit.add_se(model))
    # 299 input: Mixed_5* at 35x35 (stride 8.5 -> stage 3), Mixed_6* 17x17 (4), Mixed_7* 8x8 (5)
    assert [(s.stage, s.blocks) for s in report.stages()] == [(3, 3), (4, 5), (5, 3)]


def test_the_same_model_twice_is_an_error():
    model = timm.create_model("resnet18")
    retrofit.add_se(model, inplace=True, input_size=(3, 32, 32))
    with pytest.raises(retrofit.RetrofitError, match="same object twice"):
        measure_overhead(model, model)


def test_frozen_parameters_are_counted():
    """Issue 22's mutation of overhead.py:60 (parameters counted only if requires_grad): a model with a
    frozen backbone has as many parameters. resnet18: 11,689,512 (timm's documented size); its 8 SE
    blocks on C = 64, 64, 128, 128, 256, 256, 512, 512 channels at r = 16: 2 C w + w + C each, w = C/16."""
    with torch.device("meta"):
        model = timm.create_model("resnet18")
    model.requires_grad_(False)
    se = retrofit.add_se(model, input_size=(3, 64, 64))
    report = measure_overhead(model, se, input_size=(3, 64, 64))
    added = sum(2 * c * (c // 16) + c // 16 + c for c in (64, 64, 128, 128, 256, 256, 512, 512))
    assert (report.base_params, report.added_params, report.params) == (11_689_512, added, 11_689_512 + added)


def test_blocks_on_channels_last_maps_and_tokens_are_counted_by_their_layout():
    """Issue 22's mutation of overhead.py:201 (`len(shape_in) == 4` -> `>= 3`) went unnoticed: no test
    looked at blocks on (B, N, C) tokens. They were reported with 0 channels, no size and no squeeze or
    scale pass, and a Swin block on an (N, H, W, C) map with H as its channels. Closed forms: DeiT-Ti
    distilled at 224 has 196 patch tokens after 2 prefix tokens, 192 channels; the squeeze reads the
    grid tokens, the scale multiplies all 198. Swin-T's first stage: 56 x 56 positions of 96 channels."""
    cases = [
        ("deit_tiny_distilled_patch16_224", "blocks.0.se_attn", 192, (14, 14), 196 * 192, 198 * 192),
        ("vit_tiny_patch16_224", "blocks.0.se_mlp", 192, (14, 14), 196 * 192, 197 * 192),
        ("swin_tiny_patch4_window7_224", "layers.0.blocks.0.se_contiguous", 96, (56, 56), 56 * 56 * 96, 56 * 56 * 96),
    ]
    for name, path, channels, size, pool, scale in cases:
        with torch.device("meta"):
            model = timm.create_model(name)
        report = measure_overhead(model, retrofit.add_se(model), input_size=(3, 224, 224))
        block = next(b for b in report.blocks if b.path == path)
        assert (block.channels, block.size, block.pool_ops, block.scale_ops) == (channels, size, pool, scale), name
        assert block.macs == 2 * channels * block.width


def test_the_stage_of_blocks_not_from_add_se_is_log2_of_their_stride():
    """Issue 22's mutation of overhead.py:208 (that stage off by one): timm's own seresnet50 against
    resnet50, blocks not made by add_se, placed by their input's size: layerK is stage K + 1 (output
    stride 2^(K+1)), 3, 4, 6 and 3 bottlenecks."""
    with torch.device("meta"):
        report = measure_overhead(
            timm.create_model("resnet50"), timm.create_model("seresnet50"), input_size=(3, 224, 224)
        )
    for b in report.blocks:
        k = int(b.path.split(".")[0][len("layer") :])
        assert (b.stage, b.stride, b.size) == (k + 1, 2 ** (k + 1), (224 // 2 ** (k + 1),) * 2), b.path
    assert [(s.stage, s.stride, s.blocks) for s in report.stages()] == [(2, 4, 3), (3, 8, 4), (4, 16, 6), (5, 32, 3)]


def test_percentages_are_the_added_share_of_the_original():
    """The mutation tool's survivors at overhead.py:123 and :126 (`/` made `|`, `**`, `<<`, `&`; `100 *`
    made `100 //`): no test of the overhead module read a percentage. resnet18 (11,689,512 parameters,
    timm's documented size) with its 8 blocks at r = 16 (2 C w + w + C each, w = C/16); the multiply-adds
    of the base from torch's flop counter on a real forward."""
    model = timm.create_model("resnet18")
    se = retrofit.add_se(model, input_size=(3, 64, 64))
    report = measure_overhead(model, se, input_size=(3, 64, 64))
    added = sum(2 * c * (c // 16) + c // 16 + c for c in (64, 64, 128, 128, 256, 256, 512, 512))
    assert report.params_percent() == pytest.approx(100 * added / 11_689_512, rel=1e-12)
    assert report.params_percent(2_922_378) == 25.0  # a quarter of 11,689,512
    base_macs = real_macs(model, (3, 64, 64))
    assert report.macs_percent() == pytest.approx(100 * (real_macs(se, (3, 64, 64)) - base_macs) / base_macs)
    assert report.macs_percent(base_macs // 4) == pytest.approx(25.0, rel=1e-6)
    assert Overhead((3, 8, 8), 0, 0, 10, 10).params_percent() == Overhead((3, 8, 8), 0, 0, 10, 10).macs_percent() == 0


class Pooled(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


class PooledWithExtras(Pooled):
    """Pooled and two modules of a user's own: one on the pooled (N, C) vector, one never called."""

    def __init__(self):
        super().__init__()
        self.vector_gate, self.unused = nn.Linear(8, 8), nn.Linear(4, 5)

    def forward(self, x):
        v = self.conv(x).mean((2, 3))
        return self.fc(v * torch.sigmoid(self.vector_gate(v)))


def test_a_module_off_the_feature_maps_reports_no_geometry_only_its_cost():
    """The mutation tool's survivors at overhead.py:227 and :237 (a block whose input is unknown, or is no
    feature map, reported with 1 channel instead of 0): a module on a pooled vector and one never called
    have no channels, size or squeeze/scale pass to report; their parameters and multiply-adds are theirs
    (Linear(8, 8): 72 parameters, 64 multiply-adds; Linear(4, 5): 25, none run)."""
    report = measure_overhead(Pooled(), PooledWithExtras(), input_size=(3, 16, 16))
    shown = {b.path: (b.channels, b.size, b.pool_ops, b.scale_ops, b.params, b.macs) for b in report.blocks}
    assert shown == {"vector_gate": (0, (0, 0), 0, 0, 72, 64), "unused": (0, (0, 0), 0, 0, 25, 0)}
