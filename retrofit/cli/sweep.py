"""`retrofit sweep`: the cost of every combination of r, position and stages, in one table."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import RetrofitError
from .common import INPUT_SIZE, NUM_CLASSES, app, build_model, console, fail_cleanly, json_target, say, write_json

PLOT_MISSING = ("--plot needs matplotlib, which is not installed; install the extra: "
                "pip install -c constraints.txt 'retrofit[plot]' (or drop --plot)")


@app.command("sweep")
@fail_cleanly
def sweep_command(
    model: str = typer.Argument(..., help="A timm model name, e.g. resnet50."),
    r: str = typer.Option("16", "--r", "-r", help="Reduction ratios, comma-separated, e.g. 2,4,8,16,32."),
    position: str = typer.Option("standard", "--position", "-p",
                                 help="Positions, comma-separated: standard,pre,post,identity,inside."),
    stages: str = typer.Option("all", "--stages",
                               help="Stage sets, comma-separated: all, a stage (3) or several joined by + (3+4)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", "-R",
                                         help="Recipe for the other fields (squeeze, gate, bias...); default: standard."),
    input_size: Optional[str] = INPUT_SIZE,
    num_classes: Optional[str] = NUM_CLASSES,
    latency: bool = typer.Option(False, "--latency", help="Also time each retrofitted model against the original (builds real models; slow)."),
    batch: int = typer.Option(8, "--batch", help="Batch size of the latency runs."),
    latency_size: Optional[str] = typer.Option(None, "--latency-size", help="C,H,W of the latency runs (default: --input-size)."),
    runs: int = typer.Option(10, "--runs", help="Timed rounds per model for --latency (median reported)."),
    json_path: Optional[str] = typer.Option(None, "--json", help="Write the table as JSON to FILE (- for stdout)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Draw parameter and latency (or MAC) overhead against r, one line per position, to FILE.png."),
):
    """Sweep r x position x stages: added parameters, multiply-adds and (--latency) latency per combination.

    The model is traced once; without --latency no SE block is built (counts come from the plan,
    on the meta device), so a 5 x 5 sweep costs about one add-se.
    """
    from ..checkpoint import check_writable
    from ..insert import model_name
    from ..measure import count_params
    from ..meta import build_and_scan
    from ..models import resolve_input_size
    from ..recipe import resolve_recipe
    from ..sweep import parse_axis, parse_stages, sweep

    base = resolve_recipe(recipe)
    ratios = parse_axis("r", r, lambda v: base.replace(r=v).r)
    positions = parse_axis("position", position, lambda v: base.replace(position=v).position)
    stage_sets = parse_axis("stages", stages, parse_stages)
    if batch < 1 or runs < 1:
        raise RetrofitError(f"--batch and --runs must be at least 1, got {batch} and {runs}")
    json_target(json_path)
    if plot is not None:
        plot = plot.expanduser()
        check_writable(plot)
        pyplot = import_pyplot()
    net, found = build_and_scan(lambda: build_model(model, None, False, num_classes), input_size, meta=not latency)
    size = found.traced.input_size
    timing_size = resolve_input_size(net, latency_size) if latency_size is not None else size
    rows = sweep(net, ratios, positions, stage_sets, recipe=base, input_size=size, latency=latency, batch=batch,
                 latency_input_size=timing_size, runs=runs, found=found)
    name = model_name(net)
    data = {"model": name, "input_size": list(size), "recipe": base.to_dict(),
            "latency": {"batch": batch, "input_size": list(timing_size), "runs": runs} if latency else None,
            "base": {"params": count_params(net), "macs": found.macs},
            "rows": [row.to_dict() for row in rows]}
    if json_path != "-":
        say((name, "bold"), f": {found.summary()} sites at input {'x'.join(map(str, size))}; "
            f"{len(rows)} combinations; other fields: {base.describe()}")
        console().print(sweep_table(rows, latency, batch, timing_size))
    write_json(data, json_path)
    if plot is not None:
        draw(pyplot, rows, name, plot, latency)
        if json_path != "-":
            say(f"saved {plot}")


def sweep_table(rows, latency: bool, batch: int, size):
    from rich.table import Table

    from ..report import _n, _pct

    caption = "MACs: multiply-adds (torch.utils.flop_counter FLOPs / 2), batch 1."
    if latency:
        caption += (f" latency: median forward time of the retrofitted model over the original's, measured in "
                    f"turns in the same run (batch {batch}, {'x'.join(map(str, size))}, CPU unless on GPU).")
    table = Table(title="Sweep", title_justify="left", caption=caption, caption_justify="left")
    columns = ["position", "r", "stages", "blocks", "params added", "% params", "MACs added", "% MACs"]
    if latency:
        columns += ["latency", "ms"]
    for col in columns:
        table.add_column(col, justify="left" if col == "position" else "right")
    table.add_column("note", justify="left")
    for row in rows:
        cells = [row.position, f"{row.r:g}", row.stages_label, str(row.blocks), _n(row.params),
                 _pct(row.params_percent), _n(row.macs), _pct(row.macs_percent)]
        if latency:
            cells += ["" if row.latency is None else f"{row.latency:.3f}x",
                      "" if row.latency_ms is None else f"{row.latency_ms:.1f}"]
        note = row.note or (f"{row.skipped} site(s) skipped" if row.skipped else "")
        table.add_row(*cells, note)
    return table


def import_pyplot():
    """matplotlib's pyplot on a file backend, or one clear error when the `plot` extra is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as pyplot
    except ImportError:
        raise RetrofitError(PLOT_MISSING) from None
    return pyplot


def draw(pyplot, rows, name: str, path: Path, latency: bool) -> None:
    """Overhead against r, one line per position (and stage set, when several were swept)."""
    import os

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
        points.sort(key=lambda p: p.r)
        xs = [p.r for p in points]
        axes[0].plot(xs, [p.params_percent for p in points], marker="o", label=label)
        ys = [(p.latency - 1) * 100 if latency else p.macs_percent for p in points]
        axes[1].plot(xs, ys, marker="o", label=label)
    for ax, title in zip(axes, ("parameters added (%)", "latency overhead (%)" if second == "latency"
                                else "multiply-adds added (%)")):
        ax.set_xscale("log", base=2)
        ticks = sorted({row.r for row in rows})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.set_xlabel("reduction ratio r")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"SE retrofit sweep: {name}")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    try:
        fig.savefig(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise RetrofitError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)
        pyplot.close(fig)
