"""`retrofit sweep`: the cost of every combination of r, position and stages, in one table; with --data
also its accuracy over seeds next to the control arms (columns and plot: :mod:`retrofit.cli.ablation`)."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import RetrofitError
from ..measure.excitation_plot import PLOT_MISSING  # no torch
from ..measure.fit import Col, FitTable  # rich only: no torch
from ..train.config import RUN_OPTIONS  # no torch
from .ablation import accuracy_caption, accuracy_cells, accuracy_columns, draw_accuracy, has_accuracy, save_figure
from .common import (
    AT,
    CHECKPOINT,
    INPUT_SIZE,
    NUM_CLASSES,
    PRETRAINED,
    app,
    console,
    fail_cleanly,
    json_target,
    plural,
    rounds_bar,
    say,
    write_json,
)
from .finetune import is_main_process
from .options import finetune_options


@app.command("sweep", short_help="Sweep r x position x stages: overhead, latency, accuracy.")
@fail_cleanly
@finetune_options(
    only=("epochs", "lr", *RUN_OPTIONS),
    notes={
        "epochs": "With --data, of each run (the full-network control: as many at --phase2-lr).",
        "lr": "With --data (SE arms, head+norms control).",
    },
)
def sweep_command(
    model: str = typer.Argument(..., help="A timm model name, e.g. resnet50."),
    r: str = typer.Option(
        "16",
        "--r",
        "-r",
        help="Reduction ratios, comma-separated, e.g. 2,4,8,16,32; an item may be "
        "a per-stage map (stage:r pairs), and then items are separated by "
        "';': '16;2:8,3:8,4:16,5:32' (stages a map does not name keep the "
        "recipe's r).",
    ),
    position: str = typer.Option(
        "standard", "--position", "-p", help="Positions, comma-separated: standard,pre,post,identity,inside."
    ),
    stages: str = typer.Option(
        "all", "--stages", help="Stage sets, comma-separated: all, a stage (3) or several joined by + (3+4)."
    ),
    recipe: str | None = typer.Option(
        None, "--recipe", "-R", help="Recipe for the other fields (squeeze, gate, bias...); default: standard."
    ),
    allow_wide: bool = typer.Option(
        False, "--allow-wide", help="Allow r below 1 (blocks wider than their input; still r >= 1/16)."
    ),
    at: str | None = AT,
    input_size: str | None = INPUT_SIZE,
    num_classes: str | None = NUM_CLASSES,
    latency: bool = typer.Option(
        False, "--latency", help="Also time each retrofitted model against the original (builds real models; slow)."
    ),
    batch: int = typer.Option(8, "--batch", help="Batch size of the latency runs."),
    latency_size: str | None = typer.Option(
        None, "--latency-size", help="C,H,W of the latency runs (default: --input-size)."
    ),
    runs: int = typer.Option(10, "--runs", help="Timed rounds for --latency (median ratio and its interval reported)."),
    json_path: str | None = typer.Option(None, "--json", help="Write the table as JSON to FILE (- for stdout)."),
    plot: Path | None = typer.Option(
        None,
        "--plot",
        help="Draw parameter and latency (or MAC) overhead against r, one "
        "line per position, to FILE.png; with --data: val top-1 "
        "against added parameters (or latency), error bars over "
        "seeds.",
    ),
    data: Path | None = typer.Option(
        None,
        "--data",
        "-d",
        help="ImageFolder (DATA/train/<class>/*, "
        "DATA/val/<class>/*): also fine-tune every combination "
        "(phase 1) and the control arms, and report val top-1 "
        "and loss.",
    ),
    seeds: int = typer.Option(
        1, "--seeds", help="With --data: seeds 0..K-1 per combination and control (mean ± std, paired differences)."
    ),
    checkpoint: Path | None = CHECKPOINT,
    pretrained: bool = PRETRAINED,
    *,
    config,
):
    """Sweep r x position x stages: added parameters, multiply-adds and (--latency) latency per combination.

    The model is traced once; without --latency or --data no SE block is built (counts come from the
    plan, on the meta device), so a 5 x 5 sweep costs about one add-se.

    With --data every combination is also retrofitted and fine-tuned (phase 1) once per seed, next to
    three control arms trained with the same seeds, data order and steps: the original at step 0, the
    original with its head and norm affine parameters trained, and the full original network at
    --phase2-lr. The table adds val top-1 and loss (mean ± std over seeds), the paired difference to
    the best control, and the Pareto front of top-1 against added parameters (or --latency).
    Under torchrun each run is DistributedDataParallel over all processes.
    """
    # deferred: torch and timm load when a command runs, not for --help
    from ..files.atomic import check_writable
    from ..surgery.recipe import resolve_recipe
    from ..sweep.by_name import sweep_model

    base = resolve_recipe(recipe, allow_wide=True if allow_wide else None, at=at)
    json_target(json_path)
    if plot is not None:
        plot = plot.expanduser()
        check_writable(plot)
        pyplot = import_pyplot()
    talk = json_path != "-" and is_main_process()
    with rounds_bar("timing each combination against the original, in turns", quiet=not latency or not talk) as bar:
        report = sweep_model(
            model,
            r,
            position,
            stages,
            recipe=base,
            checkpoint=checkpoint,
            pretrained=pretrained,
            num_classes=num_classes,
            input_size=input_size,
            latency=latency,
            batch=batch,
            latency_input_size=latency_size,
            runs=runs,
            data=data,
            seeds=seeds,
            config=config,
            on_event=progress(talk, bar),
        )
    out = report.to_dict()
    rows, name = report.rows, out["model"]
    if json_path != "-":
        say(
            (name, "bold"),
            f": {report.scan.summary()} sites at input {'x'.join(map(str, report.input_size))}; "
            f"{plural(sum(row.arm == 'se' for row in rows), 'combination')}; other fields: {base.describe()}",
        )
        console().print(sweep_table(rows, latency, batch, report.latency_input_size))
    if is_main_process():
        write_json(out, json_path)
    if plot is not None and is_main_process():
        (draw_accuracy if has_accuracy(rows) else draw)(pyplot, rows, name, plot, latency)
        if json_path != "-":
            say(f"saved {plot}")
    if out["verdict"] and json_path != "-":  # the last line: did any recipe beat the best control?
        say(out["verdict"])


def progress(talk: bool, bar):
    """The sweep's ``on_event``: each run's line on stderr (when it talks), each latency round to the bar."""

    def follow(event):
        if event.kind == "run" and talk:
            say(event.message, stderr=True)
        elif event.kind == "round" and bar is not None:
            bar(event)

    return follow


def sweep_table(rows, latency: bool, batch: int, size, title: str = "Sweep", note: str = ""):
    # deferred: torch and timm load when a command runs, not for --help
    from ..measure.report import _n, _pct, latency_cell

    caption = "MACs: multiply-adds (torch.utils.flop_counter FLOPs / 2), batch 1."
    if latency:
        caption += (
            f" latency: the retrofitted model's forward time over the original's, the two back to back in "
            f"each round, median over the rounds [its interval, at least 95%; noise: it holds 1, no "
            f"difference measured] (batch {batch}, {'x'.join(map(str, size))}, CPU unless on GPU)."
        )
    accuracy = has_accuracy(rows)
    if accuracy:
        caption += " " + accuracy_caption(rows, latency)
    caption += note
    # the combination, what it adds, its latency and accuracy stay at any width; the rest goes first
    cols = [
        Col("position", "left"),
        Col("r"),
        Col("stages"),
        Col("blocks", drop=4),
        Col("params added"),
        Col("% params"),
        Col("MACs added", drop=3),
        Col("% MACs", drop=1),
    ]
    if latency:
        cols += [Col("latency"), Col("ms", drop=5)]
    if accuracy:
        cols += accuracy_columns(rows)
    cols.append(Col("note", "left", drop=0, text=True))
    table = FitTable(cols, title=title, caption=caption)
    for row in rows:
        if row.arm != "se":  # a control arm: the original architecture, nothing added
            cells = [f"control: {row.arm}", "", "", "", "0", "", "", ""]
        else:
            cells = [
                row.position,
                row.r_label,
                row.stages_label,
                str(row.blocks),
                _n(row.params),
                _pct(row.params_percent),
                _n(row.macs),
                _pct(row.macs_percent),
            ]
        if latency:
            cells += [
                ""
                if row.latency is None
                else f"{row.latency.ratio:.3f}x"
                if row.latency_low is None
                else latency_cell(row.latency.ratio, row.latency_low, row.latency_high),
                "" if row.latency_ms is None else f"{row.latency_ms:.1f}",
            ]
        if accuracy:
            cells += accuracy_cells(row)
        note = row.note or (f"{row.skipped} site(s) skipped" if row.skipped else "")
        table.add_row(*cells, note)
    return table


def import_pyplot():
    """matplotlib's pyplot on a file backend, or one clear error when the `plot` extra is missing."""
    try:  # deferred: matplotlib is optional (the plot extra)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as pyplot  # deferred too, after the backend is chosen
    except ImportError:
        raise RetrofitError(PLOT_MISSING) from None
    return pyplot


def draw(pyplot, rows, name: str, path: Path, latency: bool) -> None:
    """Overhead against r, one line per position (and stage set, when several were swept). r is on a
    log2 axis; when an r is a per-stage map, the axis is the r values in the order given, each
    labelled as spelled on the command line."""
    # deferred: torch and timm load when a command runs, not for --help
    from ..sweep.rows import r_label

    numeric = all(isinstance(row.r, (int, float)) for row in rows)
    order = list(dict.fromkeys(row.r for row in rows))
    x_of = (lambda r: r) if numeric else order.index
    several_stages = len({row.stages for row in rows}) > 1
    lines: dict[str, list] = {}
    for row in rows:
        if row.note:
            continue
        label = row.position + (f" (stages {row.stages_label})" if several_stages else "")
        lines.setdefault(label, []).append(row)
    second = "latency" if latency else "macs_percent"
    fig, axes = pyplot.subplots(1, 2, figsize=(11, 4.2))
    for label, points in lines.items():
        points.sort(key=lambda p: x_of(p.r))
        xs = [x_of(p.r) for p in points]
        axes[0].plot(xs, [p.params_percent for p in points], marker="o", label=label)
        ys = [(p.latency.ratio - 1) * 100 if latency else p.macs_percent for p in points]
        axes[1].plot(xs, ys, marker="o", label=label)
    for ax, title in zip(
        axes, ("parameters added (%)", "latency overhead (%)" if second == "latency" else "multiply-adds added (%)")
    ):
        if numeric:
            ax.set_xscale("log", base=2)
            ticks = sorted({row.r for row in rows})
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        else:
            ax.set_xticks(range(len(order)), [r_label(r) for r in order], rotation=20, ha="right", fontsize=8)
        ax.set_xlabel("reduction ratio r" + ("" if numeric else " (per stage: stage:r)"))
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"SE retrofit sweep: {name}")
    save_figure(pyplot, fig, path)
