"""What the attribute check costs: every rewritten forward compares the attributes its class forward
names with the values it was traced with before each call (retrofit.graph.specialise), so that
``set_input_size`` and the like are followed.

Rows, measured in turns in one run (retrofit.measure.latency): the retrofitted model as installed,
against a copy with the check taken off (every holder's ``specialised`` set to None), and a copy with
the check on (two copies of one model differ by the machine's noise: that is the floor), at a small
input and batch 1, where the check's share of a forward is largest: resnet50 (16 rewritten bottlenecks,
64x64) and swin_tiny_patch4_window7_224 (12 rewritten blocks, 224x224). Then one check alone, in
microseconds (timeit), for a resnet50 bottleneck and a Swin block.

Run: python benchmarks/specialise_check.py [--runs N] [--threads T] [--page docs/benchmarks/specialise-check.md]
"""

import argparse
import copy
import sys
import timeit
from pathlib import Path

import timm
import torch

import retrofit
from retrofit.graph.forward import installed
from retrofit.measure.latency import measure_latency

sys.path.insert(0, str(Path(__file__).resolve().parent))
from page import page  # noqa: E402


def unchecked(model: torch.nn.Module) -> torch.nn.Module:
    model = copy.deepcopy(model)
    for m in model.modules():
        holder = installed(m)
        if holder is not None:
            holder.specialised = None
    return model


def main(runs: int) -> None:
    torch.manual_seed(0)
    cases = {"resnet50": (3, 64, 64), "swin_tiny_patch4_window7_224": (3, 224, 224)}
    print(
        f"forward latency with the attribute check / without it, batch 1, CPU, {torch.get_num_threads()} threads, "
        f"median of {runs} per-round ratios in turns"
    )
    for name, size in cases.items():
        se = retrofit.add_se(timm.create_model(name)).eval()
        rewritten = [m for m in se.modules() if installed(m) is not None]
        arms = {"checked": se, "unchecked": unchecked(se), "checked, a copy": copy.deepcopy(se)}
        timing = measure_latency(arms, batch=1, input_size=size, runs=runs)
        print(
            f"  {name} ({len(rewritten)} rewritten forwards): checked {timing.median('checked') * 1e3:.2f} ms, "
            f"unchecked {timing.median('unchecked') * 1e3:.2f} ms"
        )
        for arm in ("checked", "checked, a copy"):
            low, high, _ = timing.interval(arm, "unchecked")
            print(f"    {arm:16s} / unchecked {timing.ratio(arm, 'unchecked'):.4f} [95% {low:.4f}, {high:.4f}]")
        one = rewritten[0]
        spec = installed(one).specialised
        n = 200_000
        seconds = min(timeit.repeat(lambda spec=spec, one=one: spec.stale(one), number=n, repeat=5)) / n
        print(f"    one check ({type(one).__name__}, {len(spec.watched)} attributes watched): {seconds * 1e6:.2f} us")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=41)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--page", metavar="FILE", help="also write the output as a docs page (benchmarks/page.py)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with page(args.page, "The attribute check of the rewritten forwards", __file__):
        main(args.runs)
