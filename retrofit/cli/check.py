"""`retrofit check`: does the pass work on these models (or on one model of every timm family)?"""

from __future__ import annotations

import time

import typer

from ..errors import RetrofitError
from ..measure.fit import Col, FitTable  # rich only: no torch
from .common import app, console, fail_cleanly, json_target, say, write_json


def _row(r) -> tuple[str, ...]:
    blocks = "/".join(str(r.blocks.get(p, "-")) for p in ("standard", "inside")) if r.blocks else ""
    params = (
        "/".join(f"{r.params_added[p]:,}" if p in r.params_added else "-" for p in ("standard", "inside"))
        if r.params_added
        else ""
    )
    size = "x".join(map(str, r.input_size[1:])) if r.input_size else ""
    result = r.status if r.ok else f"{r.status}: {r.reason}"
    return (
        r.family or "",
        r.model,
        size,
        *(str(r.sites.get(k, "")) for k in ("residual", "inception", "conv3x3")),
        str(r.skipped),
        blocks,
        params,
        f"{r.seconds:.1f}",
        result,
    )


def results_table(results) -> FitTable:
    """One row per model; the model, its blocks, parameters and result are never left out."""
    cols = [
        Col("family", "left", drop=4),
        Col("model", "left"),
        Col("input", drop=2),
        Col("residual", drop=5),
        Col("inception", drop=1),
        Col("conv3x3", drop=6),
        Col("skipped", drop=3),
        Col("blocks std/inside"),
        Col("params added std/inside"),
        Col("s", drop=0),
        Col("result", "left", text=True),
    ]
    table = FitTable(cols, title="Coverage check")
    for r in results:
        style = None if r.ok else ("dim" if r.status == "no sites" else "red")
        table.add_row(*_row(r), style=style)
    return table


def summary_line(summary: dict, seconds: float) -> str:
    return (
        f"{summary['models']} models: {summary['ok']} ok, {summary['no sites']} no sites, "
        f"{summary['unsupported']} unsupported, {summary['fail']} fail; "
        f"{100 * summary['success_rate']:.1f}% of the models with merges pass; {seconds:.0f} s"
    )


@app.command("check", short_help="Check the pass on models (or one of every timm family).")
def check_command(
    models: list[str] | None = typer.Argument(None, help="timm model names to check."),
    all_families: bool = typer.Option(
        False, "--all-families", help="Check the smallest model (fewest parameters) of every timm family."
    ),
    family: list[str] | None = typer.Option(
        None, "--family", help="With --all-families: only this family (repeatable)."
    ),
    time_limit: float = typer.Option(300.0, "--time-limit", help="Seconds per model before it counts as failed."),
    json_path: str | None = typer.Option(None, "--json", help="Write the results as JSON to FILE (- for stdout)."),
    r: str = typer.Option(
        "16",
        "--r",
        "-r",
        help="Reduction ratio of the blocks, or per stage, e.g. 2:8,3:8,4:16,5:32 "
        "(stages not named: 16); each block's parameters are checked against "
        "2Cw + w + C, w = max(1, floor(C/r + 1/2)) with its stage's r.",
    ),
):
    """Check the pass on models: sites found, SE inserted at the standard and inside positions,
    forward and backward run, output shape and values preserved, parameters as the paper counts.

    One row per model, a summary line; exit status 1 when a model fails (an unknown name included).
    """
    if _check(models, all_families, family, time_limit, json_path, r):
        raise typer.Exit(1)


@fail_cleanly
def _check(models, all_families, family, time_limit, json_path, r="16") -> int:
    """Run the check and print it; return the number of failed models."""
    # deferred: torch and timm load when a command runs, not for --help
    from ..sweep.check import check_models, parse_ratio, smallest_per_family, summarize

    if not models and not all_families:
        raise RetrofitError(
            "name the models to check (e.g. `retrofit check resnet50 vit_tiny_patch16_224`) or pass --all-families"
        )
    ratio = parse_ratio(r)  # a bad --r: one line, before any model is built
    json_target(json_path)
    quiet = json_path == "-"
    items: list = list(models or [])
    start = time.perf_counter()
    if all_families:
        if not quiet:
            say(("picking the smallest model of each timm family (parameters counted on meta)...", "dim"), stderr=True)
        items += smallest_per_family(only=family or None)

    def progress(event):
        r = event.data["result"]
        if not quiet:
            mark = ("ok", "green") if r.ok else (r.status, "red")
            say((f"{r.family or ''} {r.model}", "dim"), " ", mark, f" {'' if r.ok else r.reason[:120]}", stderr=True)

    results = check_models(items, time_limit_s=time_limit, on_event=progress, r=ratio)
    summary = summarize(results)
    seconds = time.perf_counter() - start
    if not quiet:
        console().print(results_table(results))
        console().print(summary_line(summary, seconds))
    # deferred: torch and timm load when a command runs, not for --help
    from ..sweep.rows import r_label

    write_json(
        {
            "summary": {**summary, "seconds": round(seconds, 1), "r": r_label(ratio)},
            "results": [r.to_dict() for r in results],
        },
        json_path,
    )
    return summary["fail"]
