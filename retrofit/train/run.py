"""One fine-tuning run: the model, its data and folder, and the phases and epochs that train it.

The pieces are the other modules of :mod:`retrofit.train`: what trains (:mod:`~retrofit.train.params`),
optimizer and scheduler (:mod:`~retrofit.train.optim`), the objective (:mod:`~retrofit.train.loss`), one
epoch (:mod:`~retrofit.train.loop`), validation (:mod:`~retrofit.train.evaluate`), the model EMA
(:mod:`~retrofit.train.ema`), the rows (:mod:`~retrofit.train.record`), the run folder
(:mod:`~retrofit.train.run_dir`). :func:`retrofit.finetune` makes a :class:`Run` and runs it.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ..blocks.attention import DISPLAY_NAMES
from ..errors import RetrofitError, RetrofitWarning, excerpt
from ..events import Event, OnEvent, emit
from ..files.header import metadata
from ..files.provenance import mark_trained
from ..files.tensors import with_metadata
from ..graph.model import resolve_input_size
from ..surgery.bypass import blocks_off
from ..surgery.info import get_info
from ..surgery.trainable import Trainable
from . import optim, params
from .config import FinetuneConfig
from .data import ImageFolderData
from .distributed import Dist
from .ema import Ema
from .evaluate import evaluate
from .gradients import check_first_step
from .loop import seed_all, train_epoch
from .loss import Objective
from .progress import Progress
from .record import Record
from .result import FinetuneResult
from .run_dir import RunDir
from .state import restore_training, rng_state, set_rng_state


class Run:
    """A fine-tune of ``model`` on ``data`` by ``s``; every check is made before anything trains."""

    def __init__(
        self, model: nn.Module, s: FinetuneConfig, env: Dist, data, input_size, output_dir, resume: bool, progress: bool
    ):
        s.check_run()
        if s.batch_size % (env.world * s.accum_steps):  # each at least 1: the config's bounds
            raise RetrofitError(
                f"batch size {s.batch_size} must be a positive multiple of processes x "
                f"accumulation steps ({env.world} x {s.accum_steps})"
            )
        blocks = params.block_params(model)
        self.folded = params.all_folded(model)  # a retrofit model still (it saves), with no block left to train
        if s.distill and not blocks:
            raise RetrofitError(
                "distill needs inserted blocks: the teacher is the model with its blocks "
                "bypassed, which for a plain network is the student itself"
            )
        if output_dir is not None and not blocks and not self.folded:
            raise RetrofitError(
                "this model has no blocks from retrofit.add_se, so its run cannot be saved; run it without output_dir"
            )
        self.model, self.s, self.env, self.workers, self.blocks = model, s, env, s.workers, bool(blocks)
        if isinstance(data, ImageFolderData):
            self.data = data
        else:
            size = input_size or _input_size(model)
            self.data = ImageFolderData.open(data, model, size, augment=s.augment)
        self._what_trains(blocks)
        self.objective = Objective(
            len(self.data.classes),
            s.smoothing,
            s.mixup,
            s.cutmix,
            s.distill_weight if s.distill else 0.0,
            s.distill_temperature,
        )
        self.meta = metadata(model) if blocks or self.folded else None
        self.dir = RunDir(output_dir, env)
        self.progress = Progress(progress and env.main)
        self.record = Record()
        self.seen_bad: set[str] = set()
        self.said_left_out = False
        if len(self.data.train) < s.batch_size and env.main:
            warnings.warn(
                f"{excerpt(self.data.root)}/train has {len(self.data.train)} images, fewer than one batch of "
                f"{s.batch_size}: each epoch is one step on all of them",
                RetrofitWarning,
                stacklevel=3,
            )
        # the training state resumed from (last: it locks the folder)
        self.saved = self.dir.open(resume, model, self.meta, s.decisive())
        model.to(env.device)
        if s.channels_last:
            model.to(memory_format=torch.channels_last)
        self.ema = Ema(model, s.ema_decay) if s.ema_decay is not None else None

    def _what_trains(self, blocks: set) -> None:
        """The parameters of phase 1, and the new ones (at the full rate with ``backbone_lr_scale``);
        a classifier of the wrong size for the data is replaced first."""
        s, model = self.s, self.model
        # a head made for the data now, or one add-se --num-classes made (not the base's weights)
        new_head = params.fit_head(model, len(self.data.classes), s.seed) or params.head_is_recorded_new(model)
        train_head = new_head if s.train_head is None else s.train_head
        self.new_head, self.train_head = new_head, train_head  # said by plan()
        head = params.head_params(model)
        if train_head and not head:
            raise RetrofitError("cannot find this model's classifier to train (it has no get_classifier())")
        self.new = blocks | (head if new_head else set())
        self.phase1_params = (
            blocks | (head if train_head else set()) | (params.norm_params(model) if s.train_norms else set())
        )
        if s.epochs and not self.phase1_params:
            why = (
                "every block of this model was folded (retrofit.fold)"
                if params.all_folded(model)
                else "this model has no blocks from retrofit.add_se"
            )
            raise RetrofitError(
                f"phase 1 has nothing to train: {why}; train its head or norm layers (train_head, "
                f"train_norms) or give only phase2_epochs"
            )

    def run(self, restore_best: bool, on_event: OnEvent | None = None) -> FinetuneResult:
        """Train the epochs left and return the result; ``on_event`` gets an ``epoch`` event after each
        committed epoch (see :func:`retrofit.finetune`) and may end the run there: the run is then complete
        up to that epoch."""
        s, env = self.s, self.env
        micro = s.batch_size // (env.world * s.accum_steps)
        self.train_loader = self.data.train_loader(
            micro, batch_size=s.batch_size, seed=s.seed, rank=env.rank, world=env.world, workers=self.workers
        )
        self.val_loader = self.data.val_loader(
            micro * s.accum_steps, rank=env.rank, world=env.world, workers=self.workers
        )
        net, optimizer, scheduler, phase = None, None, None, 0
        with self.progress:
            self.progress.note(f"{self.data.root}: {self.data.describe()}")
            self.progress.note(self.plan())
            done = self._begin()
            for epoch in range(done + 1, s.epochs + s.phase2_epochs + 1):
                if (1 if epoch <= s.epochs else 2) != phase:
                    phase = 1 if epoch <= s.epochs else 2
                    net, optimizer, scheduler = self._start_phase(phase, epoch)
                row = self._epoch(epoch, phase, net, optimizer, scheduler)
                # every process stops when the hook says so on one (a tune decides on rank 0 alone)
                stop = emit(on_event, epoch_event(row))  # logged whether or not a callback follows
                if on_event is not None and env.any(stop):
                    break
        return self._finish(restore_best)

    def plan(self) -> str:
        """What each phase trains, said before the first epoch, e.g. ``phase 1, 2 epoch(s): SE blocks, new
        3-class head train, the rest is frozen (trainable parameters: 46,079 || all: ...); phase 2, 1
        epoch(s): everything trains``. The head is replaced here, once the data is open, so only the run
        can say it (a command line could not)."""
        s, model = self.s, self.model
        parts = []
        if s.epochs:
            kinds = sorted({b.config.module for b in get_info(model).blocks}) if self.blocks else []
            what = [f"{DISPLAY_NAMES.get(kinds[0], kinds[0])} blocks" if len(kinds) == 1 else "blocks"] if kinds else []
            if self.train_head:
                what.append(f"new {len(self.data.classes)}-class head" if self.new_head else "head")
            if s.train_norms:
                what.append("norm affine parameters")
            count = Trainable(
                sum(p.numel() for n, p in model.named_parameters() if n in self.phase1_params),
                sum(p.numel() for p in model.parameters()),
            )
            parts.append(f"phase 1, {s.epochs} epoch(s): {', '.join(what)} train, the rest is frozen ({count})")
        if s.phase2_epochs:
            parts.append(f"phase 2, {s.phase2_epochs} epoch(s): everything trains")
        return "; ".join(parts)

    def _begin(self) -> int:
        """The epochs done already: those of the resumed state, or none after evaluating the original
        network (the blocks switched off) and the retrofitted one at step 0."""
        model, saved = self.model, self.saved
        if saved is None:
            with blocks_off(model):
                original = self._evaluate("original")
            self.record.add("original", 0, 0, None, original, model)
            self.record.add("step 0", 0, 0, None, self._evaluate("step 0") if self.blocks else dict(original), model)
            self.dir.commit_step0(model, self.record.rows)
            return 0
        model.load_state_dict(with_metadata(saved["model"], model), strict=True)
        if self.ema is not None:
            if "ema" not in saved:
                raise RetrofitError("the saved run has no model EMA; resume it without ema_decay")
            self.ema.load_state_dict(saved["ema"])
        self.record = Record(saved["rows"], saved["best"])
        set_rng_state(saved["rng"])
        # the files a kill after the state's commit missed
        self.dir.recover(model, saved, self.ema.module if self.ema is not None else None)
        return saved["epoch"]

    def _epoch(self, epoch: int, phase: int, net: nn.Module, optimizer, scheduler) -> dict[str, Any]:
        """Train one epoch, evaluate it (and the EMA), and commit the epoch to the run folder; returns the
        epoch's row (the live weights', not the EMA's)."""
        s, model, record = self.s, self.model, self.record
        in_phase = epoch - 1 if phase == 1 else epoch - 1 - s.epochs
        seed_all(s.seed + 1000 * epoch + self.env.rank)  # augmentation, mixup and dropout draws of this epoch
        self._set_epoch(epoch, phase)
        params.set_modes(model, frozen_norms=phase == 1)
        lr = optimizer.param_groups[0]["lr"]
        train_loss, images, bad = self._train_epoch(net, optimizer, epoch)
        train = dict(train_loss=train_loss, lr=lr, train_images=images)
        val = self._evaluate(f"epoch {epoch} val")
        scheduler.step(in_phase + 1, val["top1"])  # the metric: for sched="plateau" (mode max)
        val["skipped_images"] += bad
        best = record.best
        row = record.add(f"epoch {epoch}", epoch, phase, train, val, model)
        if self.ema is not None:  # the average as a row of its own; it may be the best
            ema_val = self._evaluate(f"epoch {epoch} val (ema)", self.ema.module)
            ema_val["skipped_images"] = val["skipped_images"]
            record.add(f"epoch {epoch} (ema)", epoch, phase, train, ema_val, self.ema.module)
        state = dict(
            meta=self.meta,
            settings=s.decisive(),
            model=model.state_dict(),
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(),
            epoch=epoch,
            phase=phase,
            rng=rng_state(),
            rows=record.rows,
            best=record.best,
        )
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if self.objective.frozen is not None:
            state["teacher"] = self.objective.frozen.state_dict()
        self.dir.commit_epoch(model, state, record.rows, best=record.best_module if record.best is not best else None)
        return row

    def _finish(self, restore_best: bool) -> FinetuneResult:
        model, record = self.model, self.record
        if restore_best:
            if record.best_weights is not None:
                model.load_state_dict(with_metadata(record.best_weights, model), strict=True)
            else:  # the best epoch came before a resume: its file, checked, then loaded
                self.dir.restore_best(model)
        if self.s.channels_last:
            model.to(memory_format=torch.contiguous_format)
        model.eval()
        skipped = record.rows[-1]["skipped_images"]  # in the last epoch's passes over train/ and val/
        return FinetuneResult(record.rows, dict(record.best), skipped, self.dir.path, self.data.classes)

    def _start_phase(self, phase: int, epoch: int):
        s, model = self.s, self.model
        params.set_trainable(model, self.phase1_params if phase == 1 else None)
        lr = s.lr if phase == 1 else (s.phase2_lr if s.phase2_lr is not None else s.lr / 10)
        groups = (
            params.lr_groups(model, self.new, s.backbone_lr_scale, s.weight_decay) if s.backbone_lr_scale != 1 else None
        )
        optimizer, scheduler = optim.create(
            model,
            opt=s.opt,
            lr=lr,
            weight_decay=s.weight_decay,
            sched=s.sched,
            epochs=s.epochs if phase == 1 else s.phase2_epochs,
            warmup_epochs=s.warmup_epochs,
            groups=groups,
        )
        resumed = self.saved is not None and self.saved["phase"] == phase and self.saved["epoch"] == epoch - 1
        if resumed:
            restore_training(optimizer, scheduler, self.saved, self.dir.state_file)
            scheduler.step(epoch - 1 if phase == 1 else epoch - 1 - s.epochs)  # the lr of the epoch to run
        if phase == 2:  # the backbone moves from now on: distillation needs a copy of the original
            self.objective.freeze_teacher(model, self.saved.get("teacher") if resumed else None)
            mark_trained(model, self.ema.module if self.ema is not None else None)  # what its files record
        return optim.wrap(model, self.env), optimizer, scheduler

    def _set_epoch(self, epoch: int, phase: int) -> None:
        """The epoch's data order; phase 2 (norm layers on batch statistics) leaves out a last batch that
        would give a process one image (said once)."""
        batches = self.train_loader.batch_sampler
        batches.set_epoch(epoch, no_single=phase == 2)
        if batches.left_out and self.env.main and not self.said_left_out:
            self.said_left_out = True
            warnings.warn(
                f"phase 2 leaves out {batches.left_out} image(s) of each epoch: the last batch would give "
                f"a process a batch of one image, on which the norm layers cannot train",
                RetrofitWarning,
                stacklevel=4,
            )

    def _train_epoch(self, net: nn.Module, optimizer, epoch: int) -> tuple[float, int, int]:
        s, ema = self.s, self.ema
        phase = 1 if epoch <= s.epochs else 2

        def check() -> None:  # the phase's first step: anything trainable that gets no gradient
            check_first_step(self.model, phase, s.train_norms or phase == 2, warn=self.env.main)

        loss, images, bad = train_epoch(
            net,
            self.model,
            self.train_loader,
            optimizer,
            accum=s.accum_steps,
            env=self.env,
            progress=self.progress,
            label=f"epoch {epoch} train",
            seen_bad=self.seen_bad,
            objective=self.objective,
            clip_grad=s.clip_grad,
            clip_mode=s.clip_mode,
            channels_last=s.channels_last,
            after_step=(lambda: ema.update(self.model)) if ema is not None else None,
            check_step=check if epoch in (1, s.epochs + 1) else None,
        )
        if images == 0:
            raise RetrofitError(
                f"none of the {bad} images in {self.data.root}/train could be decoded (each is "
                f"named in a warning); replace or remove them"
            )
        return loss, images, bad

    def _evaluate(self, label: str, module: nn.Module | None = None) -> dict[str, Any]:
        return evaluate(
            module if module is not None else self.model,
            self.val_loader,
            classes=len(self.data.classes),
            env=self.env,
            progress=self.progress,
            label=label,
            seen_bad=self.seen_bad,
            root=self.data.root,
            channels_last=self.s.channels_last,
        )


def epoch_event(row: dict[str, Any]) -> Event:
    """The ``epoch`` event of an epoch's row (the live weights')."""
    return Event(
        "finetune",
        "epoch",
        f"epoch {row['epoch']}: top-1 {row['top1']:.2f}%, val loss {row['val_loss']:.4f}",
        dict(row),
    )


def _input_size(model: nn.Module) -> tuple[int, ...]:
    """The size the model was retrofitted at; for a plain network, timm's ``pretrained_cfg``'s."""
    info = get_info(model)
    if info is not None:
        return info.input_size
    return resolve_input_size(model, None)
