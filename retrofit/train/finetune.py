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

import inspect
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from ..events import OnEvent, legacy
from ..files.adapter import remember_base
from . import params
from .config import FIELDS, FinetuneConfig
from .data import ImageFolderData
from .distributed import setup, watch_peers
from .result import FinetuneResult
from .run import Run


def finetune(
    model: nn.Module,
    data: str | Path | ImageFolderData,
    config: FinetuneConfig | None = None,
    *,
    input_size: tuple[int, ...] | None = None,
    output_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = False,
    restore_best: bool = True,
    on_event: OnEvent | None = None,
    on_epoch: Callable[[dict[str, Any]], bool] | None = None,
    **options: Any,
) -> FinetuneResult:
    """Fine-tune a retrofitted model briefly on an ImageFolder; returns the metrics.

    Args:
        model: a model from :func:`retrofit.add_se`, :func:`retrofit.load` or :func:`retrofit.from_pretrained`;
            trained in place. A plain network (no blocks) trains too, as the control arms of
            :func:`retrofit.sweep` do: phase 1 then trains what ``train_head``/``train_norms`` name (and it
            cannot be saved: no ``output_dir``).
        data: a folder with ``train/<class>/*`` and ``val/<class>/*`` images, or an open
            :class:`~retrofit.train.data.ImageFolderData` (its transforms are used as they are).
        config: a :class:`retrofit.FinetuneConfig` (default: its defaults).
        **options: any field of :class:`retrofit.FinetuneConfig` (``epochs=2``, ``lr=1e-2``,
            ``smoothing=0``...), overriding ``config``'s; an unknown name or a bad value is one
            ``RetrofitError``. Each option's type, default, bounds and help: ``docs/reference/options.md``.
        input_size: ``(C, H, W)`` for the transforms (default: the size the model was retrofitted at).
        output_dir: where ``train_state.pt`` (for resume), ``last.safetensors``, ``best.safetensors`` (by
            val top-1, step 0 included) and ``metrics.jsonl`` go; None: nothing is written.
        resume: continue the run saved in ``output_dir``.
        progress: rich progress bars on stderr (rank 0).
        restore_best: end with the best weights by val top-1 in ``model`` (else the last ones).
        on_event: called with each :class:`retrofit.Event` (here: ``epoch``, once each epoch is committed,
            with its row; a true return value ends the run there; see :mod:`retrofit.events`).
        on_epoch: deprecated: ``on_event``.

    Returns:
        :class:`FinetuneResult`; ``result.row("step 0")["top1"]``, ``result.best["name"]``...

    Raises:
        RetrofitError: bad options or data, or a phase whose first step gives no trainable parameter a
            gradient (it would train nothing; :mod:`retrofit.train.gradients` says why and what to do).
            Tensors that get none while others do are named in one ``RetrofitWarning``.
        retrofit.train.distributed.PeerLost: under torchrun, another process of the job died (a
            ``RetrofitError``: one line, which says that ``output_dir`` holds the epochs committed before it and
            ``resume=True`` continues).

    Example::

        >>> se = retrofit.add_se(model, r=16)   # model: your trained network (timm's, or your own)
        >>> result = retrofit.finetune(se, data="data/", epochs=2, batch_size=8, output_dir="runs/se50")
        >>> [row["name"] for row in result.rows]
        ['original', 'step 0', 'epoch 1', 'epoch 2']
        >>> result = retrofit.finetune(se, "data/", retrofit.FinetuneConfig(epochs=1, smoothing=0.0))
    """
    if isinstance(config, int) and not isinstance(config, bool):  # finetune(model, data, 2): epochs, positionally
        warnings.warn(
            "retrofit.finetune(model, data, EPOCHS) is deprecated: pass epochs=EPOCHS (the third "
            "argument is now a retrofit.FinetuneConfig)",
            DeprecationWarning,
            stacklevel=2,
        )
        config, options = None, {"epochs": config, **options}
    config = FinetuneConfig.build(config, **options)
    config.check_run()
    on_event = legacy(on_event, "retrofit.finetune", on_epoch=on_epoch)
    env = setup(config.device)
    if params.block_params(model):  # a plain network (a sweep's control arm) has no adapter to make
        remember_base(model)  # the base an adapter of the result is made on (retrofit.files.adapter): before any change
    run = None
    then = (
        f"{output_dir} holds the epochs finished before it: the same command with --resume continues"
        if output_dir is not None
        else "this run saved nothing"
    )
    try:
        with watch_peers(env.world, then):
            run = Run(model, config, env, data, input_size, output_dir, resume, progress)
            return run.run(restore_best, on_event)
    finally:
        if run is not None:
            run.dir.close()  # the folder's lock
        env.close()


def _signature() -> inspect.Signature:
    """finetune's signature as tools see it: ``**options`` spelled out as the config's fields (keyword-only,
    their defaults), from the fields themselves."""
    sig = inspect.signature(finetune)
    head = [p for p in sig.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    fields_ = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
        for name, f in FIELDS.items()
    ]
    return sig.replace(parameters=head + fields_)


finetune.__signature__ = _signature()
