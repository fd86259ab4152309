"""`retrofit finetune`: train the SE blocks of a saved retrofitted model briefly on an ImageFolder.

Also used by ``retrofit add-se ... --finetune DIR``. Under ``torchrun`` every process runs this
command; only rank 0 prints and writes (see :mod:`retrofit.train.distributed`).
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

from ..errors import RetrofitError, excerpt
from .common import BASE, FORCE, SAVED, app, console, fail_cleanly, say
from .options import finetune_options

ADAPTER_FILE = "adapter.safetensors"  # `finetune --adapter`: the best model as an adapter, in the run folder


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a process on its own."""
    return int(os.environ.get("RANK", "0")) == 0


def run_finetune(
    model,
    data: Path,
    output_dir: Path,
    config,
    inputs: tuple[Path, ...] = (),
    quiet: bool = False,
    resumable: bool = True,
    said_random: bool = False,
    resume: bool = False,
    input_size=None,
):
    """Fine-tune ``model`` in place by ``config`` (a :class:`retrofit.FinetuneConfig`), print the results table
    (rank 0) and return the result. ``resumable``: the command takes ``--resume`` (``finetune`` does,
    ``add-se --finetune`` does not), for what a refusal or a Ctrl-C says.

    ``inputs``: the weight files this run was started from; none of them may be among the run's outputs.
    ``said_random``: the caller has said already that the weights are random (``add-se --finetune``).
    """
    # deferred: torch and timm load when a command runs, not for --help
    from ..files.provenance import random_weights
    from ..measure.report import results_table
    from ..train.distributed import check_device
    from ..train.finetune import finetune
    from ..train.run_dir import BEST_FILE, LAST_FILE, METRICS_FILE
    from ..train.state import STATE_FILE

    if config.device is not None:  # before anything is said or made (finetune() checks it too)
        check_device(config.device)
    output_dir = output_dir.expanduser()
    for name in (BEST_FILE, LAST_FILE, STATE_FILE, METRICS_FILE, ADAPTER_FILE):
        for given in inputs:
            if (output_dir / name).resolve() == Path(given).expanduser().resolve():
                raise RetrofitError(
                    f"{excerpt(given, bare=True)} would be overwritten by the fine-tuning run in "
                    f"{excerpt(output_dir)}; input "
                    f"weights are never overwritten, choose another --output-dir"
                )
    if not resume and (output_dir / STATE_FILE).exists():  # the library's words are resume=True
        raise RetrofitError(
            f"{excerpt(output_dir)} already holds a fine-tuning run; "
            + (
                "add --resume to continue it, delete it, or choose another --output-dir"
                if resumable
                else "delete it or choose another --output"
            )
        )
    main = is_main_process() and not quiet
    if main:  # what trains (SE blocks, a new 3-class head...) the run says once it has opened the data
        say(f"fine-tuning on {data}; checkpoints in {output_dir}")
        why = None if said_random else random_weights(model)
        if why:
            say(("note:", "yellow"), f" this model's weights are random ({why}): the results are only a demonstration")
    try:
        result = finetune(
            model, data, config, output_dir=output_dir, progress=main, resume=resume, input_size=input_size
        )
    except KeyboardInterrupt:
        if is_main_process():
            saved = (output_dir / STATE_FILE).is_file()
            say(("interrupted", "red"), f"; {how_to_continue(saved, output_dir, data, resumable)}", stderr=True)
        raise typer.Exit(130) from None
    if main:
        console().print(results_table(result))
        best = result.best
        say(
            f"best: {best['name']}, top-1 {best['top1']:.2f}% -> {output_dir / BEST_FILE}; last: "
            f"{output_dir / LAST_FILE}; metrics: {output_dir / METRICS_FILE}"
        )
        if result.skipped_images:
            say((f"{result.skipped_images} image(s) could not be decoded and were skipped", "yellow"))
    return result


def how_to_continue(saved: bool, output_dir: Path, data: Path, resumable: bool) -> str:
    """What a Ctrl-C leaves (``saved``: a finished epoch's state) and how to go on from it."""
    if not saved:
        return "no epoch had finished: nothing to resume"
    if resumable:
        return f"the finished epochs are saved in {output_dir}: rerun the same command with --resume to continue"
    return (
        f"the finished epochs are in {output_dir}, but add-se --finetune cannot resume; for a run that can, "
        f"save with `retrofit add-se ... --output FILE`, then `retrofit finetune FILE --data {data}`"
    )


@app.command("finetune", short_help="Fine-tune a retrofitted model: SE blocks first, optionally all.")
@fail_cleanly
@finetune_options
def finetune_command(
    checkpoint: Path = SAVED,
    data: Path = typer.Option(..., "--data", "-d", help="ImageFolder: DATA/train/<class>/* and DATA/val/<class>/*."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run saved in --output-dir."),
    output_dir: Path | None = typer.Option(
        None,
        "--output-dir",
        "-o",
        help="Checkpoints, best/last models, metrics.jsonl (default: CHECKPOINT's name + -finetune/).",
    ),
    input_size: str | None = typer.Option(
        None, "--input-size", help="C,H,W of the images fed to the model (default: the size it was retrofitted at)."
    ),
    base: Path | None = BASE,
    force: bool = FORCE,
    adapter: bool = typer.Option(
        False,
        "--adapter",
        help="Also save the best model as an adapter, "
        "OUTPUT_DIR/adapter.safetensors (the blocks and what "
        "changed, with a hash of the base).",
    ),
    *,
    config,
):
    """Fine-tune a retrofitted model briefly: SE blocks first (backbone frozen), optionally everything."""
    # deferred: torch and timm load when a command runs, not for --help
    from ..files.card import command_line, write_card
    from ..files.checkpoint import load, save
    from ..graph.model import resolve_input_size
    from ..measure.overhead import measure_overhead
    from ..surgery.info import get_info
    from ..surgery.strip import strip
    from ..train.run_dir import BEST_FILE

    model = load(checkpoint, base=base, force=force)
    size = resolve_input_size(model, input_size) if input_size is not None else None
    out = output_dir if output_dir is not None else checkpoint.expanduser().with_name(f"{checkpoint.stem}-finetune")
    result = run_finetune(
        model,
        data,
        out,
        config,
        inputs=tuple(p for p in (checkpoint, base) if p is not None),
        resume=resume,
        input_size=size,
    )
    if is_main_process():  # the card (and adapter) of the model the run hands over: the best one
        out = out.expanduser()
        handed = out / (ADAPTER_FILE if adapter else BEST_FILE)
        if adapter:
            save(model, handed, adapter=True)
        model.to("cpu")
        overhead = measure_overhead(strip(model), model, get_info(model).input_size)
        card = write_card(
            handed, model, overhead=overhead, result=result, command=command_line(), base_name=get_info(model).base.name
        )
        console().print(f"{'adapter: ' + str(handed) + '; ' if adapter else ''}card: {card}")
