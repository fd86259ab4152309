"""`retrofit tune`: a budgeted search for the recipe that pays, ending with the sweep's control arms
(:mod:`retrofit.sweep.tune`). Needs the optional `tune` extra (Optuna)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ..train.config import DEFAULTS, RUN_OPTIONS  # no torch
from .ablation import control_lines, save_figure
from .common import (
    CHECKPOINT,
    INPUT_SIZE,
    NUM_CLASSES,
    PRETRAINED,
    app,
    console,
    fail_cleanly,
    json_target,
    say,
    write_json,
)
from .finetune import is_main_process
from .options import config_help, finetune_options
from .sweep import import_pyplot, sweep_table


@app.command("tune", short_help="Search the recipe that pays, on Optuna; end with the control arms.")
@fail_cleanly
@finetune_options(only=("epochs", *RUN_OPTIONS), notes={"epochs": "Of every trial and finish run."})
def tune_command(
    model: str = typer.Argument(..., help="A timm model name, e.g. resnet50."),
    data: Path = typer.Option(..., "--data", "-d", help="ImageFolder: DATA/train/<class>/*, DATA/val/<class>/*."),
    space: Path | None = typer.Option(
        None,
        "--space",
        help="The search space as a YAML file (keys position, r, "
        "stages, per_stage, module, gate, squeeze, lr, "
        "phase2_epochs), instead of the flags below.",
    ),
    position: str | None = typer.Option(
        None, "--position", "-p", help="Positions searched, comma-separated (default: the recipe's)."
    ),
    r: str | None = typer.Option(
        None,
        "--r",
        "-r",
        help="Reduction ratios searched, in the sweep's syntax (4,16 or "
        "'16;2:8,5:32'); with --per-stage one choice per stage, where "
        "off means no block there (default off,4,8,16,32).",
    ),
    stages: str | None = typer.Option(
        None,
        "--stages",
        help="Stage sets searched (all,4+5,5); with --per-stage the one set of stages searched (default: all).",
    ),
    per_stage: bool = typer.Option(
        False, "--per-stage", help="Search r for each stage on its own (off: no block in that stage)."
    ),
    module: str | None = typer.Option(
        None, "--module", help="Blocks searched, comma-separated: se, ese, eca, ceca, cbam, gc (default se)."
    ),
    gate: str | None = typer.Option(
        None, "--gate", help="Gates searched, e.g. sigmoid,hard_sigmoid (default: the recipe's)."
    ),
    squeeze: str | None = typer.Option(None, "--squeeze", help="Squeezes searched: avg,max (default: the recipe's)."),
    lr: str = typer.Option(
        f"{DEFAULTS['lr']:g}",
        "--lr",
        help=config_help("lr", after="Or a range LOW:HIGH, searched log-uniform (e.g. 1e-4:1e-1)."),
    ),
    phase2_epochs: str | None = typer.Option(
        None,
        "--phase2-epochs",
        help=config_help(
            "phase2_epochs", after=f"Searched: comma-separated, e.g. 0,2 (default {DEFAULTS['phase2_epochs']})."
        ),
    ),
    recipe: str | None = typer.Option(
        None, "--recipe", "-R", help="Recipe for the other fields (divisor, bias, init...)."
    ),
    trials: int | None = typer.Option(
        None,
        "--trials",
        "-n",
        help="Trials that count (complete or pruned); those over "
        "a limit or repeating a recipe train nothing and do "
        "not count.",
    ),
    budget: str | None = typer.Option(
        None,
        "--budget",
        help="Training epochs of the whole study (60), or this "
        "process's wall time (2h, 30m); with --trials, whichever "
        "comes first.",
    ),
    max_params: str | None = typer.Option(
        None,
        "--max-params",
        help="Most parameters a recipe may add: a count (50000) or a share of the model (2%). Over it: never trained.",
    ),
    max_macs: str | None = typer.Option(
        None, "--max-macs", help="Most multiply-adds a recipe may add: a count or a share (1%)."
    ),
    max_latency: str | None = typer.Option(
        None, "--max-latency", help="Most forward time over the original's, e.g. 1.10 (measured per trial)."
    ),
    sampler: str = typer.Option("tpe", "--sampler", help="tpe or random."),
    pruner: str = typer.Option(
        "hyperband",
        "--pruner",
        help="hyperband, sha (successive halving) or none; each trial reports val top-1 after every epoch.",
    ),
    finalists: int = typer.Option(
        3, "--finalists", "-k", help="The best K recipes re-run over --seeds next to the control arms (0: no finish)."
    ),
    seeds: int = typer.Option(
        3, "--seeds", min=1, help="Seeds 0..S-1 of the finish (mean ± std, paired Δ with its 95% interval)."
    ),
    search_seed: int = typer.Option(
        100,
        "--search-seed",
        help="The seed of every trial and of the sampler (kept apart from the finish's seeds); "
        "also of the random weights of a model named without --checkpoint or --pretrained.",
    ),
    storage: str | None = typer.Option(
        None,
        "--storage",
        help="The study's store, shared by several processes or "
        "machines: a PostgreSQL URL for several machines "
        "(postgresql+psycopg://USER@HOST:PORT/DB; the postgres "
        "extra), or a journal file for one machine (default: "
        "OUTPUT_DIR/study.journal).",
    ),
    study: str = typer.Option("tune", "--study", help="The study's name in the store."),
    output_dir: Path | None = typer.Option(
        None,
        "--output-dir",
        "-o",
        help="The tune's folder: study, trials.jsonl, "
        "tune.json, best_recipe.yaml, the winner's "
        "model (default: MODEL-tune/).",
    ),
    adapter: bool = typer.Option(
        False, "--adapter", help="Save the winner as an adapter (adapter.safetensors) instead of a full model."
    ),
    json_path: str | None = typer.Option(None, "--json", help="Also write tune.json to FILE (- for stdout only)."),
    plot: Path | None = typer.Option(
        None,
        "--plot",
        help="Draw every trial (added parameters against top-1, pruned "
        "ones hollow), the finalists with error bars and the "
        "controls as lines, to FILE.png.",
    ),
    checkpoint: Path | None = CHECKPOINT,
    pretrained: bool = PRETRAINED,
    num_classes: str | None = NUM_CLASSES,
    input_size: str | None = INPUT_SIZE,
    *,
    config,
):
    """Search recipes within a budget, then re-run the best over seeds next to the control arms.

    Every trial is a fine-tune of one recipe (phase 1, plus searched phase-2 epochs) with --search-seed,
    reporting val top-1 after every epoch to the pruner (Optuna: TPE and Hyperband by default). A recipe
    over --max-params, --max-macs or --max-latency is never trained; a recipe whose fine-tune fails is never
    trained again, and a search whose first trials all fail stops with its reason. The study lives in
    --output-dir (a journal file), so the same command again after a kill continues it; the same command
    with --storage postgresql+psycopg://USER@HOST:PORT/DB --study NAME on several machines shares one
    study. A model named without weights gets random ones from --search-seed, the same in every process.
    Under torchrun every trial is
    DistributedDataParallel over all processes. The best --finalists recipes and the three control arms
    (original, head+norms, full) then run over seeds 0..S-1: the sweep's table, with the paired Δ to the
    best control and its 95% interval; the last line says whether any recipe beat it.
    """
    # deferred: torch, timm and Optuna load when the command runs, not for --help
    from ..files.atomic import check_writable
    from ..surgery.recipe import resolve_recipe
    from ..sweep.tune.by_name import tune_model
    from ..sweep.tune.space import space_from_options

    base = resolve_recipe(recipe)
    chosen, fixed_lr = space_from_options(
        base,
        space,
        lr=lr,
        per_stage=per_stage,
        position=position,
        r=r,
        stages=stages,
        module=module,
        gate=gate,
        squeeze=squeeze,
        phase2_epochs=phase2_epochs,
    )
    json_target(json_path)
    if plot is not None:
        plot = plot.expanduser()
        check_writable(plot)
        pyplot = import_pyplot()
    talk = json_path != "-" and is_main_process()
    result = tune_model(
        model,
        data,
        chosen,
        checkpoint=checkpoint,
        pretrained=pretrained,
        num_classes=num_classes,
        input_size=input_size,
        search_seed=search_seed,
        output_dir=output_dir,
        trials=trials,
        budget=budget,
        recipe=base,
        max_params=max_params,
        max_macs=max_macs,
        max_latency=max_latency,
        sampler=sampler,
        pruner=pruner,
        finalists=finalists,
        seeds=seeds,
        storage=storage,
        study=study,
        config=config.replace(lr=fixed_lr) if fixed_lr is not None else config,
        adapter=adapter,
        on_event=(lambda e: console(stderr=True).print(e.message)) if talk else None,
    )
    if not is_main_process():
        return
    out = result.output_dir
    if json_path is not None:
        write_json(json.loads((out / "tune.json").read_text()), json_path)
    if plot is not None:
        draw_tune(pyplot, result, model, plot)
    if talk:
        report(result, out, plot)


def report(result, out: Path, plot: Path | None) -> None:
    """The finish table, where the files are, and the verdict last."""
    if result.rows:
        note = (
            " The finish re-ran every finalist from scratch on seeds other than the search seed; val/ served "
            "both the search and the finish."
        )
        console().print(sweep_table(result.rows, False, 0, (), title="Tune: the finalists and the controls", note=note))
    files = [f"trials: {out / 'trials.jsonl'}", f"summary: {out / 'tune.json'}"]
    if result.best is not None:
        files.insert(
            0,
            f"best recipe: {out / 'best_recipe.yaml'}"
            + (f"; its model: {result.best_model}" if result.best_model else ""),
        )
    if plot is not None:
        files.append(f"plot: {plot}")
    say("; ".join(files))
    if result.verdict:
        say(result.verdict)


def draw_tune(pyplot, result, name: str, path: Path) -> None:
    """Every trial (added parameters against its search top-1: complete filled, pruned hollow, skipped ones
    as x on the bottom edge), the finalists' finish top-1 with error bars over the seeds, the controls as
    lines."""
    fig, ax = pyplot.subplots(figsize=(7.5, 4.8))
    trials = [t for t in result.trials if t["params_percent"] is not None]
    for state, style in (
        ("complete", dict(marker="o", color="C0")),
        ("pruned", dict(marker="o", markerfacecolor="none", color="C0")),
    ):
        points = [t for t in trials if t["state"] == state and t["top1"] is not None]
        ax.plot(
            [t["params_percent"] for t in points],
            [t["top1"] for t in points],
            linestyle="none",
            label=f"trials, {state} (search seed)",
            **style,
        )
    finals = [r for r in result.rows if r.arm == "se" and r.top1 is not None]
    ax.errorbar(
        [r.params_percent for r in finals],
        [r.top1 for r in finals],
        yerr=[r.top1_std for r in finals],
        marker="s",
        color="C3",
        linestyle="none",
        capsize=3,
        label="finalists (finish seeds)",
    )
    for r in finals:
        ax.annotate(
            f"trial {r.trial}", (r.params_percent, r.top1), textcoords="offset points", xytext=(4, 4), fontsize=7
        )
    control_lines(ax, result.rows)
    skipped = [t for t in trials if t["state"] == "skipped"]
    if skipped:
        low = ax.get_ylim()[0]
        ax.plot(
            [t["params_percent"] for t in skipped],
            [low] * len(skipped),
            "x",
            color="gray",
            label="over the limits (not trained)",
            clip_on=False,
        )
    ax.set_xlabel("parameters added (%)")
    ax.set_ylabel("val top-1 (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"retrofit tune: {name}")
    save_figure(pyplot, fig, path)
