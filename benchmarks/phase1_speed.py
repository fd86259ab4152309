"""Phase 1 costs less than a full fine-tune: training images/s and memory, side by side in one run.

Two arms on the same architecture, batch, images and labels, each trained by the tool's own epoch loop
(:func:`retrofit.train.loop.train_epoch`, AdamW from timm):

* ``full``: the plain timm model, every parameter trainable, norm layers in training mode: a full
  fine-tune step;
* ``phase1``: the same model retrofitted (default recipe: standard position, r 16), only the SE blocks
  trainable, norm layers in eval mode: what ``retrofit finetune`` does in phase 1. Frozen parameters
  get no weight gradient and no optimizer state, and the layers before the first block record no
  graph, so nothing is kept for them.

Printed:

1. training images/s of each arm, median of interleaved rounds (order rotating), and the ratio
   phase1 / full (target: at least 1.3);
2. peak memory while training, each arm in a fresh process of its own: the peak resident set during
   the steps minus the resident set just before them (Linux: the peak is reset through
   ``/proc/self/clear_refs`` first, so earlier peaks such as the import do not count), and the ratio;
3. an exact account of what a step keeps: bytes saved for backward (``torch.autograd.graph``'s
   saved-tensor hooks), gradients and optimizer state.

Run: ``python benchmarks/phase1_speed.py`` (``--model``, ``--size``, ``--batch``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import batches, build, interleaved, med, peak_rss, reset_peak_rss, rss_now, step_fn  # noqa: E402

ARMS = ("phase1", "full")


def kept_bytes(model, optimizer, batch) -> dict[str, int]:
    """What one training step holds besides the weights: tensors saved for backward, gradients,
    optimizer state (bytes, each storage counted once)."""
    saved: dict[int, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    weights |= {b.untyped_storage().data_ptr() for b in model.buffers()}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:  # a weight saved for backward is not extra memory
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(batch.images), batch.targets)
    loss.backward()
    grads = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
    optimizer.step()
    state = sum(v.nbytes for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    optimizer.zero_grad(set_to_none=True)
    return {"saved_for_backward": sum(saved.values()), "gradients": grads, "optimizer_state": state}


def memory_child(args) -> None:
    """One arm in this fresh process: RSS just before the steps and the peak during them."""
    torch.set_num_threads(args.threads)
    model, optimizer = build(args.arm, args.model, args.size, args.classes)
    loader = batches(args.steps, args.batch, args.size, args.classes)
    run = step_fn(model, optimizer, loader, args.classes)
    before = rss_now()
    reset = reset_peak_rss()
    run()
    print(json.dumps({"before": before, "peak": peak_rss(), "reset": reset}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--steps", type=int, default=2, help="training steps per timed round")
    ap.add_argument("--runs", type=int, default=7, help="timed rounds per arm")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)  # the memory child process
    args = ap.parse_args()
    if args.arm:
        return memory_child(args)
    torch.set_num_threads(args.threads)
    built = {arm: build(arm, args.model, args.size, args.classes) for arm in ARMS}
    loader = batches(args.steps, args.batch, args.size, args.classes)
    jobs = {arm: step_fn(*built[arm], loader, args.classes) for arm in ARMS}
    times = interleaved(jobs, runs=args.runs, warmup=1)
    ips = {arm: args.steps * args.batch / med(times[arm]) for arm in ARMS}
    kept = {arm: kept_bytes(*built[arm], loader[0]) for arm in ARMS}
    del built
    mem = {}
    for arm in ARMS:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--arm",
                arm,
                "--model",
                args.model,
                "--size",
                str(args.size),
                "--batch",
                str(args.batch),
                "--classes",
                str(args.classes),
                "--steps",
                str(args.steps),
                "--threads",
                str(args.threads),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        mem[arm] = json.loads(out.stdout.strip().splitlines()[-1])
    mib = 2**20
    print(
        f"{args.model}, batch {args.batch} x 3 x {args.size} x {args.size}, {args.threads} threads, AdamW; "
        f"phase1 = retrofitted (standard, r 16), SE blocks only, norms frozen; full = plain model, everything"
    )
    for arm in ARMS:
        print(
            f"  {arm:6s}: {ips[arm]:7.1f} images/s (median of {args.runs} rounds of {args.steps} steps; "
            f"min {args.steps * args.batch / max(times[arm]):.1f}, max "
            f"{args.steps * args.batch / min(times[arm]):.1f})"
        )
    ratio = ips["phase1"] / ips["full"]
    print(
        f"phase-1 images/s / full fine-tune images/s: {ratio:.2f} ({'meets' if ratio >= 1.3 else 'MISSES'} "
        f"target >= 1.3)"
    )
    grow = {arm: mem[arm]["peak"] - mem[arm]["before"] for arm in ARMS}
    for arm in ARMS:
        print(
            f"  {arm:6s}: peak RSS while training {mem[arm]['peak'] / mib:.0f} MiB, {grow[arm] / mib:.0f} MiB above "
            f"the RSS before the steps (own process; peak reset first: {mem[arm]['reset']})"
        )
    print(f"phase-1 training memory / full fine-tune training memory: {grow['phase1'] / grow['full']:.2f}")
    for arm in ARMS:
        k = kept[arm]
        print(
            f"  {arm:6s}: kept per step: saved for backward {k['saved_for_backward'] / mib:.1f} MiB, gradients "
            f"{k['gradients'] / mib:.1f} MiB, optimizer state {k['optimizer_state'] / mib:.1f} MiB"
        )
    total = {arm: sum(kept[arm].values()) for arm in ARMS}
    print(f"kept per step, phase 1 / full: {total['phase1'] / total['full']:.2f}")


if __name__ == "__main__":
    main()
