"""`retrofit sweep` and the latency/meta options of add-se: counts against hand-written closed forms
and against real insertions, stage selection, and one clear line for each bad input."""

import json

import pytest
import timm
import torch
from conftest import one_error
from torch import nn
from typer.testing import CliRunner

import retrofit
from retrofit.cli import app
from retrofit.measure.latency import measure_latency
from retrofit.measure.overhead import measure_overhead
from retrofit.sweep.grid import sweep

runner = CliRunner()
N = (3, 4, 6, 3)  # ResNet-50 bottleneck units per stage (stages 2..5)
C_OUT = (256, 512, 1024, 2048)  # their output widths (standard position)
C_MID = (64, 128, 256, 512)  # their 3x3 conv widths (inside position)
RESNET50_PARAMS = 25_557_032  # timm resnet50, 1000 classes
SMALL = (3, 64, 64)


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def timm_width(c, r):
    """The timm recipe's reduced width, written out: round C/r to a multiple of 8, at least 8
    (timm's make_divisible with divisor 8, min_value 8, no round-up bump)."""
    return max(8, int(c / r + 4) // 8 * 8)


def closed_form(channels, r):
    """Per block 2*C*w weights + w + C biases, w = C/r after the timm rounding."""
    return sum(n * (2 * c * timm_width(c, r) + timm_width(c, r) + c) for n, c in zip(N, channels))


@pytest.fixture(scope="module")
def resnet50():
    return timm.create_model("resnet50")


def test_params_column_matches_the_closed_form_over_r():
    ratios = [2, 3, 4, 8, 16, 32, 64]  # 3 and 64 exercise the rounding and the minimum width
    result = run(
        "sweep",
        "resnet50",
        "--r",
        ",".join(map(str, ratios)),
        "--position",
        "standard,inside",
        "--recipe",
        "timm",
        "--input-size",
        "3,64,64",
        "--json",
        "-",
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["base"]["params"] == RESNET50_PARAMS
    rows = {(row["position"], row["r"]): row for row in data["rows"]}
    assert len(rows) == 2 * len(ratios)
    for r in ratios:
        for position, channels in (("standard", C_OUT), ("inside", C_MID)):
            row = rows[position, r]
            assert row["blocks"] == 16 and row["stages"] == "all"
            assert row["params"] == closed_form(channels, r), (position, r)
            assert row["params_percent"] == pytest.approx(100 * closed_form(channels, r) / RESNET50_PARAMS)
            # multiply-adds: the two 1x1 convs on the squeezed vector, 2*C*w per block (biases not counted)
            assert row["macs"] == sum(n * 2 * c * timm_width(c, r) for n, c in zip(N, channels))


def test_stage_2_touches_only_the_stride_4_blocks():
    result = run("sweep", "resnet50", "--r", "16", "--stages", "2,3+4", "--input-size", "3,64,64", "--json", "-")
    assert result.exit_code == 0, result.output
    stage2, stage34 = json.loads(result.stdout)["rows"]
    assert (stage2["stages"], stage34["stages"]) == ("2", "3+4")
    assert stage2["blocks"] == 3 and stage2["params"] == 3 * (2 * 256 * 16 + 16 + 256)
    # squeeze + scale passes over 256 x 16 x 16 maps: 64 / 4 = 16, i.e. stride 4, in each of the 3 blocks
    assert stage2["pool_scale_ops"] == 3 * 2 * 256 * 16 * 16
    assert stage34["blocks"] == 4 + 6
    assert stage34["params"] == 4 * (2 * 512 * 32 + 32 + 512) + 6 * (2 * 1024 * 64 + 64 + 1024)


@pytest.mark.parametrize(
    "position, r, stages", [("pre", 3, None), ("inside", 8, (3, 4)), ("identity", 32, (5,)), ("post", 2, (2,))]
)
def test_counts_from_the_plan_equal_a_real_insertion(resnet50, position, r, stages):
    (row,) = sweep(resnet50, r=[r], position=[position], stages=[stages], input_size=SMALL)
    se = retrofit.add_se(resnet50, position=position, r=r, stages=stages, input_size=SMALL)
    real = measure_overhead(resnet50, se, input_size=SMALL)
    assert (row.blocks, row.params, row.macs) == (len(real.blocks), real.added_params, real.added_macs)
    assert row.pool_scale_ops == real.pool_ops + real.scale_ops
    assert row.params_percent == pytest.approx(real.params_percent())


@pytest.mark.parametrize("name, prefix", [("vit_tiny_patch16_224", 1), ("deit_tiny_distilled_patch16_224", 2)])
def test_counts_from_the_plan_equal_a_real_insertion_on_tokens(name, prefix):
    """A block on a token sequence squeezes the 4 x 4 grid's tokens and scales every token, the class (and
    distillation) tokens too: the plan counted the grid twice (the mutation tool's run on overhead.py found
    the shape's prefix untested; the plan then gave 24,576 squeeze and scale operations for ViT-Ti's 4 blocks
    where the built model has 25,344). Closed forms: 192 channels, r = 4 (w = 48): 2 C w + w + C parameters
    and 2 C w multiply-adds per block, 2 blocks per transformer block."""
    model = timm.create_model(name, img_size=64, depth=2)
    (row,) = sweep(model, r=[4], position=["standard"], stages=[None], input_size=(3, 64, 64))
    se = retrofit.add_se(model, r=4, input_size=(3, 64, 64))
    real = measure_overhead(model, se, input_size=(3, 64, 64))
    closed = (4, 4 * (2 * 192 * 48 + 48 + 192), 4 * 2 * 192 * 48, 4 * (16 * 192 + (16 + prefix) * 192))
    assert (row.blocks, row.params, row.macs, row.pool_scale_ops) == closed
    assert (len(real.blocks), real.added_params, real.added_macs, real.pool_ops + real.scale_ops) == closed


def test_add_se_on_the_meta_device_reports_what_a_real_build_does():
    reports = []
    for flag in ("--meta", "--no-meta"):
        result = run("add-se", "resnet18", "--position", "inside", "--input-size", "3,64,64", flag, "--json", "-")
        assert result.exit_code == 0, result.output
        reports.append(json.loads(result.stdout))
    meta, real = reports
    for key in ("base", "retrofitted", "added", "stages", "blocks"):
        assert meta[key] == real[key], key
    assert real["base"]["params"] == sum(p.numel() for p in timm.create_model("resnet18").parameters())


def test_latency_takes_medians_of_interleaved_rounds(monkeypatch):
    """measure_latency's bookkeeping on a fake clock that each model advances by its own cost (the
    wall-clock check, twice the work about twice the time, is in benchmarks/se_latency.py: a shared
    machine cannot promise it). "two" costs 2 units, once 50 (an outlier the median ignores)."""
    import types

    import retrofit.measure.latency as latency

    clock, calls = [0.0], []

    class Costs(nn.Module):
        def __init__(self, name, costs):
            super().__init__()
            self.name, self.costs, self.weight = name, iter(costs), nn.Parameter(torch.zeros(1))

        def forward(self, x):
            calls.append(self.name)
            clock[0] += next(self.costs)
            return x

    monkeypatch.setattr(latency, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    one, two = Costs("one", [9.0] + [1.0] * 5), Costs("two", [9.0, 2.0, 2.0, 50.0, 2.0, 2.0])  # warm-up first
    rounds = []
    timing = measure_latency(
        {"one": one, "two": two},
        batch=1,
        input_size=(1, 1, 1),
        runs=5,
        warmup=1,
        on_event=lambda e: rounds.append((e.data["done"], e.data["total"])),
    )
    assert timing.samples == {"one": [1.0] * 5, "two": [2.0, 2.0, 50.0, 2.0, 2.0]}  # warm-up not timed
    assert timing.ratio("two", "one") == 2.0
    assert calls == ["one", "two"] + ["one", "two", "two", "one"] * 2 + ["one", "two"]  # turns rotate
    assert rounds == [(i, 6) for i in range(1, 7)]  # after every round, the warm-up one included


def test_add_se_latency_in_the_report():
    result = run(
        "add-se", "resnet18", "--latency", "--runs", "2", "--batch", "1", "--input-size", "3,32,32", "--json", "-"
    )
    assert result.exit_code == 0, result.output
    latency = json.loads(result.stdout)["latency"]
    assert latency["batch"] == 1 and latency["runs"] == 2 and latency["input_size"] == [3, 32, 32]
    samples = latency["samples_ms"]  # the ratio: the median of the two rounds' ratios
    assert latency["ratio"] == pytest.approx(
        (samples["retrofitted"][0] / samples["original"][0] + samples["retrofitted"][1] / samples["original"][1]) / 2,
        rel=1e-3,
    )


def test_sweep_latency_has_its_interval(tmp_path):
    result = run(
        "sweep",
        "resnet18",
        "--r",
        "4,16",
        "--latency",
        "--runs",
        "6",
        "--batch",
        "1",
        "--input-size",
        "3,32,32",
        "--json",
        tmp_path / "s.json",
    )
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    assert all(r["latency_low"] <= r["latency"] <= r["latency_high"] for r in rows)
    for r in rows:  # the cell: ratio [low, high], "noise" when the interval holds 1
        cell = f"{r['latency']:.3f}x [{r['latency_low']:.2f}, {r['latency_high']:.2f}]"
        assert cell + (" noise" if r["latency_low"] <= 1 <= r["latency_high"] else " ") in result.stdout


def test_plot_is_a_png(tmp_path):
    pytest.importorskip("matplotlib")  # an optional extra (`retrofit[plot]`)
    path = tmp_path / "sweep.png"
    result = run(
        "sweep", "resnet18", "--r", "4,16", "--position", "standard,post", "--input-size", "3,64,64", "--plot", path
    )
    assert result.exit_code == 0, result.output
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p != path]  # no temporary file left


@pytest.mark.parametrize(
    "args, words",
    [
        (["--r", "4,,x"], ["--r", "item 2", "empty"]),
        (["--r", "4,x"], ["--r", "'x'", "positive number"]),
        (["--r", ""], ["--r", "empty list"]),
        (["--r", "0"], ["--r", "positive number"]),
        (["--position", "standard,middle"], ["--position", "middle", "allowed"]),
        (["--stages", "2,,3"], ["--stages", "empty"]),
        (["--stages", "3+"], ["--stages", "3+4"]),
        (["--stages", "x"], ["--stages", "stage numbers"]),
    ],
)
def test_malformed_axis_lists(args, words):
    one_error(run("sweep", "resnet18", *args), *words)


def test_a_stage_that_does_not_exist():
    one_error(
        run("sweep", "resnet18", "--stages", "all,7", "--input-size", "3,64,64"), "stage 7 does not exist", "2,3,4,5"
    )


def test_plot_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # import matplotlib now fails
    path = tmp_path / "sweep.png"
    one_error(run("sweep", "resnet18", "--plot", path), "--plot needs matplotlib", "retrofit[plot]")
    assert not path.exists()


def test_meta_with_output_is_refused(tmp_path):
    one_error(run("add-se", "resnet18", "--meta", "--output", tmp_path / "x.safetensors"), "--meta", "--output")
    assert not list(tmp_path.iterdir())


def test_sweep_leaves_the_model_untouched(resnet50):
    before = {k: v.clone() for k, v in resnet50.state_dict().items()}
    sweep(resnet50, r=[4], position=["standard", "inside"], input_size=SMALL)
    assert retrofit.get_info(resnet50) is None and list(resnet50.state_dict()) == list(before)
    assert all(torch.equal(before[k], v) for k, v in resnet50.state_dict().items())
