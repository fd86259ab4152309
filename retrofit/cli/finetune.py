"""`retrofit finetune`: train the SE blocks of a saved retrofitted model briefly on an ImageFolder.

Also used by ``retrofit add-se ... --finetune DIR``. Under ``torchrun`` every process runs this
command; only rank 0 prints and writes (see :mod:`retrofit.distributed`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import typer

from ..errors import RetrofitError
from .common import app, console, fail_cleanly, say


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a process on its own."""
    return int(os.environ.get("RANK", "0")) == 0


def run_finetune(model, data: Path, epochs: int, output_dir: Path, inputs: tuple[Path, ...] = (), quiet: bool = False,
                 **options: Any):
    """Fine-tune ``model`` in place, print the results table (rank 0) and return the result.

    ``inputs``: the weight files this run was started from; none of them may be among the run's outputs.
    """
    from ..finetune import BEST_FILE, LAST_FILE, METRICS_FILE, finetune, results_table
    from ..train_state import STATE_FILE

    output_dir = output_dir.expanduser()
    for name in (BEST_FILE, LAST_FILE, STATE_FILE, METRICS_FILE):
        for given in inputs:
            if (output_dir / name).resolve() == Path(given).expanduser().resolve():
                raise RetrofitError(f"{given} would be overwritten by the fine-tuning run in {output_dir}; input "
                                    f"weights are never overwritten, choose another --output-dir")
    main = is_main_process() and not quiet
    if main:
        say(f"fine-tuning on {data}: phase 1 {epochs} epoch(s) (SE blocks"
            f"{', new head' if options.get('train_head') else ''}; backbone frozen)"
            + (f", phase 2 {options['phase2_epochs']} epoch(s) (everything)" if options.get("phase2_epochs") else "")
            + f"; checkpoints in {output_dir}")
    result = finetune(model, data, epochs, output_dir=output_dir, progress=main, **options)
    if main:
        console().print(results_table(result))
        best = result.best
        say(f"best: {best['name']}, top-1 {best['top1']:.2f}% -> {output_dir / BEST_FILE}; last: "
            f"{output_dir / LAST_FILE}; metrics: {output_dir / METRICS_FILE}")
        if result.skipped_images:
            say((f"{result.skipped_images} image(s) could not be decoded and were skipped", "yellow"))
    return result


EPOCHS = typer.Option(1, "--epochs", "-e", min=0, help="Phase-1 epochs: only the SE blocks (and a new head) train.")


@app.command("finetune")
@fail_cleanly
def finetune_command(
    checkpoint: Path = typer.Argument(..., help="A retrofitted model saved by `retrofit add-se --output` (.safetensors)."),
    data: Path = typer.Option(..., "--data", "-d", help="ImageFolder: DATA/train/<class>/* and DATA/val/<class>/*."),
    epochs: int = EPOCHS,
    resume: bool = typer.Option(False, "--resume", help="Continue the run saved in --output-dir."),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="Checkpoints, best/last models, metrics.jsonl (default: CHECKPOINT's name + -finetune/)."),
    phase2_epochs: int = typer.Option(0, "--phase2-epochs", min=0, help="Then train everything for this many epochs."),
    lr: float = typer.Option(1e-3, "--lr", help="Phase-1 learning rate."),
    phase2_lr: Optional[float] = typer.Option(None, "--phase2-lr", help="Phase-2 learning rate (default: lr / 10)."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", min=1, help="Global batch size (over all processes)."),
    accum_steps: int = typer.Option(1, "--accum-steps", min=1, help="Gradient accumulation: micro-batches per step."),
    opt: str = typer.Option("adamw", "--opt", help="timm optimizer name (adamw, sgd, lamb...)."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="Weight decay."),
    sched: str = typer.Option("cosine", "--sched", help="timm scheduler name (cosine, step, plateau...)."),
    warmup_epochs: int = typer.Option(0, "--warmup-epochs", min=0, help="Warm-up epochs of the scheduler."),
    seed: int = typer.Option(0, "--seed", help="Data order, augmentation and a new head follow it."),
    augment: bool = typer.Option(True, "--augment/--no-augment", help="timm's training augmentation."),
    train_head: Optional[bool] = typer.Option(None, "--train-head/--freeze-head", help="Train the classifier in phase 1 (default: only a new one)."),
    workers: int = typer.Option(2, "--workers", "-j", min=0, help="Data-loading processes per training process."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)."),
    input_size: Optional[str] = typer.Option(None, "--input-size", help="C,H,W of the images fed to the model (default: the size it was retrofitted at)."),
):
    """Fine-tune a retrofitted model briefly: SE blocks first (backbone frozen), optionally everything."""
    from ..checkpoint import load
    from ..models import resolve_input_size

    model = load(checkpoint)
    size = resolve_input_size(model, input_size) if input_size is not None else None
    out = output_dir if output_dir is not None else checkpoint.expanduser().with_name(f"{checkpoint.stem}-finetune")
    run_finetune(model, data, epochs, out, inputs=(checkpoint,), resume=resume, phase2_epochs=phase2_epochs,
                 lr=lr, phase2_lr=phase2_lr, batch_size=batch_size, accum_steps=accum_steps, opt=opt,
                 weight_decay=weight_decay, sched=sched, warmup_epochs=warmup_epochs, seed=seed, augment=augment,
                 train_head=train_head, workers=workers, device=device, input_size=size)
