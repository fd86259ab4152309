"""The short fine-tuning stage: the new SE blocks learn, the rest of the network stays as it was.

Method: Hu et al., "Squeeze-and-Excitation Networks" (CVPR 2018), https://arxiv.org/abs/1709.01507;
the schedule (train the new layers on a frozen backbone, then optionally everything at a lower rate) is
the usual transfer-learning recipe.

* **phase 1** (``epochs``): only the SE parameters (and the classifier when it is new) train; every
  other parameter is frozen and every norm layer stays in eval mode, so the backbone's weights and
  running statistics are bitwise unchanged.
* **phase 2** (``phase2_epochs``, optional): everything trains at ``phase2_lr``.

What a timm user expects of a fine-tune, each from timm: label smoothing, mixup / cutmix
(:class:`timm.data.Mixup`), model EMA (:class:`timm.utils.ModelEmaV3`, evaluated as a row of its own),
gradient clipping (``timm.utils.dispatch_clip_grad``), a lower rate for the pretrained parameters than
for the new ones (``lr_scale`` parameter groups), ``channels_last``; and distillation from the original
network, which is the same model with its blocks bypassed (:mod:`retrofit.train.loss`). The defaults
come from ``benchmarks/transfer.py`` (README, "Does SE help?"): label smoothing 0.1 (a small gain there,
and timm's default), everything else off (no gain there, or nothing to measure on CPU).

Optimizer and scheduler come from timm's factories (``create_optimizer_v2``, ``create_scheduler_v2``,
stepped once per epoch), data from timm's dataset and transforms (:mod:`retrofit.train.data`). Validation
top-1/top-5 is measured for the original network (the SE blocks bypassed), for the retrofitted one at
step 0 and after every epoch. Under ``torchrun`` the same call runs DistributedDataParallel
(:mod:`retrofit.train.distributed`); ``batch_size`` is the global batch, so 1 and N processes take the same
steps on the same images. Checkpoints (:mod:`retrofit.train.state`) make ``resume=True`` give bitwise
the weights of an uninterrupted run: the data order and every random draw are functions of
``(seed, epoch)``.

The pieces (what trains, optimizer, objective, one epoch, evaluation, EMA, the run folder, progress)
are small modules of :mod:`retrofit.train`; :class:`retrofit.train.run.Run` puts them together.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from torch import nn

from ..files.adapter import remember_base
from . import params
from .data import ImageFolderData
from .distributed import setup
from .run import Run
from .settings import FinetuneResult, Settings


def finetune(model: nn.Module, data: str | Path | ImageFolderData, epochs: int = 1, *, phase2_epochs: int = 0,
             lr: float = 1e-3, phase2_lr: float | None = None, batch_size: int = 32, accum_steps: int = 1,
             opt: str = "adamw", weight_decay: float = 0.0, sched: str = "cosine", warmup_epochs: int = 0,
             seed: int = 0, augment: bool = True, train_head: bool | None = None, train_norms: bool = False,
             backbone_lr_scale: float = 1.0, smoothing: float = 0.1, mixup: float = 0.0, cutmix: float = 0.0,
             distill: bool = False, distill_weight: float = 1.0, distill_temperature: float = 1.0,
             ema_decay: float | None = None, clip_grad: float | None = None, clip_mode: str = "norm",
             channels_last: bool = False, input_size: tuple[int, ...] | None = None,
             output_dir: str | Path | None = None, resume: bool = False, workers: int = 0,
             device: str | None = None, progress: bool = False, restore_best: bool = True,
             on_epoch: Callable[[dict[str, Any]], bool] | None = None) -> FinetuneResult:
    """Fine-tune a retrofitted model briefly on an ImageFolder; returns the metrics.

    Args:
        model: a model from :func:`retrofit.add_se` or :func:`retrofit.load`; trained in place. A plain
            network (no blocks) trains too, as the control arms of :func:`retrofit.sweep` do: phase 1
            then trains what ``train_head``/``train_norms`` name (and it cannot be saved: no ``output_dir``).
        data: a folder with ``train/<class>/*`` and ``val/<class>/*`` images, or an open
            :class:`~retrofit.train.data.ImageFolderData` (its transforms are used as they are).
        epochs: phase-1 epochs (SE blocks, and a new head, train; the backbone is frozen).
        phase2_epochs: then this many epochs with everything trainable at ``phase2_lr``.
        lr, phase2_lr: learning rates (``phase2_lr`` defaults to ``lr / 10``).
        batch_size: the global batch (split over processes and ``accum_steps`` micro-batches); every
            image trains each epoch, so the last batch may be smaller (see :class:`retrofit.train.data.TrainBatches`).
        accum_steps: gradient accumulation: micro-batches per optimizer step.
        opt, weight_decay: passed to ``timm.optim.create_optimizer_v2`` (``adamw``, ``sgd``, ``lamb``...).
        sched, warmup_epochs: passed to ``timm.scheduler.create_scheduler_v2`` (``cosine``, ``step``...).
        seed: data order, augmentation and any new head are functions of it (and of the epoch).
        augment: timm's training transforms (random resized crop, flip, colour jitter); False: the
            evaluation transform for training too.
        train_head: train the classifier in phase 1 (default: only when it is new, i.e. when the data has
            another number of classes than the model, which then gets a new head).
        train_norms: phase 1 also trains the affine parameters of the norm layers (their statistics
            stay frozen).
        backbone_lr_scale: the parameters that are not new (all but the blocks and a new head) train at
            the phase's learning rate times this (timm's ``lr_scale`` parameter groups); 1: one rate.
        smoothing: label smoothing (timm's ``LabelSmoothingCrossEntropy``, or in mixup's soft targets);
            0.1 by default (timm's default; ``benchmarks/transfer.py`` measured a small gain with it).
        mixup, cutmix: alphas of :class:`timm.data.Mixup` (0: off); an odd micro-batch mixes all but its
            last image.
        distill: add ``distill_weight * T^2 * KL`` to the teacher's softened logits, the teacher being
            the original network (the model with its blocks bypassed: no extra weights in phase 1; in
            phase 2 a frozen copy taken when it starts), ``T`` = ``distill_temperature``. Needs blocks.
        ema_decay: keep a model EMA (``timm.utils.ModelEmaV3``, decay warm-up on) and evaluate it after
            every epoch as a row of its own (``epoch N (ema)``), which competes for ``best``.
        clip_grad, clip_mode: clip the gradients before each step (``timm.utils.dispatch_clip_grad``:
            ``norm``, ``value`` or ``agc``).
        channels_last: model and images in ``torch.channels_last`` memory format while training (faster
            convolutions on recent GPUs); the model is given back in the default format.
        input_size: ``(C, H, W)`` for the transforms (default: the size the model was retrofitted at).
        output_dir: where ``train_state.pt`` (for resume), ``last.safetensors``, ``best.safetensors`` (by
            val top-1, step 0 included) and ``metrics.jsonl`` go; None: nothing is written.
        resume: continue the run saved in ``output_dir``.
        workers: data-loading processes per training process (the weights do not depend on it: each
            image's augmentation is drawn from ``(seed, epoch, index)``, :func:`retrofit.train.data.sample_rng`).
        device: ``cpu``/``cuda`` (default: CUDA when available; bf16 autocast on CUDA, fp32 on CPU).
        progress: rich progress bars on stderr (rank 0).
        restore_best: end with the best weights by val top-1 in ``model`` (else the last ones).
        on_epoch: called with a copy of each epoch's row (``epoch N``) once the epoch is committed; a true
            return value ends the run there, as if it had been given that many epochs (the schedule stays
            that of all of them: the rows so far are those of the full run). It must draw no random
            numbers, so the run is bitwise the same with it as without it (``retrofit tune`` reports each
            epoch to its pruner through it). Under torchrun it is called on every process, and the run
            ends on all of them when it returns true on one.

    Returns:
        :class:`FinetuneResult`; ``result.row("step 0")["top1"]``, ``result.best["name"]``...

    Raises:
        RetrofitError: bad settings or data, or a phase whose first step gives no trainable parameter a
            gradient (it would train nothing; :mod:`retrofit.train.gradients` says why and what to do).
            Tensors that get none while others do are named in one ``RetrofitWarning``.

    Example::

        >>> se = retrofit.add_se(model, r=16)   # model: your trained network (timm's, or your own)
        >>> result = retrofit.finetune(se, data="data/", epochs=2, output_dir="runs/se50")
        >>> [row["name"] for row in result.rows]
        ['original', 'step 0', 'epoch 1', 'epoch 2']
        >>> before, best = result.row("original")["top1"], result.best["top1"]
    """
    given = locals()
    settings = Settings(**{f.name: given[f.name] for f in fields(Settings)})
    env = setup(device)
    if params.block_params(model):  # a plain network (a sweep's control arm) has no adapter to make
        remember_base(model)  # the base an adapter of the result is made on (retrofit.files.adapter): before any change
    run = None
    try:
        run = Run(model, settings, env, data, input_size, output_dir, resume, workers, progress)
        return run.run(restore_best, on_epoch)
    finally:
        if run is not None:
            run.dir.close()  # the folder's lock
        env.close()
