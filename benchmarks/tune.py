"""Does `retrofit tune` find the grid's best for a third of its training, and what does a per-stage search find?

On the digits transfer of ``benchmarks/transfer.py`` (its data preparation: ``test_resnet`` pretrained on
digits 0-4, moved to 5-9 with 10 training images per class, the seed-0 draw, 448 val images):

(a) **Grid against tune** on one space of 30 recipes: 5 positions x r {4, 16} x stages {all, 4+5, 5}.
    The grid is :func:`retrofit.sweep` with ``data=`` on the search seed (100), every recipe for the full
    epochs; the tune searches the same space with the same seed under ``--budget`` = a third of the
    grid's epochs (Hyperband, TPE). Printed: both bests (on the search seed), the training epochs each
    spent and the ratio; then the grid's best and the tune's best re-run on seeds 0, 1, 2 (the finish's
    seeds, apart from the search seed): the grid's seed-to-seed spread, and whether the tune's best lies
    within it (its mean at least the grid best's mean minus one standard deviation).
(b) **A per-stage search**: r per stage over the four stages, each of {off, 4, 8, 16, 32} (624 recipes),
    standard position, under a budget of 30 full fine-tunes; the best found and its finalist table with
    the control arms.

Run: ``python benchmarks/tune.py`` (needs ``pip install -c constraints.txt -e '.[bench,tune]'``); 2 CPU
threads. Settings chosen before the run and not changed after: phase 1 10 epochs at lr 0.01, batch 10,
no augmentation, the fine-tune's defaults otherwise (label smoothing 0.1).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

POSITIONS = ["standard", "pre", "post", "identity", "inside"]
SEARCH_SEED = 100


def prepare(root: Path, size: int, console):
    """transfer.py's data and pretrained network (its functions, unchanged)."""
    import timm
    from transfer import make_data, pretrain_on

    folders = make_data(root, size, shots=10, seeds=[0])
    torch.manual_seed(0)
    plain = timm.create_model("test_resnet", num_classes=10)
    top1 = pretrain_on(plain, root / "pretrain", size, epochs=10)
    console.print(f"pretrained test_resnet on digits 0-4: val top-1 {top1:.2f}%")
    return plain, folders[0]


def seeds_of(plain, data, recipe, train, epochs, size, seeds=(0, 1, 2)):
    """``recipe`` fine-tuned on each seed, as the finish does: its last-epoch top-1 per seed."""
    import copy

    import retrofit

    out = []
    for seed in seeds:
        model = copy.deepcopy(plain)
        torch.manual_seed(seed)
        model = retrofit.add_se(model, recipe, input_size=(3, size, size), inplace=True)
        result = retrofit.finetune(
            model, data, epochs=epochs, seed=seed, input_size=(3, size, size), restore_best=False, **train
        )
        out.append(result.rows[-1]["top1"])
    return out


def grid_against_tune(plain, data, train, epochs, size, tmp: Path, console, say) -> dict:
    import retrofit

    t0 = time.perf_counter()
    rows = retrofit.sweep(
        plain,
        r=[4, 16],
        position=POSITIONS,
        stages=["all", "4+5", "5"],
        input_size=(3, size, size),
        data=data,
        epochs=epochs,
        seeds=[SEARCH_SEED],
        **train,
    )
    grid_time = time.perf_counter() - t0
    trained = [r for r in rows if r.arm == "se" and r.top1 is not None]
    grid_epochs = epochs * len(trained)
    best = max(trained, key=lambda r: (r.top1, -r.params))
    console.print(
        f"(a) grid: {len(trained)} recipes trained ({sum(r.arm == 'se' for r in rows) - len(trained)} "
        f"without a site), {grid_epochs} training epochs, {grid_time:.0f} s; best on seed {SEARCH_SEED}: "
        f"{best.position} r={best.r_label} stages {best.stages_label}, top-1 {best.top1:.2f}%"
    )
    t0 = time.perf_counter()
    result = retrofit.tune(
        plain,
        data,
        {"position": POSITIONS, "r": [4, 16], "stages": ["all", "4+5", "5"]},
        budget=grid_epochs // 3,
        epochs=epochs,
        input_size=(3, size, size),
        search_seed=SEARCH_SEED,
        finalists=3,
        seeds=3,
        output_dir=tmp / "tune-a",
        on_event=lambda e: say(e.message),
        **train,
    )
    tune_time = time.perf_counter() - t0
    search = [t for t in result.trials if t["state"] in ("complete", "pruned")]
    top = max((t for t in result.trials if t["state"] == "complete"), key=lambda t: t["top1"])
    console.print(f"(a) tune: {result.summary['line']}; {tune_time:.0f} s with its finish")
    console.print(
        f"(a) tune best on seed {SEARCH_SEED}: trial {top['number']} {top['label']}, top-1 "
        f"{top['top1']:.2f}%; "
        f"search epochs {result.summary['epochs']} of the grid's {grid_epochs}: ratio "
        f"{result.summary['epochs'] / grid_epochs:.3f} (goal <= 0.333); {len(search)} recipes searched"
    )
    grid_seeds = seeds_of(
        plain, data, retrofit.Recipe(position=best.position, r=best.r, stages=best.stages), train, epochs, size
    )
    gm, gs = statistics.fmean(grid_seeds), statistics.stdev(grid_seeds)
    win = next((r for r in result.rows if r.arm == "se" and r.recipe == result.best), None)
    console.print(
        f"(a) grid's best over seeds 0-2: {gm:.2f} ± {gs:.2f}% (per seed {', '.join(f'{x:.2f}' for x in grid_seeds)})"
    )
    if win is not None:
        within = win.top1 >= gm - gs
        console.print(
            f"(a) tune's best over seeds 0-2 (its finish): trial {win.trial} {win.position} r={win.r_label} "
            f"stages {win.stages_label}: {win.top1:.2f} ± {win.top1_std:.2f}%; within the grid's spread "
            f"(>= {gm - gs:.2f}): {within}"
        )
    ratio_ok = result.summary["epochs"] <= grid_epochs / 3
    console.print(
        f"(a) goal: epochs <= 1/3 of the grid's: {ratio_ok}; best within the grid's spread: "
        f"{win is not None and win.top1 >= gm - gs}"
    )
    return dict(result=result)


def per_stage(plain, data, train, epochs, size, tmp: Path, console, say):
    import retrofit
    from retrofit.cli.sweep import sweep_table

    t0 = time.perf_counter()
    result = retrofit.tune(
        plain,
        data,
        {"r": ["off", 4, 8, 16, 32], "per_stage": True},
        budget=30 * epochs,
        epochs=epochs,
        input_size=(3, size, size),
        search_seed=SEARCH_SEED,
        finalists=3,
        seeds=3,
        output_dir=tmp / "tune-b",
        on_event=lambda e: say(e.message),
        **train,
    )
    console.print(f"(b) per-stage search: {result.summary['line']}; {time.perf_counter() - t0:.0f} s with its finish")
    top = max((t for t in result.trials if t["state"] == "complete"), key=lambda t: t["top1"])
    console.print(f"(b) best on the search seed: trial {top['number']} {top['label']}, top-1 {top['top1']:.2f}%")
    console.print(sweep_table(result.rows, False, 0, (3, size, size), title="(b) finalists and controls, seeds 0-2"))
    console.print(result.verdict or "(no finish)")


def main() -> None:
    from rich.console import Console

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--only", choices=["a", "b"], default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    console = Console(width=220, markup=False, highlight=False)  # "[trial 3]" is text, not markup
    err = Console(stderr=True, width=220, markup=False, highlight=False)
    size, t0 = 32, time.perf_counter()
    train = dict(lr=1e-2, batch_size=10, augment=False, workers=0)
    with tempfile.TemporaryDirectory() as tmp:
        plain, data = prepare(Path(tmp) / "digits", size, console)
        if args.only != "b":
            grid_against_tune(plain, data, train, args.epochs, size, Path(tmp), console, err.print)
        if args.only != "a":
            per_stage(plain, data, train, args.epochs, size, Path(tmp), console, err.print)
    import timm

    console.print(
        f"{datetime.date.today().isoformat()}, {platform.machine()} {os.cpu_count()} CPU(s), torch "
        f"{torch.__version__}, timm {timm.__version__}, 2 threads; {time.perf_counter() - t0:.0f} s in all"
    )


if __name__ == "__main__":
    main()
