"""The short fine-tuning stage: the new SE blocks learn, the rest of the network stays as it was.

Method: Hu et al., "Squeeze-and-Excitation Networks" (CVPR 2018), https://arxiv.org/abs/1709.01507;
the schedule (train the new layers on a frozen backbone, then optionally everything at a lower rate) is
the usual transfer-learning recipe.

* **phase 1** (``epochs``): only the SE parameters (and the classifier when it is new) train; every
  other parameter is frozen and every norm layer stays in eval mode, so the backbone's weights and
  running statistics are bitwise unchanged.
* **phase 2** (``phase2_epochs``, optional): everything trains at ``phase2_lr``.

Optimizer and scheduler come from timm's factories (``create_optimizer_v2``, ``create_scheduler_v2``,
stepped once per epoch), data from timm's dataset and transforms (:mod:`retrofit.data`). Validation
top-1/top-5 is measured for the original network (the SE blocks bypassed), for the retrofitted one at
step 0 and after every epoch. Under ``torchrun`` the same call runs DistributedDataParallel
(:mod:`retrofit.distributed`); ``batch_size`` is the global batch, so 1 and N processes take the same
steps on the same images. Checkpoints (:mod:`retrofit.train_state`) make ``resume=True`` give bitwise
the weights of an uninterrupted run: the data order and every random draw are functions of
``(seed, epoch)``.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import remember_base
from .bypass import bypass as bypass_se  # its home is retrofit.bypass; kept importable here
from .data import ImageFolderData, warn_bad
from .distributed import Dist, setup
from .errors import RetrofitError, RetrofitWarning, first_line
from .train_state import STATE_FILE, check_model, load_state, restore_training, rng_state, save_state, set_rng_state

LAST_FILE, BEST_FILE, METRICS_FILE = "last.safetensors", "best.safetensors", "metrics.jsonl"


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


def finetune(model: nn.Module, data: str | Path, epochs: int = 1, *, phase2_epochs: int = 0, lr: float = 1e-3,
             phase2_lr: float | None = None, batch_size: int = 32, accum_steps: int = 1, opt: str = "adamw",
             weight_decay: float = 0.0, sched: str = "cosine", warmup_epochs: int = 0, seed: int = 0,
             augment: bool = True, train_head: bool | None = None, input_size: tuple[int, ...] | None = None,
             output_dir: str | Path | None = None, resume: bool = False, workers: int = 0,
             device: str | None = None, progress: bool = False, restore_best: bool = True) -> FinetuneResult:
    """Fine-tune a retrofitted model briefly on an ImageFolder; returns the metrics.

    Args:
        model: a model from :func:`retrofit.add_se` or :func:`retrofit.load`; trained in place.
        data: a folder with ``train/<class>/*`` and ``val/<class>/*`` images.
        epochs: phase-1 epochs (SE blocks, and a new head, train; the backbone is frozen).
        phase2_epochs: then this many epochs with everything trainable at ``phase2_lr``.
        lr, phase2_lr: learning rates (``phase2_lr`` defaults to ``lr / 10``).
        batch_size: the global batch (split over processes and ``accum_steps`` micro-batches).
        accum_steps: gradient accumulation: micro-batches per optimizer step.
        opt, weight_decay: passed to ``timm.optim.create_optimizer_v2`` (``adamw``, ``sgd``, ``lamb``...).
        sched, warmup_epochs: passed to ``timm.scheduler.create_scheduler_v2`` (``cosine``, ``step``...).
        seed: data order, augmentation and any new head are functions of it (and of the epoch).
        augment: timm's training transforms (random resized crop, flip, colour jitter); False: the
            evaluation transform for training too.
        train_head: train the classifier in phase 1 (default: only when it is new, i.e. when the data has
            another number of classes than the model, which then gets a new head).
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
    settings = Settings(epochs, phase2_epochs, lr, phase2_lr, batch_size, accum_steps, opt, weight_decay, sched,
                        warmup_epochs, seed, augment, train_head)
    env = setup(device)
    remember_base(model)  # the base an adapter of the result is made on (retrofit.adapter): before any change
    try:
        return _Run(model, settings, env, data, input_size, output_dir, resume, workers, progress).run(restore_best)
    finally:
        env.close()


def is_norm(module: nn.Module) -> bool:
    """Layers with running statistics (BatchNorm and timm's norm+act variants, InstanceNorm with stats)."""
    return isinstance(module, nn.modules.batchnorm._NormBase) or hasattr(module, "running_mean")


def seed_all(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _Run:
    """One fine-tuning run: the state shared by its phases, epochs and checkpoints."""

    def __init__(self, model, s: Settings, env: Dist, data, input_size, output_dir, resume, workers, progress):
        from .checkpoint import metadata

        info = getattr(model, "_retrofit", None)
        if info is None or not info.blocks:
            raise RetrofitError("this model has no SE blocks from retrofit; call retrofit.add_se first")
        for name in ("epochs", "phase2_epochs", "warmup_epochs"):
            if getattr(s, name) < 0:
                raise RetrofitError(f"{name} must be 0 or more, got {getattr(s, name)}")
        if s.epochs + s.phase2_epochs < 1:
            raise RetrofitError("nothing to train: give epochs (phase 1) or phase2_epochs of at least 1")
        if s.accum_steps < 1 or s.batch_size < 1 or s.batch_size % (env.world * s.accum_steps):
            raise RetrofitError(f"batch size {s.batch_size} must be a positive multiple of processes x "
                                f"accumulation steps ({env.world} x {s.accum_steps})")
        self.model, self.s, self.env, self.workers = model, s, env, workers
        self.data = ImageFolderData.open(data, model, input_size or info.input_size, augment=s.augment)
        self.new_head = self._fit_head(len(self.data.classes))
        self.train_head = self.new_head if s.train_head is None else s.train_head
        self.se_params = {n for b in info.blocks for n, _ in model.get_submodule(b.path).named_parameters(prefix=b.path)}
        head = model.get_classifier() if hasattr(model, "get_classifier") else None
        head_ids = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
        self.head_params = {n for n, p in model.named_parameters() if id(p) in head_ids}
        if self.train_head and not self.head_params:
            raise RetrofitError("cannot find this model's classifier to train (it has no get_classifier())")
        self.meta = metadata(model)
        self.out = Path(output_dir).expanduser() if output_dir is not None else None
        self.resume, self.show_progress = resume, progress and env.main
        self.rows: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.seen_bad: set[str] = set()
        self.saved: dict[str, Any] | None = None  # the training state resumed from
        self.bars = None  # rich progress (rank 0, progress=True)
        if self.out is not None:
            self._prepare_output()
        if len(self.data.train) < s.batch_size:
            raise RetrofitError(f"{self.data.root}/train has {len(self.data.train)} images, fewer than one "
                                f"batch of {s.batch_size}; lower the batch size")
        model.to(env.device)

    # -- setup -------------------------------------------------------------------------------------
    def _fit_head(self, classes: int) -> bool:
        """A new classifier when the data has another number of classes (seeded: a resumed run rebuilds
        the same one before loading the saved weights over it)."""
        have = getattr(self.model, "num_classes", None)
        if not isinstance(have, int) or have == classes:
            return False
        if not hasattr(self.model, "reset_classifier"):
            raise RetrofitError(f"the data has {classes} classes but the model {have}; give a model with "
                                f"{classes} outputs")
        torch.manual_seed(self.s.seed)
        self.model.reset_classifier(classes)
        return True

    def _prepare_output(self) -> None:
        out, state = self.out, self.out / STATE_FILE
        if not out.parent.is_dir():
            raise RetrofitError(f"output folder {out.parent} does not exist; create it first")
        if out.exists() and not out.is_dir():
            raise RetrofitError(f"output {out} is a file; give a folder for the fine-tuning run")
        if self.resume and state.is_file():
            self.saved = load_state(state)
            self._check_resumable(self.saved, state)
            check_model(self.saved, self.model, state)
        elif self.resume:
            if self.env.main:
                import warnings
                warnings.warn(f"nothing to resume in {out}; starting at epoch 1", RetrofitWarning, stacklevel=3)
        elif state.exists():
            raise RetrofitError(f"{out} already holds a fine-tuning run; pass --resume (resume=True) to "
                                f"continue it, or delete it, or choose another output folder")
        if self.env.main:
            out.mkdir(exist_ok=True)
        self.env.barrier()

    def _check_resumable(self, saved: dict[str, Any], path: Path) -> None:
        mine, theirs = self.meta, saved.get("meta", {})
        for key, what in (("architecture", "architecture"), ("model_kwargs", "model arguments"),
                          ("recipe", "recipe"), ("input_size", "input size")):
            if mine.get(key) != theirs.get(key):
                raise RetrofitError(f"{path} is from another model ({what} {theirs.get(key)!r}, this one "
                                    f"{mine.get(key)!r}); choose another output folder or drop --resume")
        then = saved.get("settings", {})
        now = asdict(self.s)
        changed = [k for k in now if k in then and then[k] != now[k]]
        if changed:
            k = changed[0]
            raise RetrofitError(f"{path} was started with {k} = {then[k]!r}, now {now[k]!r}; resume with the "
                                f"same settings (or choose another output folder)")

    # -- the run -----------------------------------------------------------------------------------
    def run(self, restore_best: bool) -> FinetuneResult:
        s, env, model = self.s, self.env, self.model
        rank, world, micro = env.rank, env.world, s.batch_size // (env.world * s.accum_steps)
        self.train_loader = self.data.train_loader(micro, seed=s.seed, rank=rank, world=world, workers=self.workers)
        self.val_loader = self.data.val_loader(micro * s.accum_steps, rank=rank, world=world, workers=self.workers)
        done = 0
        total = s.epochs + s.phase2_epochs
        net, optimizer, scheduler, phase = None, None, None, 0
        with self._progress():
            if self.saved is not None:
                model.load_state_dict(self.saved["model"], strict=True)
                self.rows, self.best = self.saved["rows"], self.saved["best"]
                done = self.saved["epoch"]
                set_rng_state(self.saved["rng"])
            else:
                with bypass_se(model):
                    self._record("original", 0, 0, None, self._evaluate("original"))
                self._record("step 0", 0, 0, None, self._evaluate("step 0"))
            for epoch in range(done + 1, total + 1):
                if (1 if epoch <= s.epochs else 2) != phase:
                    phase = 1 if epoch <= s.epochs else 2
                    net, optimizer, scheduler = self._start_phase(phase, epoch)
                in_phase = epoch - 1 if phase == 1 else epoch - 1 - s.epochs
                seed_all(s.seed + 1000 * epoch + rank)  # augmentation and dropout draws of this epoch
                self.train_loader.sampler.set_epoch(epoch)
                self._set_modes(phase)
                lr = optimizer.param_groups[0]["lr"]
                train_loss, images, bad = self._train_epoch(net, optimizer, epoch)
                val = self._evaluate(f"epoch {epoch} val")
                scheduler.step(in_phase + 1, val["top1"])  # the metric: for sched="plateau" (mode max)
                val["skipped_images"] += bad
                self._record(f"epoch {epoch}", epoch, phase, dict(train_loss=train_loss, lr=lr, train_images=images), val)
                if self.out is not None:
                    self._checkpoint(epoch, phase, optimizer, scheduler)
        if restore_best:
            self._restore_best()
        model.eval()
        skipped = self.rows[-1]["skipped_images"]  # in the last epoch's passes over train/ and val/
        return FinetuneResult(self.rows, dict(self.best), skipped, self.out, self.data.classes)

    def _start_phase(self, phase: int, epoch: int):
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2

        s, model = self.s, self.model
        for name, p in model.named_parameters():
            p.requires_grad_(phase == 2 or name in self.se_params or (self.train_head and name in self.head_params))
        lr = s.lr if phase == 1 else (s.phase2_lr if s.phase2_lr is not None else s.lr / 10)
        try:
            optimizer = create_optimizer_v2(model, opt=s.opt, lr=lr, weight_decay=s.weight_decay)
        except (ValueError, AssertionError, KeyError) as err:
            raise RetrofitError(f"optimizer {s.opt!r}: {first_line(err)}; timm.optim.list_optimizers() lists "
                                f"the names") from None
        epochs = s.epochs if phase == 1 else s.phase2_epochs
        scheduler, _ = create_scheduler_v2(optimizer, sched=s.sched, num_epochs=epochs, warmup_epochs=s.warmup_epochs)
        if scheduler is None:
            raise RetrofitError(f"unknown scheduler {s.sched!r}; use cosine, tanh, step, multistep, plateau or poly")
        if self.saved is not None and self.saved["phase"] == phase and self.saved["epoch"] == epoch - 1:
            restore_training(optimizer, scheduler, self.saved, self.out / STATE_FILE)
            scheduler.step(epoch - 1 if phase == 1 else epoch - 1 - s.epochs)  # the lr of the epoch to run
        net = model
        if self.env.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.env.device.index] if self.env.device.type == "cuda" else None
            net = DistributedDataParallel(model, device_ids=ids)
        return net, optimizer, scheduler

    def _set_modes(self, phase: int) -> None:
        self.model.train()
        if phase == 1:  # frozen backbone: its norm layers keep their running statistics
            for name, m in self.model.named_modules():
                if is_norm(m):
                    m.eval()

    def _autocast(self):
        dev = self.env.device
        return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")

    def _train_epoch(self, net: nn.Module, optimizer, epoch: int) -> tuple[float, int]:
        accum, dev = self.s.accum_steps, self.env.device
        steps = len(self.train_loader)
        loss_sum, seen, bad = 0.0, 0, 0
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        optimizer.zero_grad(set_to_none=True)
        task = self._task(f"epoch {epoch} train", steps)
        for i, batch in enumerate(self.train_loader):
            bad += len(batch.bad)
            if self.env.main:
                warn_bad(batch.bad, self.seen_bad)
            sync = (i + 1) % accum == 0 or i + 1 == steps
            no_sync = net.no_sync() if (net is not self.model and not sync) else contextlib.nullcontext()
            with no_sync:
                if len(batch.targets):
                    x, y = batch.images.to(dev, non_blocking=True), batch.targets.to(dev, non_blocking=True)
                    with self._autocast():
                        loss = F.cross_entropy(net(x).float(), y)
                    loss_sum += loss.item() * len(y)
                    seen += len(y)
                else:  # every image of this micro-batch was bad: a zero step keeps processes in lock-step
                    loss = sum(p.sum() * 0 for p in trainable)
                (loss / accum).backward()
            if sync:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            self._advance(task, loss=loss_sum / max(seen, 1))
        loss_sum, seen, bad = self.env.sum([loss_sum, seen, bad])
        return loss_sum / max(seen, 1), int(seen), int(bad)

    @torch.no_grad()
    def _evaluate(self, label: str) -> dict[str, Any]:
        model, dev = self.model, self.env.device
        model.eval()
        loss_sum = n = top1 = top5 = bad = 0.0
        task = self._task(label, len(self.val_loader))
        classes = len(self.data.classes)
        for batch in self.val_loader:
            bad += len(batch.bad)
            if self.env.main:
                warn_bad(batch.bad, self.seen_bad)
            if len(batch.targets):
                x, y = batch.images.to(dev), batch.targets.to(dev)
                with self._autocast():
                    logits = model(x).float()
                if logits.dim() != 2 or logits.shape[1] < classes:
                    raise RetrofitError(f"the model gives {tuple(logits.shape[1:])} outputs per image but the "
                                        f"data has {classes} classes")
                loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
                hits = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(y[:, None])
                top1 += hits[:, 0].sum().item()
                top5 += hits.any(dim=1).sum().item()
                n += len(y)
            self._advance(task)
        loss_sum, n, top1, top5, bad = self.env.sum([loss_sum, n, top1, top5, bad])
        if n == 0:
            raise RetrofitError(f"no image in {self.data.root}/val could be decoded")
        return dict(val_loss=loss_sum / n, top1=100 * top1 / n, top5=100 * top5 / n, val_images=int(n),
                    skipped_images=int(bad))

    def _record(self, name: str, epoch: int, phase: int, train: dict | None, val: dict) -> None:
        row = dict(name=name, epoch=epoch, phase=phase, train_loss=None, lr=None, train_images=None, **val)
        row.update(train or {})
        self.rows.append(row)
        if name != "original" and (self.best is None or row["top1"] > self.best["top1"]):
            self.best = row
            self.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
            if self.out is not None and self.env.main:
                from .checkpoint import save

                save(self.model, self.out / BEST_FILE)
        if self.out is not None and name in ("step 0",):
            self._write_metrics()

    def _checkpoint(self, epoch: int, phase: int, optimizer, scheduler) -> None:
        """best (already written) -> last -> train_state -> metrics: a kill between two of them resumes from
        the previous train_state and redoes this epoch, which rewrites the same files."""
        from .checkpoint import save

        if self.env.main:
            save(self.model, self.out / LAST_FILE)
            save_state(self.out / STATE_FILE, dict(
                meta=self.meta, settings=asdict(self.s), model=self.model.state_dict(),
                optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), epoch=epoch, phase=phase,
                rng=rng_state(), rows=self.rows, best=self.best))
            self._write_metrics()
        self.env.barrier()

    def _write_metrics(self) -> None:
        if not self.env.main:
            return
        path = self.out / METRICS_FILE
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
            os.replace(tmp, path)
        except OSError as err:
            raise RetrofitError(f"cannot write {path}: {err.strerror or err}; the checkpoints are kept, "
                                f"free space and rerun with --resume") from None
        finally:
            tmp.unlink(missing_ok=True)

    def _restore_best(self) -> None:
        weights = self.best_weights
        if weights is None and self.out is not None and (self.out / BEST_FILE).is_file():
            from .checkpoint import load_into  # the best epoch came before a resume: checked, then loaded

            load_into(self.model, self.out / BEST_FILE)
        elif weights is not None:
            self.model.load_state_dict(weights, strict=True)

    # -- progress bars (rank 0) --------------------------------------------------------------------
    def _progress(self):
        self.bars = None
        if not self.show_progress:
            return contextlib.nullcontext()
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                             console=Console(stderr=True), transient=True)
        return self.bars

    def _task(self, label: str, total: int):
        return self.bars.add_task(label, total=total, info="") if self.bars is not None else None

    def _advance(self, task, loss: float | None = None) -> None:
        if task is not None:
            self.bars.update(task, advance=1, info=f"loss {loss:.4f}" if loss is not None else "")


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


__all__ = ["finetune", "FinetuneResult", "Settings", "bypass_se", "results_table"]
