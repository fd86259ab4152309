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
stepped once per epoch), data from timm's dataset and transforms (:mod:`retrofit.data`). Validation
top-1/top-5 is measured for the original network (the SE blocks bypassed), for the retrofitted one at
step 0 and after every epoch. Under ``torchrun`` the same call runs DistributedDataParallel
(:mod:`retrofit.distributed`); ``batch_size`` is the global batch, so 1 and N processes take the same
steps on the same images. Checkpoints (:mod:`retrofit.train_state`) make ``resume=True`` give bitwise
the weights of an uninterrupted run: the data order and every random draw are functions of
``(seed, epoch)``.

The pieces (what trains, optimizer, objective, one epoch, evaluation, EMA, the run folder, progress)
are small modules of :mod:`retrofit.train`; :class:`_Run` puts them together.
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapter import remember_base
from .bypass import blocks_off
from .bypass import bypass as bypass_se  # its home is retrofit.bypass; kept importable here
from .data import ImageFolderData
from .distributed import Dist, setup
from .errors import RetrofitError, RetrofitWarning
from .train import optim, params
from .train.ema import Ema
from .train.evaluate import evaluate
from .train.loop import seed_all, train_epoch
from .train.loss import Objective
from .train.progress import Progress
from .train.run_dir import BEST_FILE, LAST_FILE, METRICS_FILE, RunDir
from .train_state import restore_training, rng_state, set_rng_state


@dataclass
class Settings:
    """The knobs that decide the result; a resumed run must use the same ones."""

    epochs: int = 1
    phase2_epochs: int = 0
    lr: float = 1e-3
    phase2_lr: float | None = None  # default: lr / 10
    batch_size: int = 32
    accum_steps: int = 1
    opt: str = "adamw"
    weight_decay: float = 0.0
    sched: str = "cosine"
    warmup_epochs: int = 0
    seed: int = 0
    augment: bool = True
    train_head: bool | None = None  # default: only when the classifier is new
    train_norms: bool = False       # phase 1 also trains the norm layers' affine parameters
    backbone_lr_scale: float = 1.0  # the parameters that are not new train at the phase's lr x this
    smoothing: float = 0.1          # timm's default, and benchmarks/transfer.py's finding (README)
    mixup: float = 0.0
    cutmix: float = 0.0
    distill: bool = False
    distill_weight: float = 1.0
    distill_temperature: float = 1.0
    ema_decay: float | None = None  # None: no model EMA
    clip_grad: float | None = None  # None: no gradient clipping
    clip_mode: str = "norm"
    channels_last: bool = False

    def check(self) -> None:
        """One clear error for a value out of range."""
        for name in ("epochs", "phase2_epochs", "warmup_epochs"):
            if getattr(self, name) < 0:
                raise RetrofitError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.epochs + self.phase2_epochs < 1:
            raise RetrofitError("nothing to train: give epochs (phase 1) or phase2_epochs of at least 1")
        for name, ok, what in (
                ("smoothing", 0 <= self.smoothing < 1, "in [0, 1)"), ("mixup", self.mixup >= 0, "0 or more"),
                ("cutmix", self.cutmix >= 0, "0 or more"), ("distill_weight", self.distill_weight >= 0, "0 or more"),
                ("distill_temperature", self.distill_temperature > 0, "positive"),
                ("backbone_lr_scale", self.backbone_lr_scale >= 0, "0 or more"),
                ("ema_decay", self.ema_decay is None or 0 < self.ema_decay < 1, "in (0, 1)"),
                ("clip_grad", self.clip_grad is None or self.clip_grad > 0, "positive"),
                ("clip_mode", self.clip_mode in ("norm", "value", "agc"), "norm, value or agc")):
            if not ok:
                raise RetrofitError(f"{name} must be {what}, got {getattr(self, name)!r}")


@dataclass
class FinetuneResult:
    """What :func:`finetune` measured. ``rows``: one dict per evaluation (``original``, ``step 0``,
    ``epoch 1``...), the same dicts as the lines of ``metrics.jsonl``."""

    rows: list[dict[str, Any]]
    best: dict[str, Any]
    skipped_images: int = 0
    output_dir: Path | None = None
    classes: list[str] = field(default_factory=list)

    def row(self, name: str) -> dict[str, Any]:
        return next(r for r in self.rows if r["name"] == name)


def finetune(model: nn.Module, data: str | Path | ImageFolderData, epochs: int = 1, *, phase2_epochs: int = 0,
             lr: float = 1e-3, phase2_lr: float | None = None, batch_size: int = 32, accum_steps: int = 1,
             opt: str = "adamw", weight_decay: float = 0.0, sched: str = "cosine", warmup_epochs: int = 0,
             seed: int = 0, augment: bool = True, train_head: bool | None = None, train_norms: bool = False,
             backbone_lr_scale: float = 1.0, smoothing: float = 0.1, mixup: float = 0.0, cutmix: float = 0.0,
             distill: bool = False, distill_weight: float = 1.0, distill_temperature: float = 1.0,
             ema_decay: float | None = None, clip_grad: float | None = None, clip_mode: str = "norm",
             channels_last: bool = False, input_size: tuple[int, ...] | None = None,
             output_dir: str | Path | None = None, resume: bool = False, workers: int = 0,
             device: str | None = None, progress: bool = False, restore_best: bool = True) -> FinetuneResult:
    """Fine-tune a retrofitted model briefly on an ImageFolder; returns the metrics.

    Args:
        model: a model from :func:`retrofit.add_se` or :func:`retrofit.load`; trained in place. A plain
            network (no blocks) trains too, as the control arms of :func:`retrofit.sweep` do: phase 1
            then trains what ``train_head``/``train_norms`` name (and it cannot be saved: no ``output_dir``).
        data: a folder with ``train/<class>/*`` and ``val/<class>/*`` images, or an open
            :class:`~retrofit.data.ImageFolderData` (its transforms are used as they are).
        epochs: phase-1 epochs (SE blocks, and a new head, train; the backbone is frozen).
        phase2_epochs: then this many epochs with everything trainable at ``phase2_lr``.
        lr, phase2_lr: learning rates (``phase2_lr`` defaults to ``lr / 10``).
        batch_size: the global batch (split over processes and ``accum_steps`` micro-batches); every
            image trains each epoch, so the last batch may be smaller (see :class:`retrofit.data.TrainBatches`).
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
        workers: data-loading processes per training process.
        device: ``cpu``/``cuda`` (default: CUDA when available; bf16 autocast on CUDA, fp32 on CPU).
        progress: rich progress bars on stderr (rank 0).
        restore_best: end with the best weights by val top-1 in ``model`` (else the last ones).

    Returns:
        :class:`FinetuneResult`; ``result.row("step 0")["top1"]``, ``result.best["name"]``...

    Example::

        >>> se = retrofit.add_se(timm.create_model("resnet50", pretrained=True), r=16)
        >>> result = retrofit.finetune(se, data="data/", epochs=2, output_dir="runs/se50")
        >>> result.row("original")["top1"], result.best["top1"]
    """
    given = locals()
    settings = Settings(**{f.name: given[f.name] for f in fields(Settings)})
    env = setup(device)
    if params.block_params(model):  # a plain network (a sweep's control arm) has no adapter to make
        remember_base(model)  # the base an adapter of the result is made on (retrofit.adapter): before any change
    run = None
    try:
        run = _Run(model, settings, env, data, input_size, output_dir, resume, workers, progress)
        return run.run(restore_best)
    finally:
        if run is not None:
            run.dir.close()  # the folder's lock
        env.close()


class _Run:
    """One fine-tuning run: the model, its data and folder, and the phases and epochs that train it.

    The pieces live in :mod:`retrofit.train`: what trains (``params``), optimizer and scheduler
    (``optim``), the objective (``loss``), one epoch (``loop``), validation (``evaluate``), the model EMA
    (``ema``), the run folder (``run_dir``).
    """

    def __init__(self, model, s: Settings, env: Dist, data, input_size, output_dir, resume, workers, progress):
        from .checkpoint import metadata

        s.check()
        if s.accum_steps < 1 or s.batch_size < 1 or s.batch_size % (env.world * s.accum_steps):
            raise RetrofitError(f"batch size {s.batch_size} must be a positive multiple of processes x "
                                f"accumulation steps ({env.world} x {s.accum_steps})")
        blocks = params.block_params(model)
        if s.distill and not blocks:
            raise RetrofitError("distill needs inserted blocks: the teacher is the model with its blocks "
                                "bypassed, which for a plain network is the student itself")
        if output_dir is not None and not blocks:
            raise RetrofitError("this model has no blocks from retrofit.add_se, so its run cannot be saved; "
                                "run it without output_dir")
        self.model, self.s, self.env, self.workers, self.blocks = model, s, env, workers, bool(blocks)
        if isinstance(data, ImageFolderData):
            self.data = data
        else:
            size = input_size or _input_size(model)
            self.data = ImageFolderData.open(data, model, size, augment=s.augment)
        new_head = params.fit_head(model, len(self.data.classes), s.seed)
        train_head = new_head if s.train_head is None else s.train_head
        head = params.head_params(model)
        if train_head and not head:
            raise RetrofitError("cannot find this model's classifier to train (it has no get_classifier())")
        self.new = blocks | (head if new_head else set())  # at the full rate with backbone_lr_scale
        self.phase1_params = (blocks | (head if train_head else set())
                              | (params.norm_params(model) if s.train_norms else set()))
        if s.epochs and not self.phase1_params:
            raise RetrofitError("phase 1 has nothing to train: this model has no blocks from retrofit.add_se; "
                                "train its head or norm layers (train_head, train_norms) or give only phase2_epochs")
        self.objective = Objective(len(self.data.classes), s.smoothing, s.mixup, s.cutmix,
                                   s.distill_weight if s.distill else 0.0, s.distill_temperature)
        self.meta = metadata(model) if blocks else None
        self.dir = RunDir(output_dir, env)
        self.progress = Progress(progress and env.main)
        self.rows: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.best_module: nn.Module | None = None  # whose weights the best row measured (the model, or the EMA)
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.seen_bad: set[str] = set()
        self.said_left_out = False
        if len(self.data.train) < s.batch_size and env.main:
            warnings.warn(f"{self.data.root}/train has {len(self.data.train)} images, fewer than one batch of "
                          f"{s.batch_size}: each epoch is one step on all of them", RetrofitWarning, stacklevel=3)
        # the training state resumed from (last: it locks the folder)
        self.saved = self.dir.open(resume, model, self.meta, asdict(s))
        model.to(env.device)
        if s.channels_last:
            model.to(memory_format=torch.channels_last)
        self.ema = Ema(model, s.ema_decay) if s.ema_decay is not None else None

    def run(self, restore_best: bool) -> FinetuneResult:
        s, env, model = self.s, self.env, self.model
        rank, world, micro = env.rank, env.world, s.batch_size // (env.world * s.accum_steps)
        self.train_loader = self.data.train_loader(micro, batch_size=s.batch_size, seed=s.seed, rank=rank, world=world,
                                                   workers=self.workers)
        self.val_loader = self.data.val_loader(micro * s.accum_steps, rank=rank, world=world, workers=self.workers)
        done = 0
        total = s.epochs + s.phase2_epochs
        net, optimizer, scheduler, phase = None, None, None, 0
        with self.progress:
            self.progress.note(f"{self.data.root}: {self.data.describe()}")
            if self.saved is not None:
                model.load_state_dict(self.saved["model"], strict=True)
                if self.ema is not None:
                    if "ema" not in self.saved:
                        raise RetrofitError("the saved run has no model EMA; resume it without ema_decay")
                    self.ema.load_state_dict(self.saved["ema"])
                self.rows, self.best = self.saved["rows"], self.saved["best"]
                done = self.saved["epoch"]
                set_rng_state(self.saved["rng"])
                # the files a kill after the state's commit missed
                self.dir.recover(model, self.saved, self.ema.module if self.ema is not None else None)
            else:
                with blocks_off(model):
                    original = self._evaluate("original")
                self._record("original", 0, 0, None, original)
                self._record("step 0", 0, 0, None, self._evaluate("step 0") if self.blocks else dict(original))
                self.dir.commit_step0(model, self.rows)
            for epoch in range(done + 1, total + 1):
                if (1 if epoch <= s.epochs else 2) != phase:
                    phase = 1 if epoch <= s.epochs else 2
                    net, optimizer, scheduler = self._start_phase(phase, epoch)
                in_phase = epoch - 1 if phase == 1 else epoch - 1 - s.epochs
                seed_all(s.seed + 1000 * epoch + rank)  # augmentation, mixup and dropout draws of this epoch
                self._set_epoch(epoch, phase)
                params.set_modes(model, frozen_norms=phase == 1)
                lr = optimizer.param_groups[0]["lr"]
                train_loss, images, bad = self._train_epoch(net, optimizer, epoch)
                train = dict(train_loss=train_loss, lr=lr, train_images=images)
                val = self._evaluate(f"epoch {epoch} val")
                scheduler.step(in_phase + 1, val["top1"])  # the metric: for sched="plateau" (mode max)
                val["skipped_images"] += bad
                best = self.best
                self._record(f"epoch {epoch}", epoch, phase, train, val)
                if self.ema is not None:  # the average as a row of its own; it may be the best
                    ema_val = self._evaluate(f"epoch {epoch} val (ema)", self.ema.module)
                    ema_val["skipped_images"] = val["skipped_images"]
                    self._record(f"epoch {epoch} (ema)", epoch, phase, train, ema_val, self.ema.module)
                state = dict(meta=self.meta, settings=asdict(s), model=model.state_dict(),
                             optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), epoch=epoch,
                             phase=phase, rng=rng_state(), rows=self.rows, best=self.best)
                if self.ema is not None:
                    state["ema"] = self.ema.state_dict()
                if self.objective.frozen is not None:
                    state["teacher"] = self.objective.frozen.state_dict()
                self.dir.commit_epoch(model, state, self.rows, best=self.best_module if self.best is not best else None)
        if restore_best:
            if self.best_weights is not None:
                model.load_state_dict(self.best_weights, strict=True)
            else:  # the best epoch came before a resume: its file, checked, then loaded
                self.dir.restore_best(model)
        if s.channels_last:
            model.to(memory_format=torch.contiguous_format)
        model.eval()
        skipped = self.rows[-1]["skipped_images"]  # in the last epoch's passes over train/ and val/
        return FinetuneResult(self.rows, dict(self.best), skipped, self.dir.path, self.data.classes)

    def _start_phase(self, phase: int, epoch: int):
        s, model = self.s, self.model
        params.set_trainable(model, self.phase1_params if phase == 1 else None)
        lr = s.lr if phase == 1 else (s.phase2_lr if s.phase2_lr is not None else s.lr / 10)
        groups = params.lr_groups(model, self.new, s.backbone_lr_scale, s.weight_decay) \
            if s.backbone_lr_scale != 1 else None
        optimizer, scheduler = optim.create(model, opt=s.opt, lr=lr, weight_decay=s.weight_decay, sched=s.sched,
                                            epochs=s.epochs if phase == 1 else s.phase2_epochs,
                                            warmup_epochs=s.warmup_epochs, groups=groups)
        resumed = self.saved is not None and self.saved["phase"] == phase and self.saved["epoch"] == epoch - 1
        if resumed:
            restore_training(optimizer, scheduler, self.saved, self.dir.state_file)
            scheduler.step(epoch - 1 if phase == 1 else epoch - 1 - s.epochs)  # the lr of the epoch to run
        if phase == 2:  # the backbone moves from now on: distillation needs a copy of the original
            self.objective.freeze_teacher(model, self.saved.get("teacher") if resumed else None)
        return optim.wrap(model, self.env), optimizer, scheduler

    def _set_epoch(self, epoch: int, phase: int) -> None:
        """The epoch's data order; phase 2 (norm layers on batch statistics) leaves out a last batch that
        would give a process one image (said once)."""
        batches = self.train_loader.batch_sampler
        batches.set_epoch(epoch, no_single=phase == 2)
        if batches.left_out and self.env.main and not self.said_left_out:
            self.said_left_out = True
            warnings.warn(f"phase 2 leaves out {batches.left_out} image(s) of each epoch: the last batch would give "
                          f"a process a batch of one image, on which the norm layers cannot train", RetrofitWarning,
                          stacklevel=3)

    def _train_epoch(self, net: nn.Module, optimizer, epoch: int) -> tuple[float, int, int]:
        s, ema = self.s, self.ema
        loss, images, bad = train_epoch(
            net, self.model, self.train_loader, optimizer, accum=s.accum_steps, env=self.env, progress=self.progress,
            label=f"epoch {epoch} train", seen_bad=self.seen_bad, objective=self.objective, clip_grad=s.clip_grad,
            clip_mode=s.clip_mode, channels_last=s.channels_last,
            after_step=(lambda: ema.update(self.model)) if ema is not None else None)
        if images == 0:
            raise RetrofitError(f"none of the {bad} images in {self.data.root}/train could be decoded (each is "
                                f"named in a warning); replace or remove them")
        return loss, images, bad

    def _evaluate(self, label: str, module: nn.Module | None = None) -> dict[str, Any]:
        return evaluate(module if module is not None else self.model, self.val_loader,
                        classes=len(self.data.classes), env=self.env, progress=self.progress, label=label,
                        seen_bad=self.seen_bad, root=self.data.root, channels_last=self.s.channels_last)

    def _record(self, name: str, epoch: int, phase: int, train: dict | None, val: dict,
                module: nn.Module | None = None) -> dict[str, Any]:
        """Add a metrics row and return it; a new best (by val top-1; the original does not compete) is
        kept in memory (the run folder writes it with the epoch's commit). ``module``: the weights the
        row measured (the EMA's), default the model's."""
        module = module if module is not None else self.model
        row = dict(name=name, epoch=epoch, phase=phase, train_loss=None, lr=None, train_images=None, **val)
        row.update(train or {})
        self.rows.append(row)
        if name != "original" and (self.best is None or row["top1"] > self.best["top1"]):
            self.best = row
            self.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
            self.best_module = module
        return row


def _input_size(model: nn.Module) -> tuple[int, ...]:
    """The size the model was retrofitted at; for a plain network, timm's ``pretrained_cfg``'s."""
    info = getattr(model, "_retrofit", None)
    if info is not None:
        return info.input_size
    from .models import resolve_input_size

    return resolve_input_size(model, None)


def results_table(result: FinetuneResult, title: str = "Fine-tuning results"):
    """One rich table: original, step 0 and every epoch, with the best one marked."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col, just in (("model", "left"), ("phase", "right"), ("lr", "right"), ("train loss", "right"),
                      ("val loss", "right"), ("top-1 %", "right"), ("top-5 %", "right"), ("", "left")):
        table.add_column(col, justify=just)
    for r in result.rows:
        label = {"original": "original (no SE)", "step 0": "retrofitted, step 0"}.get(r["name"], r["name"])
        table.add_row(label, str(r["phase"] or ""), f"{r['lr']:.2e}" if r["lr"] is not None else "",
                      f"{r['train_loss']:.4f}" if r["train_loss"] is not None else "", f"{r['val_loss']:.4f}",
                      f"{r['top1']:.2f}", f"{r['top5']:.2f}", "best" if r["name"] == result.best["name"] else "")
    return table


__all__ = ["finetune", "FinetuneResult", "Settings", "bypass_se", "results_table", "BEST_FILE", "LAST_FILE",
           "METRICS_FILE"]
