"""Forward latency of the retrofitted resnet50 against timm's native seresnet50 and the plain resnet50
(CPU, batch 8, 224x224, inference mode), measured in turns in one run (retrofit.measure.latency).

Rows: seresnet50 twice (its ratio to itself is the machine's noise floor), the plain resnet50, and
resnet50 retrofitted with the `timm` recipe (seresnet50's layout; its standard-position blocks are
fused with their residual sums, x * s + shortcut in one torch.addcmul pass), the same with the
fusion turned off (the unfused x * s, then the sum: what the fusion saves), and the default recipe.
Targets: retrofit / seresnet50 <= 1.02. Last, the timer's sanity: twice the work should time about 2x.

Run: python benchmarks/se_latency.py [--runs N] [--threads T]
"""

import argparse
from unittest import mock

import timm
import torch

import retrofit
from retrofit.measure.latency import measure_latency


def main(runs: int) -> None:
    torch.manual_seed(0)
    native = timm.create_model("seresnet50").eval()
    fused = retrofit.add_se(timm.create_model("resnet50"), recipe="timm").eval()
    fused.load_state_dict(native.state_dict())
    with mock.patch("retrofit.surgery.prepare._fusable_sum", lambda *a: None):
        unfused = retrofit.add_se(timm.create_model("resnet50"), recipe="timm").eval()
    unfused.load_state_dict(native.state_dict())
    models = {
        "seresnet50 (timm)": native,
        "seresnet50 again (noise floor)": native,
        "resnet50 (plain)": timm.create_model("resnet50").eval(),
        "retrofit, timm recipe (fused)": fused,
        "retrofit, timm recipe, unfused": unfused,
        "retrofit, default recipe": retrofit.add_se(timm.create_model("resnet50")).eval(),
    }
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        same = torch.equal(fused(x), unfused(x))
        close = torch.allclose(fused(x), native(x), rtol=1e-5, atol=1e-5)
    timing = measure_latency(models, batch=8, input_size=(3, 224, 224), runs=runs)
    ref, plain = "seresnet50 (timm)", "resnet50 (plain)"
    print(
        f"forward latency, batch 8, 224x224, CPU, {torch.get_num_threads()} threads, median of {runs} rounds "
        f"in turns; fused == unfused outputs: {same}; fused ~ seresnet50 (1e-5): {close}"
    )
    print(f"  {'model':32s} {'median ms':>10s} {'/ seresnet50':>13s} {'/ resnet50':>11s}")
    for name in models:
        print(
            f"  {name:32s} {timing.median(name) * 1e3:10.1f} {timing.ratio(name, ref):13.3f} "
            f"{timing.ratio(name, plain):11.3f}"
        )
    print("  target: retrofit / seresnet50 <= 1.02")
    twice_the_work()


def twice_the_work(runs: int = 15) -> None:
    """The timer's sanity on this machine: a conv stack and the same stack with one more conv (about
    twice the multiply-adds) should time about 2x (the unit tests check the bookkeeping on a fake clock)."""
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(64, 64, 3, padding=1)
    )
    twice = torch.nn.Sequential(net, torch.nn.ReLU(), *list(net.children())[1:])
    timing = measure_latency({"one": net, "two": twice}, batch=2, input_size=(3, 48, 48), runs=runs, warmup=2)
    ratio = timing.ratio("two", "one")
    print(
        f"timer sanity: one more conv of the same size, ratio {ratio:.2f} (about 2 expected; "
        f"{'ok' if 1.3 < ratio < 4 else 'the machine is too noisy for timings now'})"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    main(args.runs)
