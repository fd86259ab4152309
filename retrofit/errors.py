"""The errors users see.

Every bad input (unknown model, malformed recipe, impossible position, unreadable file...) ends in a
:class:`RetrofitError` whose message is one line that says what went wrong and what to do. The CLI
prints that line and exits non-zero; Python callers can catch the class. A message that quotes what it
rejects (a value, a file's metadata, a path) quotes :func:`excerpt` of it: short, escaped, one line.
"""

import os
import reprlib

EXCERPT = 60  # characters of a quoted value in a message (a path: twice that)


class RetrofitError(Exception):
    """Bad input or an impossible request; ``str(err)`` is one line that says what to do."""


class RecipeError(RetrofitError, ValueError):
    """A recipe field (from YAML, the CLI or keyword arguments) has a bad name or value."""


class RetrofitWarning(UserWarning):
    """Something was adjusted for the user (e.g. a reduced width raised to the minimum)."""


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (at most ``limit`` characters, escaped), or its type's name."""
    text = str(err).strip()
    return _escaped(text.splitlines()[0][:limit]) if text else type(err).__name__


class _Short(reprlib.Repr):
    """``reprlib``'s bounded repr: a few items of each container, a few levels, long texts cut; its cost
    bounded by what it shows, whatever the size or depth of the value (a list of millions, a mapping
    nested a thousand deep). A whole number too long for ``int.__repr__`` is named by its size."""

    def __init__(self, limit: int):
        super().__init__()
        self.maxlevel, self.maxlist, self.maxtuple, self.maxdict, self.maxset = 3, 6, 6, 4, 6
        self.maxfrozenset = self.maxdeque = self.maxarray = 6
        self.maxstring = self.maxother = self.maxlong = limit

    def repr_int(self, x, level):
        if x.bit_length() > 4 * self.maxlong:  # more digits than shown: never converted (Python's 4300-digit limit)
            return f"<a whole number of about {int(x.bit_length() * 0.30103):,} digits>"
        return super().repr_int(x, level)


def excerpt(value: object, limit: int | None = None, *, bare: bool = False) -> str:
    r"""A short, escaped, one-line excerpt of ``value`` for a message that rejects it.

    Text is cut to at most ``limit`` characters (its start and end kept, ``...`` between), every
    character that is not printable (a newline, a terminal escape) escaped, and put in quotes; any
    other value is a bounded ``repr`` (:class:`_Short`: ``[1, 1, 1, 1, 1, 1, ...]``). ``bare`` text,
    and a path (an ``os.PathLike``: ``bare`` always), is shown without quotes and up to twice as long.
    Whatever ``value`` is, the cost and the length of the excerpt are bounded by ``limit`` (default
    :data:`EXCERPT`), so a message never repeats a value of millions of items or characters.

    >>> from pathlib import Path
    >>> excerpt("layer3.*"), excerpt([1] * 2_000_000), excerpt(Path("a\nb.yaml"))
    ("'layer3.*'", '[1, 1, 1, 1, 1, 1, ...]', 'a\\nb.yaml')
    """
    if isinstance(value, os.PathLike):
        value, bare = os.fspath(value), True
    limit = limit or (2 * EXCERPT if bare else EXCERPT)
    if isinstance(value, bytes):
        value = value[: 4 * limit].decode("utf-8", "replace")
    if isinstance(value, str):
        text = (
            _escaped(value)
            if len(value) <= limit
            else _escaped(value[: limit // 2]) + "..." + _escaped(value[-(limit - limit // 2 - 3) :])
        )
        return text if bare else f"'{text}'"
    try:
        text = _escaped(_Short(limit).repr(value))
    except Exception:  # noqa: BLE001 - a value whose own repr fails is still named
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _escaped(text: str) -> str:
    """``text`` with each non-printable character escaped as Python writes it (``\\n``, ``\\x1b``)."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
