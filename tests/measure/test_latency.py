"""The latency ratio and its spread: the median of per-round ratios, a distribution-free interval from
order statistics (the binomial indices worked out by hand below), and "within noise" when it holds 1."""

import json
import statistics

import pytest
from typer.testing import CliRunner

from retrofit.cli import app
from retrofit.measure.latency import Timing

# Binomial(n, 1/2) tail sums by hand: P(X <= k - 1) for the k the interval leaves out on each side.
# n = 10: P(X <= 1) = (1 + 10) / 1024 <= 0.025 < P(X <= 2) = 56 / 1024, so k = 2: the 2nd and 9th ratios.
# n = 20: P(X <= 5) = (1 + 20 + 190 + 1140 + 4845 + 15504) / 2**20 = 21700 / 2**20 <= 0.025 < P(X <= 6).
# n = 6: P(X <= 0) = 1 / 64 <= 0.025 < 7 / 64, so k = 1; n = 5: 1 / 32 > 0.025, no k: min and max.
CASES = [
    (5, 1, 5, 1 - 2 / 32),
    (6, 1, 6, 1 - 2 / 64),
    (10, 2, 9, 1 - 2 * 11 / 1024),
    (20, 6, 15, 1 - 2 * 21700 / 2**20),
]


def timing_of(ratios):
    return Timing({"se": list(ratios), "plain": [1.0] * len(ratios)}, batch=1, input_size=(3, 8, 8))


@pytest.mark.parametrize("n, lo, hi, coverage", CASES)
def test_the_interval_is_the_order_statistics_the_binomial_gives(n, lo, hi, coverage):
    ratios = [1 + i / 100 for i in range(1, n + 1)]  # the i-th smallest is 1 + i/100
    shuffled = ratios[1::2] + ratios[::2]
    low, high, cover = timing_of(shuffled).interval("se", "plain")
    assert (low, high) == (pytest.approx(1 + lo / 100), pytest.approx(1 + hi / 100))
    assert cover == pytest.approx(coverage)


def test_the_ratio_is_the_median_of_the_per_round_ratios():
    """Rounds (se, plain): (1, 1), (2, 1), (3, 2): per-round ratios 1, 2, 1.5, median 1.5 (the ratio of
    the medians would be 2 / 1 = 2)."""
    timing = Timing({"se": [1.0, 2.0, 3.0], "plain": [1.0, 1.0, 2.0]}, batch=1, input_size=(3, 8, 8))
    assert timing.ratios("se", "plain") == [1.0, 2.0, 1.5]
    assert timing.ratio("se", "plain") == 1.5


def test_within_noise_when_the_interval_holds_one():
    assert timing_of([0.97, 1.02, 0.99, 1.03, 1.01, 0.98, 1.0, 1.04, 0.96, 1.02]).within_noise("se", "plain")
    assert not timing_of([1.05, 1.1, 1.07, 1.12, 1.08, 1.09, 1.06, 1.11, 1.1, 1.04]).within_noise("se", "plain")


def test_add_se_reports_the_interval_and_the_samples():
    result = CliRunner().invoke(
        app,
        ["add-se", "resnet18", "--latency", "--runs", "6", "--batch", "1", "--input-size", "3,32,32", "--json", "-"],
    )
    assert result.exit_code == 0, result.output
    lat = json.loads(result.stdout)["latency"]
    samples = lat["samples_ms"]
    assert len(samples["original"]) == len(samples["retrofitted"]) == 6 == lat["runs"]
    ratios = sorted(r / o for r, o in zip(samples["retrofitted"], samples["original"]))
    assert lat["ratio"] == pytest.approx(statistics.median(ratios), rel=1e-3)
    assert (lat["ratio_low"], lat["ratio_high"]) == (
        pytest.approx(ratios[0], rel=1e-3),
        pytest.approx(ratios[-1], rel=1e-3),
    )
    assert lat["ratio_coverage"] == pytest.approx(1 - 2 / 64, abs=1e-4)
    assert lat["within_noise"] == (lat["ratio_low"] <= 1 <= lat["ratio_high"])


def test_the_text_says_the_interval_and_whether_it_is_within_noise():
    result = CliRunner().invoke(
        app, ["add-se", "resnet18", "--latency", "--runs", "6", "--batch", "1", "--input-size", "3,32,32"]
    )
    assert result.exit_code == 0, result.output
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("Latency"))
    assert "(97% interval of the median per-round ratio)" in line
    assert line.endswith("within noise: no difference measurable in this run") or line.rstrip().endswith("%")
