"""One definition of each fine-tune option: :class:`FinetuneConfig`.

Each field holds its type (the annotation), its default, its bounds and its help (the field's
``metadata``, as Hugging Face's ``TrainingArguments`` and PEFT's ``LoraConfig`` keep theirs). Everything
else is made from it, never written again:

* :func:`retrofit.finetune`'s keyword arguments (checked overrides of a config) and its signature;
* the options of ``retrofit finetune``, ``add-se --finetune``, ``sweep --data`` and ``tune``
  (:mod:`retrofit.cli.options` builds each typer option from its field);
* the settings a run folder records and compares on ``--resume`` (:meth:`FinetuneConfig.decisive`);
* the option table of ``docs/reference/options.md`` (:func:`markdown_table`, kept up to date by a test).

One default per option. Where the command line differs from Python on purpose, the field says so in
``cli_default`` and both show it: ``workers`` is 0 in Python (the calling process loads the images, so
nothing starts processes from a notebook) and 2 on the command line.

    >>> config = retrofit.FinetuneConfig(epochs=2, lr=1e-2)
    >>> config.replace(smoothing=0.0).smoothing
    0.0
    >>> retrofit.FinetuneConfig(smoothing=1.5)
    Traceback (most recent call last):
    retrofit.errors.RetrofitError: smoothing must be in [0, 1), got 1.5
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from ..errors import RetrofitError, excerpt

_SAME = object()  # cli_default: the command line's default is the field's own


def option(
    default: Any,
    help: str,
    *,
    flags: tuple[str, ...],
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    choices: tuple[str, ...] | None = None,
    cli_default: Any = _SAME,
    decides: bool = True,
) -> Any:
    """A field of :class:`FinetuneConfig`: its default and, as metadata, its help, its command-line
    ``flags`` (``("--epochs", "-e")``; a boolean's ``("--augment/--no-augment",)``), its bounds (``low``,
    ``high``, each closed unless ``*_open``), its ``choices``, the command line's own default when it
    differs on purpose (``cli_default``; the help says why), and whether it ``decides`` the result (a
    run folder records those and a resumed run must keep them; ``workers`` and ``device`` do not)."""
    return field(
        default=default,
        metadata=dict(
            help=help,
            flags=flags,
            low=low,
            high=high,
            low_open=low_open,
            high_open=high_open,
            choices=choices,
            cli_default=cli_default,
            decides=decides,
        ),
    )


@dataclass(frozen=True)
class FinetuneConfig:
    """The options of a fine-tune (:func:`retrofit.finetune`); each field's help is in ``docs/reference/options.md``
    and in ``retrofit finetune --help``, both made from the field itself.

    Phase 1 trains the inserted blocks (and a new head) for ``epochs``; phase 2 then trains everything
    for ``phase2_epochs`` at ``phase2_lr``. The regularisers a timm user expects come from timm: label
    smoothing, mixup / cutmix (:class:`timm.data.Mixup`), a model EMA (:class:`timm.utils.ModelEmaV3`),
    gradient clipping, ``lr_scale`` parameter groups, ``channels_last``; and distillation from the
    original network. Defaults from ``benchmarks/transfer.py`` (README, "Does SE help?"): label smoothing
    0.1, everything else off.

    Construction checks every value (its type and bounds), so a bad one is one :class:`RetrofitError`
    naming the field; :meth:`replace` checks the names too.
    """

    epochs: int = option(
        1, "Phase-1 epochs: only the SE blocks (and a new head) train.", flags=("--epochs", "-e"), low=0
    )
    phase2_epochs: int = option(0, "Then train everything for this many epochs.", flags=("--phase2-epochs",), low=0)
    lr: float = option(1e-3, "Phase-1 learning rate.", flags=("--lr",), low=0, low_open=True)
    phase2_lr: float | None = option(
        None,
        "Phase-2 learning rate (default: lr / 10); in sweep --data and tune, the rate of the full-network control.",
        flags=("--phase2-lr",),
        low=0,
        low_open=True,
    )
    batch_size: int = option(32, "Global batch size (over all processes).", flags=("--batch-size", "-b"), low=1)
    accum_steps: int = option(1, "Gradient accumulation: micro-batches per step.", flags=("--accum-steps",), low=1)
    opt: str = option("adamw", "timm optimizer name (adamw, sgd, lamb...).", flags=("--opt",))
    weight_decay: float = option(0.0, "Weight decay.", flags=("--weight-decay",), low=0)
    sched: str = option("cosine", "timm scheduler name (cosine, step, plateau...).", flags=("--sched",))
    warmup_epochs: int = option(0, "Warm-up epochs of the scheduler.", flags=("--warmup-epochs",), low=0)
    seed: int = option(0, "Data order, augmentation and a new head follow it.", flags=("--seed",))
    augment: bool = option(True, "timm's training augmentation.", flags=("--augment/--no-augment",))
    train_head: bool | None = option(
        None, "Train the classifier in phase 1 (default: only a new one).", flags=("--train-head/--freeze-head",)
    )
    train_norms: bool = option(
        False,
        "Phase 1 also trains the norm layers' affine parameters (statistics stay frozen).",
        flags=("--train-norms/--freeze-norms",),
    )
    workers: int = option(
        0,
        "Data-loading processes per training process (the weights do not depend on it). Python's default 0 "
        "loads the images in the calling process, so a call from a notebook starts no processes; the command "
        "line's default is 2.",
        flags=("--workers", "-j"),
        low=0,
        cli_default=2,
        decides=False,
    )
    device: str | None = option(
        None, "cpu, cuda or cuda:N (default: cuda when available).", flags=("--device",), decides=False
    )
    smoothing: float = option(
        0.1,
        "Label smoothing (timm's LabelSmoothingCrossEntropy; 0: plain cross-entropy). Default 0.1: timm's "
        "default, and in benchmarks/transfer.py (digits transfer, 5 seeds) it added +0.89 points of top-1 to "
        "head + SE [95% CI -0.01, +1.79] (+0.67 [+0.47, +0.87] in an earlier run).",
        flags=("--smoothing",),
        low=0,
        high=1,
        high_open=True,
    )
    mixup: float = option(
        0.0,
        "Mixup alpha (timm.data.Mixup), e.g. 0.2; an odd micro-batch mixes all but its last image. Default 0: "
        "in benchmarks/transfer.py mixup 0.2 changed top-1 by +0.04 points [-0.90, +0.99]: no gain there.",
        flags=("--mixup",),
        low=0,
    )
    cutmix: float = option(
        0.0,
        "CutMix alpha (timm.data.Mixup; with --mixup, one of the two per batch), e.g. 1.0. Default 0.",
        flags=("--cutmix",),
        low=0,
    )
    ema_decay: float | None = option(
        None,
        "Keep a model EMA (timm ModelEmaV3, decay warm-up on), e.g. 0.999; each epoch gets an 'epoch N (ema)' "
        "row, which may be the best. Default off: in benchmarks/transfer.py an EMA of 0.99 changed top-1 by "
        "-0.54 points [-1.17, +0.10] over 50 steps.",
        flags=("--ema-decay",),
        low=0,
        high=1,
        low_open=True,
        high_open=True,
    )
    clip_grad: float | None = option(
        None,
        "Clip gradients before each step (timm dispatch_clip_grad), e.g. 1.0. Default off.",
        flags=("--clip-grad",),
        low=0,
        low_open=True,
    )
    clip_mode: str = option(
        "norm",
        "norm, value or agc (adaptive gradient clipping).",
        flags=("--clip-mode",),
        choices=("norm", "value", "agc"),
    )
    backbone_lr_scale: float = option(
        1.0,
        "The pretrained parameters train at the phase's lr x this; the new blocks and a new head at the full lr "
        "(timm lr_scale groups). Default 1: one rate.",
        flags=("--backbone-lr-scale",),
        low=0,
    )
    channels_last: bool = option(
        False,
        "Train in channels_last memory format (faster convolutions on recent GPUs).",
        flags=("--channels-last/--no-channels-last",),
    )
    distill: bool = option(
        False,
        "Add the KL divergence to the original network's logits (the model with its blocks bypassed: no extra "
        "weights). Phase 2 keeps a frozen copy as the teacher. Default off: in benchmarks/transfer.py it "
        "changed top-1 by -0.40 points [-1.41, +0.61] in phase 1 and -8.57 [-12.15, -4.99] in phase 2.",
        flags=("--distill/--no-distill",),
    )
    distill_weight: float = option(
        1.0, "Weight of the distillation term (the label loss has weight 1).", flags=("--distill-weight",), low=0
    )
    distill_temperature: float = option(
        1.0,
        "Distillation temperature T (the term is scaled by T^2); timm's default 1.",
        flags=("--distill-temperature",),
        low=0,
        low_open=True,
    )

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, _checked(f, getattr(self, f.name)))

    def check_run(self) -> None:
        """What a run needs besides valid values: something to train."""
        if self.epochs + self.phase2_epochs < 1:
            raise RetrofitError("nothing to train: give epochs (phase 1) or phase2_epochs of at least 1")

    def replace(self, **changes: Any) -> FinetuneConfig:
        """A copy with ``changes`` (field names; an unknown one is an error naming the closest option)."""
        check_names(changes, "finetune")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Every option and its value (plain values: JSON and YAML as they are)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def decisive(self) -> dict[str, Any]:
        """The options that decide the result: what a run folder records and a resumed run must keep
        (all but ``workers`` and ``device``)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["decides"]}

    @classmethod
    def build(cls, config: FinetuneConfig | Mapping[str, Any] | None = None, **overrides: Any) -> FinetuneConfig:
        """A config from a config (or a mapping of options, or None: the defaults) and checked overrides."""
        if config is None:
            config = cls()
        elif isinstance(config, Mapping):
            check_names(config, "finetune")
            config = cls(**config)
        elif not isinstance(config, cls):
            raise RetrofitError(
                f"config must be a retrofit.FinetuneConfig or a mapping of its options, not {type(config).__name__}"
            )
        return config.replace(**overrides) if overrides else config


OPTIONS: tuple[str, ...] = tuple(f.name for f in fields(FinetuneConfig))
FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in fields(FinetuneConfig)}
DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(FinetuneConfig)}
# What one accuracy run of a sweep or a tune takes from the user (their options, and the sweep's JSON `train`); the
# sweep sets the seeds and what trains itself, and each adds its own epochs (and sweep its lr; tune's lr is an axis)
RUN_OPTIONS = (
    "phase2_lr",
    "batch_size",
    "augment",
    "workers",
    "device",
    "smoothing",
    "mixup",
    "cutmix",
    "ema_decay",
    "clip_grad",
    "clip_mode",
    "backbone_lr_scale",
    "channels_last",
    "distill",
    "distill_weight",
    "distill_temperature",
)


def check_names(options: Mapping[str, Any], where: str) -> None:
    """An unknown option name is one error naming the closest known one."""
    for name in options:
        if name not in FIELDS:
            close = difflib.get_close_matches(str(name), OPTIONS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise RetrofitError(
                f"{where}: unknown option {excerpt(name)}{hint}; the options are the fields of "
                f"retrofit.FinetuneConfig: {', '.join(OPTIONS)}"
            )


@functools.cache
def _types() -> dict[str, Any]:
    return typing.get_type_hints(FinetuneConfig)


def kind(name: str) -> tuple[type, bool]:
    """A field's value type (``int``, ``float``, ``str``, ``bool``) and whether it may be None."""
    hint = _types()[name]
    args = typing.get_args(hint)
    if args:  # X | None
        return next(a for a in args if a is not type(None)), type(None) in args
    return hint, False


def bounds_text(f: dataclasses.Field) -> str:
    """The field's bounds as a reader writes them: ``x >= 0``, ``0 <= x < 1``, ``x > 0``; ``""`` if none."""
    m = f.metadata
    parts = []
    if m["low"] is not None:
        parts.append(f"{_g(m['low'])} {'<' if m['low_open'] else '<='} ")
    parts.append("x")
    if m["high"] is not None:
        parts.append(f" {'<' if m['high_open'] else '<='} {_g(m['high'])}")
    text = "".join(parts)
    if m["high"] is None and m["low"] is not None:  # one bound: written x >= 0
        text = f"x {'>' if m['low_open'] else '>='} {_g(m['low'])}"
    return "" if text == "x" else text


def _g(value: float) -> str:
    return f"{value:g}"


def _checked(f: dataclasses.Field, value: Any) -> Any:
    """``value`` for field ``f``: of the field's type (an int for a float field becomes a float), within its
    bounds and choices; else one error in the words a user reads (``smoothing must be in [0, 1), got 1.5``)."""
    base, optional = kind(f.name)
    if value is None:
        if optional:
            return None
        raise RetrofitError(f"{f.name} must be {base.__name__}, got None")
    good = isinstance(value, base) and (base is bool or not isinstance(value, bool))
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        value, good = float(value), True
    if not good:
        raise RetrofitError(
            f"{f.name} must be {'a whole number' if base is int else base.__name__}, got {excerpt(value)}"
        )
    m = f.metadata
    if m["choices"] is not None and value not in m["choices"]:
        raise RetrofitError(
            f"{f.name} must be {', '.join(m['choices'][:-1])} or {m['choices'][-1]}, got {excerpt(value)}"
        )
    low_ok = m["low"] is None or (value > m["low"] if m["low_open"] else value >= m["low"])
    high_ok = m["high"] is None or (value < m["high"] if m["high_open"] else value <= m["high"])
    if not (low_ok and high_ok):
        raise RetrofitError(f"{f.name} must be {_range_words(m)}, got {excerpt(value)}")
    return value


def _range_words(m: Mapping[str, Any]) -> str:
    """``0 or more``, ``positive``, ``1 or more``, ``in [0, 1)``, ``in (0, 1)``."""
    if m["high"] is None:
        if m["low_open"]:
            return "positive" if m["low"] == 0 else f"more than {_g(m['low'])}"
        return f"{_g(m['low'])} or more"
    return f"in {'(' if m['low_open'] else '['}{_g(m['low'])}, {_g(m['high'])}{')' if m['high_open'] else ']'}"


def markdown_table() -> str:
    """The option table of ``docs/reference/options.md``: option, flags, type, default (the command line's where it
    differs), bounds, help; made from the fields alone."""
    rows = [
        "| option | command line | type | default | bounds | what it does |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for f in fields(FinetuneConfig):
        m = f.metadata
        base, optional = kind(f.name)
        default = repr(f.default)
        if m["cli_default"] is not _SAME:
            default += f" (command line: {m['cli_default']!r})"
        bounds = bounds_text(f) or (" \\| ".join(m["choices"]) if m["choices"] else "")
        flags = ", ".join(f"`{flag}`" for flag in m["flags"])
        rows.append(
            f"| `{f.name}` | {flags} | `{base.__name__}{' or None' if optional else ''}` | `{default}` | "
            f"{bounds} | {m['help'].replace('|', chr(92) + '|')} |"
        )
    return "\n".join(rows)


def cli_default(f: dataclasses.Field) -> Any:
    """The field's default on the command line (its own, unless ``cli_default`` says otherwise)."""
    return f.default if f.metadata["cli_default"] is _SAME else f.metadata["cli_default"]
