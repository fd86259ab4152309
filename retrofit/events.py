"""One way to follow a long call: :class:`Event`, passed to an ``on_event`` callback and logged.

:func:`retrofit.finetune`, :func:`retrofit.sweep`, :func:`retrofit.tune`, :func:`retrofit.measure_latency`
and ``retrofit.sweep.check.check_models`` each take ``on_event``, a function called with every
:class:`Event` the call makes, and each event is also logged (level INFO) on the logger
``retrofit.<source>`` (``retrofit.finetune``, ``retrofit.sweep``, ``retrofit.tune``, ``retrofit.latency``,
``retrofit.check``), so user code follows
a fine-tune, a sweep and a tune the same way, by a callback or by ``logging``:

    >>> seen = []
    >>> result = retrofit.finetune(retrofit.add_se(model, r=4), "data/", epochs=2, batch_size=8, on_event=seen.append)
    >>> [(e.source, e.kind, e.data["epoch"]) for e in seen]
    [('finetune', 'epoch', 1), ('finetune', 'epoch', 2)]

``retrofit.sweep(model, r=[4, 16], data="data/", on_event=print)`` follows a sweep the same way (``run``
events), and ``logging.basicConfig(level=logging.INFO)`` shows every event as a log line instead.

The kinds:

* ``epoch`` (``finetune``): an epoch is committed; ``data`` is its row (the line of ``metrics.jsonl``).
  A callback that returns true ends the run there, as if it had been given that many epochs (the
  schedule stays that of all of them); it must draw no random numbers, so the run is bitwise the same
  with it as without it (``retrofit tune`` reports each epoch to its pruner this way). Under torchrun it
  is called on every process, and the run ends on all of them when it returns true on one.
* ``run`` (``sweep``, ``tune``): one fine-tune of a sweep's combination or control arm (or a tune's
  finish) ended; ``data``: ``done``, ``total`` and the run's numbers or its failure.
* ``round`` (``latency``, and the sweep's latency): a timed round ended; ``data``: ``done``, ``total``.
* ``line`` (``tune``): one line of progress (a trial's result, the summary, a dead worker's trial).
* ``model`` (``check``): one model of ``retrofit check`` checked; ``data["result"]``: its ``CheckResult``.

A callback's return value counts only for ``epoch`` events; the others ignore it.

This replaces the five callbacks of earlier versions (``on_epoch``, ``on_run``, ``on_round``,
``on_line`` and the coverage check's ``on_result``); :func:`legacy` keeps them working for a while, with a
``DeprecationWarning`` naming ``on_event``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

KINDS = ("epoch", "run", "round", "line", "model")


@dataclass(frozen=True)
class Event:
    """One thing a long call did: its ``source`` (``finetune``, ``sweep``, ``tune``, ``latency``), its
    ``kind`` (see the module doc), a ``message`` for people and its ``data`` for code."""

    source: str
    kind: str
    message: str
    data: Mapping[str, Any] = field(default_factory=dict)


OnEvent = Callable[[Event], Any]


def emit(on_event: OnEvent | None, event: Event) -> bool:
    """Log ``event`` on ``retrofit.<source>`` and pass it to ``on_event``; True when the callback returned
    a true value (an ``epoch`` event's request to stop)."""
    logging.getLogger(f"retrofit.{event.source}").info("%s", event.message)
    return bool(on_event(event)) if on_event is not None else False


def legacy(on_event: OnEvent | None, where: str, **old: Callable | None) -> OnEvent | None:
    """``on_event``, or one made from a deprecated callback of ``where`` (``on_epoch=...``: called with the
    event's row; ``on_run``/``on_line``: with its message; ``on_round``: with ``done, total``; ``on_result``: with the
    checked model's result), with a
    ``DeprecationWarning`` naming the new call. Both given: an error."""
    given = {name: fn for name, fn in old.items() if fn is not None}
    if not given:
        return on_event
    if on_event is not None:
        raise TypeError(f"{where}: give on_event only, not also {', '.join(given)}")
    warnings.warn(
        f"{where}({', '.join(f'{n}=...' for n in given)}) is deprecated: pass on_event=fn, called with "
        f"each retrofit.Event (see retrofit.events)",
        DeprecationWarning,
        stacklevel=3,
    )

    def call(event: Event) -> Any:
        if event.kind == "epoch" and "on_epoch" in given:
            return given["on_epoch"](dict(event.data))
        if event.kind == "round" and "on_round" in given:
            return given["on_round"](event.data["done"], event.data["total"])
        if event.kind == "model" and "on_result" in given:
            return given["on_result"](event.data["result"])
        for name in ("on_run", "on_line"):
            if name in given and event.kind in ("run", "line"):
                return given[name](event.message)
        return None

    return call
