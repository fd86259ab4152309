"""Which blocks learn something? The paper's "Role of Excitation" on the digits transfer, and what folds.

Data and pretraining: those of ``benchmarks/transfer.py`` (digits 0-4 pretrain the user's plain model,
the new task is digits 5-9 with ``--shots`` images per class drawn per seed, a fixed val half). For each
seed the model is retrofitted (default recipe: standard position, r 16, preserving init) and fine-tuned
(phase 1: ``--epochs`` at ``--lr``, blocks and the new head; phase 2: ``--phase2-epochs`` more, everything
at lr / 10). After phase 1 (a snapshot taken at that epoch of the same run) and after phase 2:

* :func:`retrofit.inspect` on every val image: per gate the mean excitation, its spread across images and
  across class means, the saturated share, the local change and the change of the logits and the loss with
  the gate at its mean (definitions: ``retrofit/measure/excitation.py``), averaged per stage;
* :func:`retrofit.fold` at ``T`` = 0, 0.1 and 0.5 points: gates folded, parameters and multiply-adds saved,
  top-1 and loss before and after, evaluations, and the latency of the folded model against the unfolded
  one (median per-round ratio with its interval, :func:`retrofit.measure_latency`, batch 8).

The paper's three findings, each decided by a rule fixed before any run (means over the seeds):

1. *early gates excite channels alike for every class*: the first stage's class spread is the smallest of
   all stages;
2. *deeper gates become class-specific*: the class spread grows with the stage (every stage's above the
   previous one's);
3. *the last stage's gates recalibrate little* (saturated, or one pattern for all classes, so removing
   them costs little): the last stage's gates move the logits least, when fixed at their mean.

Each is printed as "confirmed here" or "not confirmed here" with its numbers, whatever comes out.

Run (``pip install -c constraints.txt -e '.[bench]'`` first): ``python benchmarks/inspect_fold.py --model
test_resnet`` and ``--model test_convnext`` (another family: ConvNeXt's blocks end in a layer scale, so its
gates have no norm or convolution to fold into); 2 CPU threads.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

TOLERANCES = (0.0, 0.1, 0.5)
STATS = ("mean", "image_spread", "class_spread", "saturated", "local_change", "logit_change", "loss_change")


def fine_tune(plain, folder, seed: int, args):
    """The seed's retrofit, fine-tuned; returns (model after phase 1, model after phase 2)."""
    import retrofit

    torch.manual_seed(seed)
    model = retrofit.add_se(copy.deepcopy(plain), input_size=(3, args.size, args.size), inplace=True)
    snapshot = {}

    def keep_phase1(row):
        if row["epoch"] == args.epochs:
            snapshot["model"] = copy.deepcopy(model)
        return False

    retrofit.finetune(
        model,
        folder,
        args.epochs,
        phase2_epochs=args.phase2_epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        augment=False,
        seed=seed,
        workers=0,
        restore_best=False,
        input_size=(3, args.size, args.size),
        on_epoch=keep_phase1,
    )
    return snapshot["model"], model


def measure(model, folder, size: int) -> dict:
    """inspect, then fold at each tolerance (with its latency against the unfolded model)."""
    import retrofit

    report = retrofit.inspect(model, folder)
    out = {"blocks": [b.to_dict() for b in report.blocks], "folds": {}, "images": report.images}
    for t in TOLERANCES:
        result = retrofit.fold(model, folder, tolerance=t)
        timing = retrofit.measure_latency(
            {"unfolded": model, "folded": result.model}, batch=8, input_size=(3, size, size), runs=10
        )
        low, high, _ = timing.interval("folded", "unfolded")
        out["folds"][t] = dict(
            folded=len(result.blocks),
            of=result.candidates,
            evaluations=result.evaluations,
            params=result.overhead_before.added_params - result.overhead_after.added_params,
            added_params=result.overhead_before.added_params,
            macs=result.overhead_before.added_macs - result.overhead_after.added_macs,
            added_macs=result.overhead_before.added_macs,
            before=result.before,
            after=result.after,
            into=[b.into for b in result.blocks],
            latency=(timing.ratio("folded", "unfolded"), low, high),
        )
    return out


def ms(xs, fmt="{:.4f}") -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return ""
    spread = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{fmt.format(statistics.mean(xs))} ± {fmt.replace('+', '').format(spread)}"


def stage_rows(runs: list[dict]) -> dict[int, dict[str, list[float]]]:
    """stage -> statistic -> one value per seed (the mean over that stage's gates)."""
    out: dict[int, dict[str, list[float]]] = {}
    for run in runs:
        per: dict[int, list[dict]] = {}
        for b in run["blocks"]:
            per.setdefault(b["stage"], []).append(b)
        for stage, blocks in per.items():
            row = out.setdefault(stage, {k: [] for k in STATS})
            for k in STATS:
                values = [b[k] for b in blocks if b[k] is not None]
                row[k].append(statistics.mean(values) if values else None)
    return dict(sorted(out.items()))


def findings(stages: dict) -> list[str]:
    mean = {
        s: {k: statistics.mean([v for v in row[k] if v is not None]) for k in ("class_spread", "logit_change")}
        for s, row in stages.items()
    }
    order = list(mean)
    spread = [mean[s]["class_spread"] for s in order]
    change = [mean[s]["logit_change"] for s in order]
    one = spread[0] == min(spread)
    two = all(b > a for a, b in zip(spread, spread[1:]))
    three = change[-1] == min(change)
    nums = ", ".join(f"stage {s} {c:.3g}" for s, c in zip(order, spread))
    return [
        f"1. early gates alike for every class (stage {order[0]} has the smallest class spread): "
        f"{'confirmed' if one else 'NOT confirmed'} here (class spread: {nums})",
        f"2. deeper gates class-specific (class spread grows with every stage): "
        f"{'confirmed' if two else 'NOT confirmed'} here",
        f"3. last-stage gates recalibrate little (stage {order[-1]} moves the logits least at its mean): "
        f"{'confirmed' if three else 'NOT confirmed'} here (logit change: "
        + ", ".join(f"stage {s} {c:.3g}" for s, c in zip(order, change))
        + ")",
    ]


def print_phase(console, name: str, runs: list[dict]) -> None:
    from rich.table import Table

    stages = stage_rows(runs)
    table = Table(
        title=f"{name}: the gates per stage (mean ± std over {len(runs)} seeds of the per-stage mean)",
        title_justify="left",
    )
    for col in ("stage", "gates", *STATS):
        table.add_column(col, justify="right")
    gates = {s: sum(b["stage"] == s for b in runs[0]["blocks"]) for s in stages}
    for s, row in stages.items():
        table.add_row(str(s), str(gates[s]), *(ms(row[k], "{:.3g}") for k in STATS))
    console.print(table)
    for line in findings(stages):
        console.print(line)
    folds = Table(title=f"{name}: retrofit fold at each tolerance (mean ± std over seeds)", title_justify="left")
    for col in (
        "T",
        "gates folded (per seed)",
        "into",
        "params saved",
        "MACs saved",
        "evaluations",
        "top-1 before",
        "top-1 after",
        "Δ top-1",
        "loss before",
        "loss after",
        "latency folded/unfolded [interval] per seed",
    ):
        folds.add_column(col, justify="right")
    for t in TOLERANCES:
        rs = [r["folds"][t] for r in runs]
        b1, a1 = [r["before"]["top1"] for r in rs], [r["after"]["top1"] for r in rs]
        into = sorted({k for r in rs for k in r["into"]})
        folds.add_row(
            f"{t:g}",
            f"{'/'.join(str(r['folded']) for r in rs)} of {rs[0]['of']}",
            ",".join(into) or "-",
            f"{ms([r['params'] for r in rs], '{:.0f}')} of {rs[0]['added_params']:,}",
            f"{ms([r['macs'] for r in rs], '{:.0f}')} of {rs[0]['added_macs']:,}",
            "/".join(str(r["evaluations"]) for r in rs),
            ms(b1, "{:.2f}"),
            ms(a1, "{:.2f}"),
            ms([a - b for a, b in zip(a1, b1)], "{:+.2f}"),
            ms([r["before"]["val_loss"] for r in rs]),
            ms([r["after"]["val_loss"] for r in rs]),
            " ".join(f"{x:.3f} [{lo:.3f}, {hi:.3f}]" for x, lo, hi in (r["latency"] for r in rs)),
        )
    console.print(folds)


def main() -> None:
    import timm
    from rich.console import Console
    from transfer import make_data, pretrain_on

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="test_resnet")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--pretrain-epochs", type=int, default=10)
    ap.add_argument("--shots", type=int, default=10)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--phase2-epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--batch-size", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(2)
    console = Console(width=250, markup=False, highlight=False)  # "[low, high]" is text, not markup
    t0 = time.perf_counter()
    seeds = list(range(args.seeds))
    phases: dict[str, list[dict]] = {"after phase 1": [], "after phase 2": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folders = make_data(root, args.size, args.shots, seeds)
        torch.manual_seed(0)
        plain = timm.create_model(args.model, num_classes=10)
        top1 = pretrain_on(plain, root / "pretrain", args.size, args.pretrain_epochs)
        seconds = time.perf_counter() - t0
        console.print(f"pretrained {args.model} on digits 0-4: val top-1 {top1:.2f}% ({seconds:.0f} s)")
        for seed in seeds:
            one, two = fine_tune(plain, folders[seed], seed, args)
            phases["after phase 1"].append(measure(one, folders[seed], args.size))
            phases["after phase 2"].append(measure(two, folders[seed], args.size))
            console.print(f"seed {seed} done ({time.perf_counter() - t0:.0f} s)")
    console.print(
        f"{args.model}, digits 0-4 -> 5-9, {args.shots} images per class, {len(seeds)} seeds; SE standard, "
        f"r 16, preserving init; phase 1 {args.epochs} epochs at lr {args.lr:g}, phase 2 "
        f"{args.phase2_epochs} "
        f"epochs at lr {args.lr / 10:g}; batch {args.batch_size}, no augmentation; "
        f"{phases['after phase 1'][0]['images']} val images"
    )
    for name, runs in phases.items():
        print_phase(console, name, runs)
    console.print(
        f"{datetime.date.today().isoformat()}, {platform.machine()} {os.cpu_count()} CPU(s), torch "
        f"{torch.__version__}, timm {timm.__version__}, 2 threads; {time.perf_counter() - t0:.0f} s in all"
    )


if __name__ == "__main__":
    main()
