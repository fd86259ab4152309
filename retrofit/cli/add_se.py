"""`retrofit add-se`: insert blocks by a recipe, report the overhead, optionally save."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import RetrofitError, excerpt
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
    print_skipped,
    rounds_bar,
    say,
    write_json,
)
from .finetune import is_main_process, run_finetune
from .options import finetune_options, recipe_option


@app.command("add-se", short_help="Insert SE blocks by a recipe; report the sites and the overhead.")
@fail_cleanly
@finetune_options
def add_se_command(
    model: str = typer.Argument(..., help="A timm model name, e.g. resnet101."),
    recipe: str | None = typer.Option(
        None, "--recipe", "-R", help="Built-in recipe name or YAML file (default: standard)."
    ),
    position: str | None = recipe_option("position"),
    r: str | None = recipe_option("r"),
    squeeze: str | None = recipe_option("squeeze"),
    gate: str | None = recipe_option("gate"),
    stages: str | None = recipe_option("stages"),
    divisor: str | None = recipe_option("divisor"),
    min_width: str | None = recipe_option("min_width"),
    bias: bool | None = recipe_option("bias"),
    init: str | None = recipe_option("init"),
    module: str | None = recipe_option("module"),
    allow_wide: bool = recipe_option("allow_wide"),
    kinds: str | None = recipe_option("kinds"),
    only: str | None = recipe_option("only"),
    skip: str | None = recipe_option("skip"),
    at: str | None = AT,
    input_size: str | None = INPUT_SIZE,
    checkpoint: Path | None = CHECKPOINT,
    pretrained: bool = PRETRAINED,
    num_classes: str | None = NUM_CLASSES,
    every_block: bool = typer.Option(
        False,
        "--blocks",
        help="List every inserted block (default: per stage the first and the last, the others folded into one row).",
    ),
    json_path: str | None = typer.Option(None, "--json", help="Write the numbers as JSON to FILE (- for stdout)."),
    output: Path | None = typer.Option(
        None,
        "--output",
        "-o",
        help="Save the retrofitted model: a folder "
        "(config.json, model.safetensors, README.md: its "
        "model card with the Hub's metadata) for "
        "retrofit.from_pretrained, or a single "
        "FILE.safetensors for retrofit.load, with its card "
        "FILE.README.md beside it.",
    ),
    adapter: bool = typer.Option(
        False,
        "--adapter",
        help="With --output: save an adapter, only the blocks (and a new "
        "head, and what phase 2 changed) with a hash of the base "
        "weights (adapter_model.safetensors in a folder); "
        "retrofit.from_pretrained(OUTPUT, base=CHECKPOINT) rebuilds "
        "the model.",
    ),
    finetune: Path | None = typer.Option(
        None,
        "--finetune",
        help="Then fine-tune on this ImageFolder (DIR/train, "
        "DIR/val), with the fine-tune options below (those "
        "of `retrofit finetune`); --output gets the best "
        "model, checkpoints go to OUTPUT's name + -add-se/. "
        "It cannot be resumed: for a run to resume, save "
        "with `add-se ... --output F`, then `retrofit "
        "finetune F --data DIR` (which takes --resume).",
    ),
    latency: bool = typer.Option(
        False,
        "--latency",
        help="Also time the retrofitted model against the original: the "
        "median ratio of the two, back to back in each round, with "
        "its interval over the rounds (at least 95%).",
    ),
    batch: int = typer.Option(8, "--batch", help="Batch size of the --latency runs."),
    runs: int = typer.Option(10, "--runs", help="Timed rounds for --latency (each times both models)."),
    meta: bool | None = typer.Option(
        None,
        "--meta/--no-meta",
        help="Build the model on the meta device (no weights, "
        "no memory); default: when nothing needs real "
        "weights (no --output, --checkpoint, --pretrained, "
        "--latency, --finetune).",
    ),
    *,
    config,
):
    """Insert SE blocks by a recipe and report the sites and the overhead.

    The recipe options override the fields of --recipe (default: standard). The block fields (--r, --squeeze,
    --gate, --divisor, --min-width, --init, --module) also take stage:value pairs, e.g. --r 2:8,3:8,4:16,5:32:
    stages not named keep the recipe's value, default:V sets them.
    """
    # deferred: torch and timm load when a command runs, not for --help
    from ..files.card import command_line
    from ..files.checkpoint import save_output
    from ..files.create import create
    from ..surgery.recipe import resolve_recipe

    chosen = resolve_recipe(
        recipe,
        position=position,
        r=r,
        squeeze=squeeze,
        gate=gate,
        stages=stages,
        divisor=divisor,
        min_width=min_width,
        bias=bias,
        init=init,
        module=module,
        allow_wide=True if allow_wide else None,
        kinds=kinds,
        only=only,
        skip=skip,
        at=at,
    )
    json_target(json_path)
    check_output(output, adapter, finetune, checkpoint, pretrained, config)
    talk = json_path != "-"
    with rounds_bar("timing the original and the retrofitted model, in turns", quiet=not latency or not talk) as bar:
        made = create(
            model,
            chosen,
            checkpoint=checkpoint,
            pretrained=pretrained,
            num_classes=num_classes,
            input_size=input_size,
            meta=meta,
            latency=latency,
            batch=batch,
            runs=runs,
            on_event=bar,
            weights_needed=output is not None or finetune is not None,
        )
    if talk:
        report(made, every_block, warn_random=output is not None or finetune is not None)
    write_json(made.to_dict(), json_path)
    result = None
    if finetune is not None:  # the best epoch by val top-1 (step 0 included) is what --output gets
        result = run_finetune(
            made.model,
            finetune,
            output.with_name(f"{output.stem}-add-se"),
            config,
            quiet=not talk,
            resumable=False,
            said_random=True,
            inputs=tuple(p for p in (checkpoint,) if p is not None),
        )
    if output is not None and is_main_process():
        weights, card = save_output(
            made.model,
            output,
            adapter=adapter,
            overhead=made.overhead,
            result=result,
            command=command_line(),
            base_name=made.base_name,
        )
        if talk:
            say(saved_line(output, weights, card, adapter, made.model))


def check_output(output, adapter: bool, finetune, checkpoint, pretrained: bool, config) -> None:
    """What add-se's --output, --adapter and --finetune need, said before anything is built."""
    # deferred: torch and timm load when a command runs, not for --help
    from ..files.atomic import check_writable
    from ..files.checkpoint import outputs_of

    if finetune is not None and output is None:
        raise RetrofitError(
            "--finetune needs --output FILE for the fine-tuned model (its checkpoints go to FILE's name + -add-se/)"
        )
    if finetune is not None and config.device is not None:
        from ..train.distributed import check_device  # deferred: torch loads when a command runs

        check_device(config.device)  # before the model is built
    if output is not None:
        written = outputs_of(output)
        if output.expanduser().is_file() and output.suffix != ".safetensors":
            raise RetrofitError(
                f"--output {excerpt(output)} is a file; give a folder, or a file name ending in .safetensors"
            )
        check_writable(written[0])
        given = Path(checkpoint).expanduser().resolve() if checkpoint is not None else None
        if given is not None and any(p.resolve() == given for p in written):
            raise RetrofitError(
                f"--output {excerpt(output)} is the input checkpoint; input weights are never "
                f"overwritten, choose another file"
            )
    if adapter and output is None:
        raise RetrofitError("--adapter needs --output FILE for the adapter")
    if adapter and checkpoint is None and not pretrained:
        raise RetrofitError(
            "--adapter needs a base others can rebuild: --checkpoint FILE or --pretrained (random "
            "weights cannot be made again)"
        )


def report(made, every_block: bool, warn_random: bool) -> None:
    """add-se's tables and lines (rank 0)."""
    # deferred: torch and timm load when a command runs, not for --help
    from ..graph.model import model_name
    from ..measure.report import blocks_table, latency_line, overhead_table, sites_by_stage
    from ..surgery.info import get_info

    found, named, size = made.scan, made.named, made.scan.traced.input_size
    say(
        (model_name(made.model), "bold"),
        f": {found.summary()}{f', {len(named)} named' if named else ''} sites at "
        f"input {'x'.join(map(str, size))}; recipe: {made.recipe.describe()}",
    )
    console().print(sites_by_stage(found, named))
    console().print(blocks_table(made.overhead, made.recipe.block.module, every=every_block))
    console().print(overhead_table(made.overhead))
    console().print(str(made.trainable))
    if made.latency is not None:
        say(latency_line(made.latency))
    print_skipped(made.skipped, found.traced.opaque)
    if found.pyramid_note():
        say((found.pyramid_note(), "dim"))
    if warn_random and get_info(made.model).weights == "random":
        say(
            ("note:", "yellow"),
            f" {made.base_name.split(',')[0]} has random weights (no --checkpoint or "
            f"--pretrained): its sites and costs hold for any weights, but a fine-tune of it is only a demonstration",
        )


def saved_line(output: Path, weights: Path, card: Path, adapter: bool, model) -> str:
    """What add-se says it saved, and how to load it."""
    # deferred: torch and timm load when a command runs, not for --help
    from ..files.adapter import state_bytes

    folder = output.suffix != ".safetensors"
    load = "retrofit.from_pretrained" if folder else "retrofit.load"
    if not adapter:
        return f"saved {output} (load with {load}); card: {card}"
    size, full = weights.stat().st_size, state_bytes(model)
    return (
        f"saved adapter {output}: {size / 1e6:.1f} MB, {100 * size / full:.1f}% of the full model's "
        f"{full / 1e6:.1f} MB (load with {load}(path, base=...) or `retrofit finetune {output.name}"
        f"{'/' if folder else ''} --base ...`); card: {card}"
    )
