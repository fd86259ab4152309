"""A 5 x 5 sweep (r 2..32 x all five positions) on resnet50, without latency, over one add-se run
(target <= 3), each measured side by side in one run on this machine:

1. in one process: ``retrofit.sweep(model, ...)`` over ``retrofit.add_se(model)``, a fresh model each;
2. whole processes: ``retrofit sweep resnet50 --r 2,4,8,16,32 --position standard,pre,post,identity,inside``
   over ``retrofit add-se resnet50``.

Run: python benchmarks/sweep_speed.py [--runs N] [--page docs/benchmarks/sweep-speed.md]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RETROFIT, interleaved, med, processes, spread, verdict  # noqa: E402
from page import page  # noqa: E402

R = "2,4,8,16,32"
POSITIONS = "standard,pre,post,identity,inside"


def in_process(runs: int) -> None:
    import timm

    import retrofit

    retrofit.sweep(timm.create_model("resnet18"), r=[4], position=["standard"])  # first-call costs
    retrofit.add_se(timm.create_model("resnet18"))
    jobs = {"add_se": lambda m: retrofit.add_se(m), "sweep 5x5": lambda m: retrofit.sweep(m, r=R, position=POSITIONS)}
    samples = interleaved(jobs, runs, setup=lambda _: timm.create_model("resnet50"))
    ratio = med(samples["sweep 5x5"]) / med(samples["add_se"])
    print("1. in one process, resnet50: retrofit.sweep (25 combinations) / retrofit.add_se")
    for name, xs in samples.items():
        print(f"   {name:10s} {spread(xs)}")
    print(f"   ratio {ratio:.3f}  ({verdict(ratio, 3)})")


def whole_process(runs: int) -> None:
    cmds = {
        "add-se": RETROFIT + ["add-se", "resnet50"],
        "sweep 5x5": RETROFIT + ["sweep", "resnet50", "--r", R, "--position", POSITIONS],
    }
    times, cpu, _ = processes(cmds, runs)
    ratio = med(times["sweep 5x5"]) / med(times["add-se"])
    print("2. whole processes: retrofit sweep resnet50 (5 x 5) / retrofit add-se resnet50")
    for name, xs in times.items():
        print(f"   {name:10s} wall {spread(xs)}, CPU median {med(cpu[name]):.3f} s")
    print(
        f"   ratio of wall times {ratio:.3f}  ({verdict(ratio, 3)}); ratio of CPU times "
        f"{med(cpu['sweep 5x5']) / med(cpu['add-se']):.3f}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--page", metavar="FILE", help="also write the output as a docs page (benchmarks/page.py)")
    args = parser.parse_args()
    with page(args.page, "A 5 x 5 sweep against one add-se", __file__):
        in_process(args.runs)
        whole_process(args.runs)
