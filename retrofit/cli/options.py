"""The typer options made from the one definition of each option: :class:`retrofit.FinetuneConfig`'s fields
(:mod:`retrofit.train.config`) and the recipe's (:mod:`retrofit.surgery.recipe_fields`).

Nothing here writes a default, a bound or a help text: each typer option takes its flags, default
(the command line's own where the field says it differs on purpose), bounds and help from its field.
Closed bounds become click ranges (``[x>=0]`` in ``--help``, checked by the parser); open ones
(``0 <= x < 1``) are said in the help and checked when the command builds the config, with the same
error a Python call gets. No torch here: ``--help`` loads neither torch nor timm.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, Optional

import typer

from ..blocks.help import BLOCK_HELP  # no torch
from ..surgery.help import RECIPE_HELP  # no torch
from ..train.config import FIELDS, FinetuneConfig, bounds_text, cli_default, kind


def config_help(name: str, before: str = "", after: str = "") -> str:
    """Field ``name``'s help for a command: ``before`` (what it means there), the help, ``after``, and an open
    range in click's notation (``[0<=x<1]``; a closed one is a click range, which click shows itself)."""
    f = FIELDS[name]
    text = " ".join(part for part in (before, f.metadata["help"], after) if part)
    return f"{text}  [{bounds_text(f).replace(' ', '')}]" if _open(f) else text


def _open(f) -> bool:
    m = f.metadata
    return (m["low"] is not None and m["low_open"]) or (m["high"] is not None and m["high_open"])


def config_option(name: str, note: str = "") -> tuple[Any, Any]:
    """The annotation and typer option of :class:`FinetuneConfig` field ``name``; ``note``: what the field
    means in this command, added to the help (``With --data, of each run.``)."""
    f = FIELDS[name]
    m = f.metadata
    base, optional = kind(name)
    extra = {}
    if not _open(f) and base in (int, float):  # closed bounds: a click range (open ones: said in the help)
        extra = {k: m[b] for k, b in (("min", "low"), ("max", "high")) if m[b] is not None}
    annotation = Optional[base] if optional else base  # noqa: UP045 - a runtime type typer reads, not an annotation
    return annotation, typer.Option(cli_default(f), *m["flags"], help=config_help(name, note), **extra)


def finetune_options(
    fn: Callable | None = None, *, only: tuple[str, ...] | None = None, notes: dict[str, str] | None = None
):
    """Give a typer command the options of :class:`FinetuneConfig` (``only``: these of them; default every
    one; ``notes``: per option, what it means in this command): they are added to ``fn``'s signature
    (typer reads ``inspect.signature``) after its own parameters, and ``fn`` receives them as one keyword
    argument, ``config``: a :class:`FinetuneConfig` (the options it does not take at their defaults), built
    and checked before ``fn`` runs. Used bare (``@finetune_options``) or as ``@finetune_options(only=...)``."""
    if fn is None:
        return functools.partial(finetune_options, only=only, notes=notes)
    chosen = tuple(only or FIELDS)
    sig = inspect.signature(fn, eval_str=True)
    own = [p for p in sig.parameters.values() if p.name != "config"]
    clash = {p.name for p in own} & set(chosen)
    if clash:
        raise TypeError(f"{fn.__name__} defines fine-tune options of its own: {sorted(clash)}")
    added = []
    for name in chosen:
        annotation, option = config_option(name, (notes or {}).get(name, ""))
        added.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation))

    @functools.wraps(fn)
    def run(*args, **kwargs):
        config = FinetuneConfig(**{name: kwargs.pop(name) for name in chosen})
        return fn(*args, config=config, **kwargs)

    run.__signature__ = sig.replace(parameters=own + added)
    return run


RECIPE_HELP_ALL = {**RECIPE_HELP, **BLOCK_HELP}  # every recipe field's help and example
SHORT = {"position": "-p", "r": "-r"}  # the recipe options' short flags


def recipe_option(name: str) -> Any:
    """The typer option of recipe field ``name`` (``add-se``'s, and ``--at`` wherever it is taken), its help
    from the field (:class:`retrofit.Recipe`), as text the recipe's own validators check; unset (None) keeps
    the recipe's value. A block field also takes a per-stage map, a list field comma-separated items."""
    text, example = RECIPE_HELP_ALL[name]
    flag = f"--{name.replace('_', '-')}"
    if name == "bias":  # flags: per stage only in a YAML recipe
        return typer.Option(None, f"{flag}/--no-bias", help=text)
    if name == "allow_wide":
        return typer.Option(False, flag, help=text)
    if name in BLOCK_HELP:
        more = f" Per stage too: {example}."
    else:
        more = f" Comma-separated, e.g. {example}." if example else ""
    return typer.Option(None, flag, *([SHORT[name]] if name in SHORT else []), help=text + more)
