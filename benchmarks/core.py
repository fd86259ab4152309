"""Core speed figures, each measured side by side in one run on this machine.

1. Forward latency of resnet50 retrofitted with retrofit over timm's native seresnet50
   (CPU, batch 8, 224x224, inference mode; min and median of interleaved runs, with seresnet50
   timed twice to show the machine's noise floor). Target <= 1.02.
2. Time of ``retrofit.add_se`` over ``timm.create_model`` for resnet101. Target <= 0.3.

Run: python benchmarks/core.py [--runs N]
"""
import argparse
import statistics
import time

import timm
import torch

import retrofit


def median_time(fn, runs):
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def latency(runs: int) -> None:
    torch.manual_seed(0)
    native = timm.create_model("seresnet50").eval()
    models = {
        "seresnet50 (timm)": native,
        "seresnet50 again (noise floor)": native,
        "resnet50 (plain)": timm.create_model("resnet50").eval(),
        "retrofit, timm recipe": retrofit.add_se(timm.create_model("resnet50"), recipe="timm").eval(),
        "retrofit, default recipe": retrofit.add_se(timm.create_model("resnet50")).eval(),
    }
    x = torch.randn(8, 3, 224, 224)
    samples = {name: [] for name in models}
    with torch.inference_mode():
        for m in models.values():  # warm-up
            m(x)
        order = list(models)
        for i in range(runs):  # interleaved, in a rotating order: drifts hit every model alike
            for name in order[i % len(order):] + order[:i % len(order)]:
                t = time.perf_counter()
                models[name](x)
                samples[name].append(time.perf_counter() - t)
    best = {name: min(v) for name, v in samples.items()}
    med = {name: statistics.median(v) for name, v in samples.items()}
    ref = "seresnet50 (timm)"
    print(f"forward latency, batch 8, 224x224, CPU ({torch.get_num_threads()} threads), {runs} interleaved runs;"
          f" ratios to timm's seresnet50 (target <= 1.02 for retrofit):")
    print(f"  {'model':32s} {'min ms':>8s} {'median ms':>10s} {'ratio(min)':>11s} {'ratio(median)':>14s}")
    for name in models:
        print(f"  {name:32s} {best[name] * 1e3:8.1f} {med[name] * 1e3:10.1f} {best[name] / best[ref]:11.3f} "
              f"{med[name] / med[ref]:14.3f}")


def surgery(runs: int) -> None:
    timm.create_model("resnet18")  # imports and first-call costs out of the way
    retrofit.add_se(timm.create_model("resnet18"))
    t = time.perf_counter()
    first = timm.create_model("resnet101")  # the one-shot user: fresh memory, page faults included
    first_create = time.perf_counter() - t
    t = time.perf_counter()
    retrofit.add_se(first, position="post")
    first_add = time.perf_counter() - t
    del first
    create = median_time(lambda: timm.create_model("resnet101"), runs)
    source = timm.create_model("resnet101")
    copying = median_time(lambda: retrofit.add_se(source, position="post"), runs)
    inplace = []
    for _ in range(runs):
        model = timm.create_model("resnet101")
        t = time.perf_counter()
        retrofit.add_se(model, inplace=True, position="post")
        inplace.append(time.perf_counter() - t)
        del model
    inplace = statistics.median(inplace)
    print("add_se(resnet101, position='post') over timm.create_model('resnet101')  (target <= 0.3)")
    print(f"  first call in this process: create {first_create:.3f} s, add_se {first_add:.3f} s "
          f"-> ratio {first_add / first_create:.3f}")
    print(f"  median of {runs} repeats:    create {create:.3f} s, add_se {copying:.3f} s "
          f"-> ratio {copying / create:.3f}; with inplace=True (no deep copy) {inplace:.3f} s "
          f"-> ratio {inplace / create:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    surgery(args.runs)
    latency(args.runs)
