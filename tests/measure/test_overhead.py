"""Overhead numbers: consistent with each other and with independent counts."""
import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import retrofit
from retrofit.measure.overhead import measure_overhead


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
