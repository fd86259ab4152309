"""Speed of the tool itself, each figure a ratio measured side by side in one run on this machine.

1. Whole process: ``retrofit add-se resnet101 --r 16 --position post`` over
   ``python -c "import timm; timm.create_model('resnet101')"`` (target <= 1.25): what a user waits
   for, imports included, against just building the model.
2. Growth: ``retrofit.add_se`` on resnet152 over resnet50 (target <= 3.5; 50 / 16 = 3.1 blocks),
   in one process, a fresh model for every call; with ``inplace=True`` too (no deep copy).
3. Analysis growth: trace + shapes + sites (``retrofit.surgery.sites.scan``) on resnet152 over resnet50, and
   on hrnet_w18 (many fusions) over resnet50.
4. In one process: ``retrofit.add_se(resnet101, position="post")`` over ``timm.create_model("resnet101")``
   (the core issue's target <= 0.3), with the default deep copy and with ``inplace=True``.

Run: python benchmarks/tool_speed.py [--runs N]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PYTHON, RETROFIT, interleaved, med, processes, spread, verdict  # noqa: E402


def whole_process(runs: int) -> None:
    cmds = {
        "create": [PYTHON, "-c", "import timm; timm.create_model('resnet101')"],
        "add-se": RETROFIT + ["add-se", "resnet101", "--r", "16", "--position", "post"],
    }
    times, cpu, peak = processes(cmds, runs)
    ratio = med(times["add-se"]) / med(times["create"])
    print(
        "1. whole process, retrofit add-se resnet101 --r 16 --position post / python -c "
        "\"import timm; timm.create_model('resnet101')\""
    )
    for name in cmds:
        print(
            f"   {name:8s} wall {spread(times[name])}, CPU median {med(cpu[name]):.3f} s, "
            f"peak memory {peak[name] / 2**20:.0f} MiB"
        )
    print(
        f"   ratio of wall times {ratio:.3f}  ({verdict(ratio, 1.25)}); ratio of CPU times "
        f"{med(cpu['add-se']) / med(cpu['create']):.3f}"
    )


def growth(runs: int) -> None:
    import timm

    import retrofit
    from retrofit.surgery.sites import scan

    retrofit.add_se(timm.create_model("resnet18"))  # first-call costs out of the way
    for inplace in (False, True):
        samples = interleaved(
            {
                name: (lambda m, i=inplace: retrofit.add_se(m, inplace=i, position="post"))
                for name in ("resnet50", "resnet152")
            },
            runs,
            setup=timm.create_model,
        )
        ratio = med(samples["resnet152"]) / med(samples["resnet50"])
        print(f"2. add_se(model{', inplace=True' if inplace else ''}, position='post'): resnet152 / resnet50")
        for name, xs in samples.items():
            print(f"   {name:9s} {spread(xs)}")
        print(f"   ratio {ratio:.3f}  ({verdict(ratio, 3.5)}; block count ratio 50/16 = 3.125)")
    models = {name: timm.create_model(name) for name in ("resnet50", "resnet152", "hrnet_w18")}
    samples = interleaved({name: (lambda m=m: scan(m, (3, 224, 224), macs=True)) for name, m in models.items()}, runs)
    print("3. analysis (trace, meta shapes with multiply-adds, sites) of one model")
    for name, xs in samples.items():
        print(f"   {name:9s} {spread(xs)}")
    print(
        f"   resnet152 / resnet50 {med(samples['resnet152']) / med(samples['resnet50']):.3f} "
        f"(3.1x the blocks); hrnet_w18 / resnet50 {med(samples['hrnet_w18']) / med(samples['resnet50']):.3f}"
    )


def against_create(runs: int) -> None:
    import timm

    import retrofit

    create = lambda _: timm.create_model("resnet101")  # noqa: E731
    samples = interleaved(
        {
            "create_model": create,
            "add_se": lambda m: retrofit.add_se(m, position="post"),
            "add_se inplace": lambda m: retrofit.add_se(m, inplace=True, position="post"),
        },
        runs,
        setup=lambda name: None if name == "create_model" else timm.create_model("resnet101"),
    )
    print("4. add_se(resnet101, position='post') / timm.create_model('resnet101'), in one process")
    for name, xs in samples.items():
        print(f"   {name:14s} {spread(xs)}")
    for name in ("add_se", "add_se inplace"):
        ratio = med(samples[name]) / med(samples["create_model"])
        print(f"   {name} / create_model {ratio:.3f}  ({verdict(ratio, 0.3)})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    whole_process(args.runs)
    growth(args.runs)
    against_create(args.runs)
