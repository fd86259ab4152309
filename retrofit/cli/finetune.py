"""`retrofit finetune`: train the SE blocks of a saved retrofitted model briefly on an ImageFolder.

Also used by ``retrofit add-se ... --finetune DIR``. Under ``torchrun`` every process runs this
command; only rank 0 prints and writes (see :mod:`retrofit.train.distributed`).
"""
from __future__ import annotations

import functools
import inspect
import os
from pathlib import Path
from typing import Any

import typer

from ..errors import RetrofitError
from .common import app, console, fail_cleanly, say

ADAPTER_FILE = "adapter.safetensors"  # `finetune --adapter`: the best model as an adapter, in the run folder


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a process on its own."""
    return int(os.environ.get("RANK", "0")) == 0


def run_finetune(model, data: Path, output_dir: Path, inputs: tuple[Path, ...] = (), quiet: bool = False,
                 resumable: bool = True, said_random: bool = False, **options: Any):
    """Fine-tune ``model`` in place, print the results table (rank 0) and return the result; ``options``:
    the keyword arguments of :func:`retrofit.finetune` (``epochs``...). ``resumable``: the command takes
    ``--resume`` (``finetune`` does, ``add-se --finetune`` does not), for what a refusal or a Ctrl-C says.

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

    if options.get("device") is not None:  # before anything is said or made (finetune() checks it too)
        check_device(options["device"])
    output_dir = output_dir.expanduser()
    for name in (BEST_FILE, LAST_FILE, STATE_FILE, METRICS_FILE, ADAPTER_FILE):
        for given in inputs:
            if (output_dir / name).resolve() == Path(given).expanduser().resolve():
                raise RetrofitError(f"{given} would be overwritten by the fine-tuning run in {output_dir}; input "
                                    f"weights are never overwritten, choose another --output-dir")
    if not options.get("resume") and (output_dir / STATE_FILE).exists():  # the library's words are resume=True
        raise RetrofitError(f"{output_dir} already holds a fine-tuning run; " + (
            "add --resume to continue it, delete it, or choose another --output-dir" if resumable else
            "delete it or choose another --output"))
    main = is_main_process() and not quiet
    if main:  # what trains (SE blocks, a new 3-class head...) the run says once it has opened the data
        say(f"fine-tuning on {data}; checkpoints in {output_dir}")
        why = None if said_random else random_weights(model)
        if why:
            say(("note:", "yellow"), f" this model's weights are random ({why}): the results are only a demonstration")
    try:
        result = finetune(model, data, output_dir=output_dir, progress=main, **options)
    except KeyboardInterrupt:
        if is_main_process():
            saved = (output_dir / STATE_FILE).is_file()
            say(("interrupted", "red"), f"; {how_to_continue(saved, output_dir, data, resumable)}", stderr=True)
        raise typer.Exit(130) from None
    if main:
        console().print(results_table(result))
        best = result.best
        say(f"best: {best['name']}, top-1 {best['top1']:.2f}% -> {output_dir / BEST_FILE}; last: "
            f"{output_dir / LAST_FILE}; metrics: {output_dir / METRICS_FILE}")
        if result.skipped_images:
            say((f"{result.skipped_images} image(s) could not be decoded and were skipped", "yellow"))
    return result


def how_to_continue(saved: bool, output_dir: Path, data: Path, resumable: bool) -> str:
    """What a Ctrl-C leaves (``saved``: a finished epoch's state) and how to go on from it."""
    if not saved:
        return "no epoch had finished: nothing to resume"
    if resumable:
        return f"the finished epochs are saved in {output_dir}: rerun the same command with --resume to continue"
    return (f"the finished epochs are in {output_dir}, but add-se --finetune cannot resume; for a run that can, "
            f"save with `retrofit add-se ... --output FILE`, then `retrofit finetune FILE --data {data}`")


EPOCHS = typer.Option(1, "--epochs", "-e", min=0, help="Phase-1 epochs: only the SE blocks (and a new head) train.")

# The regularisers a timm user expects, in FINETUNE_OPTIONS below (so in every command that fine-tunes).
# Defaults from benchmarks/transfer.py (README, "Does SE help?"): each help text says what it found.
SMOOTHING = typer.Option(0.1, "--smoothing", help="Label smoothing (timm's LabelSmoothingCrossEntropy; 0: plain "
                                                  "cross-entropy). Default 0.1: timm's default, and in "
                                                  "benchmarks/transfer.py (digits transfer, 5 seeds) it added +0.89 "
                                                  "points of top-1 to head + SE [95% CI -0.01, +1.79] (+0.67 [+0.47, "
                                                  "+0.87] in an earlier run).")
MIXUP = typer.Option(0.0, "--mixup", help="Mixup alpha (timm.data.Mixup), e.g. 0.2; an odd micro-batch mixes all but "
                                          "its last image. Default 0: in benchmarks/transfer.py mixup 0.2 changed "
                                          "top-1 by +0.04 points [-0.90, +0.99]: no gain there.")
CUTMIX = typer.Option(0.0, "--cutmix", help="CutMix alpha (timm.data.Mixup; with --mixup, one of the two per batch), "
                                            "e.g. 1.0. Default 0.")
EMA_DECAY = typer.Option(None, "--ema-decay", help="Keep a model EMA (timm ModelEmaV3, decay warm-up on), e.g. 0.999; "
                                                   "each epoch gets an 'epoch N (ema)' row, which may be the best. "
                                                   "Default off: in benchmarks/transfer.py an EMA of 0.99 changed "
                                                   "top-1 by -0.54 points [-1.17, +0.10] over 50 steps.")
CLIP_GRAD = typer.Option(None, "--clip-grad", help="Clip gradients before each step (timm dispatch_clip_grad), e.g. "
                                                   "1.0. Default off.")
CLIP_MODE = typer.Option("norm", "--clip-mode", help="norm, value or agc (adaptive gradient clipping).")
BACKBONE_LR_SCALE = typer.Option(1.0, "--backbone-lr-scale", help="The pretrained parameters train at the phase's lr x "
                                                                  "this; the new blocks and a new head at the full lr "
                                                                  "(timm lr_scale groups). Default 1: one rate.")
CHANNELS_LAST = typer.Option(False, "--channels-last/--no-channels-last", help="Train in channels_last memory format "
                                                                               "(faster convolutions on recent GPUs).")
DISTILL = typer.Option(False, "--distill/--no-distill", help="Add the KL divergence to the original network's logits "
                                                             "(the model with its blocks bypassed: no extra weights). "
                                                             "Phase 2 keeps a frozen copy as the teacher. Default off: "
                                                             "in benchmarks/transfer.py it changed top-1 by -0.40 "
                                                             "points [-1.41, +0.61] in phase 1 and -8.57 [-12.15, "
                                                             "-4.99] in phase 2.")
DISTILL_WEIGHT = typer.Option(1.0, "--distill-weight", help="Weight of the distillation term (the label loss has "
                                                            "weight 1).")
DISTILL_TEMPERATURE = typer.Option(1.0, "--distill-temperature", help="Distillation temperature T (the term is scaled "
                                                                      "by T^2); timm's default 1.")


# Every option of the fine-tune itself, one definition for `retrofit finetune`, `add-se --finetune` and
# the runs of `sweep --data` and `tune` (name -> annotation and typer option): @finetune_options gives a
# command all of them, or the ones it names.
FINETUNE_OPTIONS: dict[str, tuple[Any, Any]] = {
    "epochs": (int, EPOCHS),
    "phase2_epochs": (int,
                      typer.Option(0, "--phase2-epochs", min=0, help="Then train everything for this many epochs.")),
    "lr": (float, typer.Option(1e-3, "--lr", help="Phase-1 learning rate.")),
    "phase2_lr": (float | None, typer.Option(None, "--phase2-lr", help="Phase-2 learning rate (default: lr / 10); "
                                                                          "in sweep --data and tune, the rate of the "
                                                                          "full-network control.")),
    "batch_size": (int, typer.Option(32, "--batch-size", "-b", min=1, help="Global batch size (over all processes).")),
    "accum_steps": (int,
                    typer.Option(1, "--accum-steps", min=1, help="Gradient accumulation: micro-batches per step.")),
    "opt": (str, typer.Option("adamw", "--opt", help="timm optimizer name (adamw, sgd, lamb...).")),
    "weight_decay": (float, typer.Option(0.0, "--weight-decay", help="Weight decay.")),
    "sched": (str, typer.Option("cosine", "--sched", help="timm scheduler name (cosine, step, plateau...).")),
    "warmup_epochs": (int, typer.Option(0, "--warmup-epochs", min=0, help="Warm-up epochs of the scheduler.")),
    "seed": (int, typer.Option(0, "--seed", help="Data order, augmentation and a new head follow it.")),
    "augment": (bool, typer.Option(True, "--augment/--no-augment", help="timm's training augmentation.")),
    "train_head": (bool | None, typer.Option(None, "--train-head/--freeze-head", help="Train the classifier in "
                                                                                         "phase 1 (default: only a new "
                                                                                         "one).")),
    "train_norms": (bool, typer.Option(False, "--train-norms/--freeze-norms", help="Phase 1 also trains the norm "
                                                                                   "layers' affine parameters "
                                                                                   "(statistics stay frozen).")),
    "workers": (int, typer.Option(2, "--workers", "-j", min=0, help="Data-loading processes per training process (the "
                                                                    "weights do not depend on it).")),
    "device": (str | None,
               typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: cuda when available).")),
    "smoothing": (float, SMOOTHING), "mixup": (float, MIXUP), "cutmix": (float, CUTMIX),
    "ema_decay": (float | None, EMA_DECAY), "clip_grad": (float | None, CLIP_GRAD), "clip_mode": (str, CLIP_MODE),
    "backbone_lr_scale": (float, BACKBONE_LR_SCALE), "channels_last": (bool, CHANNELS_LAST), "distill": (bool, DISTILL),
    "distill_weight": (float, DISTILL_WEIGHT), "distill_temperature": (float, DISTILL_TEMPERATURE),
}


def finetune_options(fn=None, *, only: tuple[str, ...] | None = None):
    """Give a typer command the options of :data:`FINETUNE_OPTIONS` (``only``: these of them; default
    every one): they are added to ``fn``'s signature (typer reads ``inspect.signature``), after its own
    parameters, and ``fn`` receives them as one keyword argument, ``train``: keyword arguments of
    :func:`retrofit.finetune`. Used bare (``@finetune_options``) or as ``@finetune_options(only=...)``."""
    if fn is None:
        return functools.partial(finetune_options, only=only)
    chosen = {name: FINETUNE_OPTIONS[name] for name in (only or FINETUNE_OPTIONS)}
    sig = inspect.signature(fn, eval_str=True)
    own = [p for p in sig.parameters.values() if p.name != "train"]
    clash = {p.name for p in own} & set(chosen)
    if clash:
        raise TypeError(f"{fn.__name__} defines fine-tune options of its own: {sorted(clash)}")
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)
             for name, (kind, option) in chosen.items()]

    @functools.wraps(fn)
    def run(*args, **kwargs):
        train = {name: kwargs.pop(name) for name in chosen}
        return fn(*args, train=train, **kwargs)

    run.__signature__ = sig.replace(parameters=own + added)
    return run


# What one accuracy run of `sweep --data` or `tune` takes from the user; the sweep sets the epochs, the
# seeds, what trains and the input size itself, and each command has its own --lr
RUN_OPTIONS = ("phase2_lr", "batch_size", "augment", "workers", "device", "smoothing", "mixup", "cutmix",
               "ema_decay", "clip_grad", "clip_mode", "backbone_lr_scale", "channels_last", "distill",
               "distill_weight", "distill_temperature")


@app.command("finetune", short_help="Fine-tune a retrofitted model: SE blocks first, optionally all.")
@fail_cleanly
@finetune_options
def finetune_command(
    checkpoint: Path = typer.Argument(..., help="A retrofitted model saved by `retrofit add-se --output` "
                                                "(.safetensors), or an adapter (with --base)."),
    data: Path = typer.Option(..., "--data", "-d", help="ImageFolder: DATA/train/<class>/* and DATA/val/<class>/*."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run saved in --output-dir."),
    output_dir: Path | None = typer.Option(None, "--output-dir", "-o", help="Checkpoints, best/last models, "
                                                                            "metrics.jsonl (default: CHECKPOINT's name "
                                                                            "+ -finetune/)."),
    input_size: str | None = typer.Option(None, "--input-size", help="C,H,W of the images fed to the model (default: "
                                                                     "the size it was retrofitted at)."),
    base: Path | None = typer.Option(None, "--base", help="When CHECKPOINT is an adapter: the base weights it was made "
                                                          "on (plain weights, or a model saved by retrofit)."),
    force: bool = typer.Option(False, "--force", help="Rebuild an adapter on a --base whose weights hash differs from "
                                                      "its own base's."),
    adapter: bool = typer.Option(False, "--adapter", help="Also save the best model as an adapter, "
                                                          "OUTPUT_DIR/adapter.safetensors (the blocks and what "
                                                          "changed, with a hash of the base)."),
    *, train: dict,
):
    """Fine-tune a retrofitted model briefly: SE blocks first (backbone frozen), optionally everything."""
    # deferred: torch and timm load when a command runs, not for --help
    from ..files.adapter import BASE_ATTR
    from ..files.card import command_line, write_card
    from ..files.checkpoint import load, save
    from ..graph.model import resolve_input_size
    from ..measure.overhead import measure_overhead
    from ..surgery.strip import strip
    from ..train.run_dir import BEST_FILE

    model = load(checkpoint, base=base, force=force)
    size = resolve_input_size(model, input_size) if input_size is not None else None
    out = output_dir if output_dir is not None else checkpoint.expanduser().with_name(f"{checkpoint.stem}-finetune")
    result = run_finetune(model, data, out, inputs=tuple(p for p in (checkpoint, base) if p is not None),
                          resume=resume, input_size=size, **train)
    if is_main_process():  # the card (and adapter) of the model the run hands over: the best one
        out = out.expanduser()
        handed = out / (ADAPTER_FILE if adapter else BEST_FILE)
        if adapter:
            save(model, handed, adapter=True)
        model.to("cpu")
        overhead = measure_overhead(strip(model), model, model._retrofit.input_size)
        card = write_card(handed, model, overhead=overhead, result=result, command=command_line(),
                          base_name=getattr(model, BASE_ATTR).name)
        console().print(f"{'adapter: ' + str(handed) + '; ' if adapter else ''}card: {card}")
