"""Added parameters and multiply-adds against the closed forms of the notes, to the unit.

ResNet-50 has N_s = 3, 4, 6, 3 bottleneck units per stage with output widths C_s = 256 .. 2048 and
bottleneck (3x3 conv) widths C_s / 4. Per block: 2 C^2 / r weights, plus C / r + C biases.
"""

import pytest
import timm

import retrofit
from retrofit.measure.overhead import measure_overhead

N = (3, 4, 6, 3)
C_OUT = (256, 512, 1024, 2048)
C_MID = (64, 128, 256, 512)
SIZE = (56, 28, 14, 7)  # feature map side per stage at 224x224


def closed_form(channels, r, bias):
    total = sum(n * 2 * c * c // r for n, c in zip(N, channels))
    if bias:
        total += sum(n * (c // r + c) for n, c in zip(N, channels))
    return total


@pytest.fixture(scope="module")
def resnet50():
    return timm.create_model("resnet50")


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("r", [2, 4, 8, 16, 32])
@pytest.mark.parametrize("bias", [False, True])
def test_standard_position_params(resnet50, r, bias):
    se = retrofit.add_se(resnet50, r=r, bias=bias, input_size=(3, 64, 64))
    assert n_params(se) - n_params(resnet50) == closed_form(C_OUT, r, bias)


@pytest.mark.parametrize("r", [2, 4, 8, 16, 32])
@pytest.mark.parametrize("bias", [False, True])
def test_inside_position_params(resnet50, r, bias):
    se = retrofit.add_se(resnet50, position="inside", r=r, bias=bias, input_size=(3, 64, 64))
    assert n_params(se) - n_params(resnet50) == closed_form(C_MID, r, bias)


def test_overhead_report_matches_the_closed_forms(resnet50):
    r = 16
    report = measure_overhead(resnet50, retrofit.add_se(resnet50, r=r), input_size=(3, 224, 224))
    assert report.added_params == closed_form(C_OUT, r, bias=True)
    # multiply-adds: the two 1x1 convs on the squeezed vector, 2 C^2 / r per block (biases not counted)
    assert report.added_macs == closed_form(C_OUT, r, bias=False)
    # squeeze and scale passes: C x H x W each, per block
    passes = sum(n * c * s * s for n, c, s in zip(N, C_OUT, SIZE))
    assert report.pool_ops == report.scale_ops == passes
    by_stage = {s.stage: s for s in report.stages()}
    for stage, n, c in zip((2, 3, 4, 5), N, C_OUT):
        assert by_stage[stage].blocks == n
        assert by_stage[stage].params == n * (2 * c * c // r + c // r + c)
