"""`retrofit inspect`: what each channel gate of a saved model does on its data (the paper's "Role of Excitation")."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import BASE, FORCE, IMAGES, SAVED, app, console, fail_cleanly, globs, json_target, say, write_json
from .options import finetune_options


@app.command("inspect", short_help="Per channel gate: mean excitation, spreads, saturation, constancy.")
@fail_cleanly
@finetune_options(only=("batch_size", "workers", "device"))
def inspect_command(
    checkpoint: Path = SAVED,
    data: Path = typer.Option(
        ...,
        "--data",
        "-d",
        help="The ImageFolder the model was fine-tuned on "
        "(DATA/train/<class>/*, DATA/val/<class>/*); its val images "
        "are read.",
    ),
    images: int | None = IMAGES,
    output_change: bool = typer.Option(
        True,
        "--output-change/--no-output-change",
        help="Also measure each gate's constancy at the model's output: the relative change of the logits and the "
        "change of the loss with that gate at its mean excitation (one more pass over the images per gate).",
    ),
    json_path: str | None = typer.Option(
        None,
        "--json",
        help="Write the report as JSON to FILE (- for stdout), with each gate's mean excitation per channel.",
    ),
    plot: Path | None = typer.Option(
        None,
        "--plot",
        help="Draw the paper's figure to FILE (.png, .pdf, .svg): the "
        "mean excitation per channel, one line per class (needs the "
        "plot extra).",
    ),
    plot_blocks: str | None = typer.Option(
        None,
        "--plot-blocks",
        help="Block globs to draw, e.g. 'layer4.*' (default: the first gate of each stage and the last gate).",
    ),
    base: Path | None = BASE,
    force: bool = FORCE,
    *,
    config,
):
    """Read every channel gate (se, ese, eca, ceca) of a saved model on the val images of its data."""
    # deferred: torch and timm load when a command runs, not for --help
    from ..errors import RetrofitError, excerpt
    from ..files.atomic import atomic_write, check_writable
    from ..files.checkpoint import load
    from ..measure.excitation_plot import excitation_figure
    from ..measure.report import excitation_table
    from ..surgery.recipe_fields import matches
    from ..train.inspect import inspect

    json_target(json_path)
    if plot is not None:
        check_writable(plot)
    report = inspect(
        load(checkpoint, base=base, force=force), data, images=images, output_change=output_change, config=config
    )
    chosen = None
    if plot_blocks is not None:
        chosen = [b for b in report.blocks if any(matches(b.path, g) for g in globs(plot_blocks))]
        if not chosen:
            raise RetrofitError(f"--plot-blocks {excerpt(plot_blocks)} names no inspected gate")
    if json_path != "-":
        say(
            f"{checkpoint.name} on {report.data}: {report.images} val images, {len(report.classes)} classes; val "
            f"top-1 {report.top1:.2f}%, loss {report.val_loss:.4f}"
        )
        console().print(excitation_table(report.blocks))
        for path, why in report.others:
            say((f"not inspected: {path}: {why}", "dim"))
    write_json(report.to_dict(), json_path)
    if plot is not None:
        fig = excitation_figure(report.blocks, report.classes, chosen)
        with atomic_write(plot.expanduser()) as tmp:
            fig.savefig(tmp, format=plot.suffix.lstrip(".") or "png")
        if json_path != "-":
            say(f"figure: {plot}")
