"""`retrofit fold`: fold the channel gates that learnt a constant into their neighbours, and save the result."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import RetrofitError
from .common import (
    BASE,
    FORCE,
    IMAGES,
    SAVED,
    app,
    console,
    fail_cleanly,
    globs,
    json_target,
    rounds_bar,
    say,
    write_json,
)
from .options import finetune_options


@app.command("fold", short_help="Fold the channel gates that learnt a constant into constant scales.")
@fail_cleanly
@finetune_options(only=("batch_size", "workers", "device"))
def fold_command(
    checkpoint: Path = SAVED,
    output: Path = typer.Option(
        ...,
        "--output",
        "-o",
        help="Save the folded model here: a folder (config.json, "
        "model.safetensors, README.md), or FILE.safetensors with "
        "its card FILE.README.md.",
    ),
    data: Path | None = typer.Option(
        None,
        "--data",
        "-d",
        help="The ImageFolder the model was fine-tuned on: needed "
        "for --tolerance above 0 and for --blocks whose "
        "excitation depends on the input; with it, val top-1 "
        "and loss are measured before and after.",
    ),
    tolerance: float | None = typer.Option(
        None,
        "--tolerance",
        "-t",
        help="Val top-1 points the folded model may lose "
        "(0 to 100): gates are folded by their mean "
        "excitation, least input-dependent first, "
        "as many as keep top-1 within this, found "
        "in at most log2(gates) + 2 evaluations. "
        "Default 0: only the input-independent "
        "gates, exactly (no data needed).",
    ),
    blocks: str | None = typer.Option(
        None,
        "--blocks",
        help="Block globs, e.g. 'layer4.*': fold only these (all of "
        "them, by their mean on --data, unless --tolerance is "
        "given).",
    ),
    images: int | None = IMAGES,
    adapter: bool = typer.Option(
        False,
        "--adapter",
        help="Save an adapter: the blocks left, the channel scales and "
        "the neighbour tensors the fold changed, with a hash of the "
        "base.",
    ),
    latency: bool = typer.Option(
        False,
        "--latency",
        help="Also time the folded model against the unfolded one: the median ratio with its interval over the rounds.",
    ),
    runs: int = typer.Option(10, "--runs", min=1, help="Timed rounds for --latency."),
    json_path: str | None = typer.Option(None, "--json", help="Write the numbers as JSON to FILE (- for stdout)."),
    base: Path | None = BASE,
    force: bool = FORCE,
    *,
    config,
):
    """Fold the channel gates of a saved model that learnt (almost) a constant into their neighbours."""
    # deferred: torch and timm load when a command runs, not for --help
    from ..files.atomic import check_writable
    from ..files.card import command_line
    from ..files.checkpoint import load, save_output
    from ..measure.latency import measure_latency
    from ..measure.report import blocks_table, fold_table, latency_json, latency_line, overhead_table
    from ..surgery.fold import info_of
    from ..surgery.info import get_info
    from ..sweep.fold import fold

    json_target(json_path)
    check_writable(output.expanduser())
    if any(p is not None and output.expanduser().resolve() == p.expanduser().resolve() for p in (checkpoint, base)):
        raise RetrofitError(f"--output {output} is an input file; input weights are never overwritten, choose another")
    model = load(checkpoint, base=base, force=force)
    result = fold(model, data, tolerance=tolerance, blocks=globs(blocks), images=images, config=config)
    timing = None
    if latency:
        with rounds_bar("timing the unfolded and the folded model, in turns", quiet=json_path == "-") as bar:
            timing = measure_latency(
                {"unfolded": model, "folded": result.model},
                input_size=info_of(model).input_size,
                runs=runs,
                on_event=bar,
            )
    base_record = get_info(result.model).base
    output, card = save_output(
        result.model,
        output,
        adapter=adapter,
        overhead=result.overhead_after,
        command=command_line(),
        base_name=base_record.name if base_record else None,
    )
    if json_path != "-":
        console().print(fold_table(result.blocks) if result.blocks else "no block folded")
        for title, report in (("before", result.overhead_before), ("after", result.overhead_after)):
            tables = [blocks_table(report)] if report.blocks else []
            console().print(*tables, overhead_table(report, title=f"Overhead {title} the fold"))
        say(result.summary())
        if timing is not None:
            say(latency_line(timing, "folded", "unfolded"))
        say(f"saved {'adapter ' if adapter else ''}{output}; card: {card}")
    write_json(
        {**result.to_dict(), **({"latency": latency_json(timing, "folded", "unfolded")} if timing else {})}, json_path
    )
