"""The user's files, read within bounds: a path that must be a regular file, and JSON and YAML of bounded
size, depth and number of nodes.

Everything retrofit reads from a user's file passes through here: recipe and ``--space`` YAML, the JSON
in a retrofit file's metadata (:mod:`retrofit.files.header`), the weight files given by path. Whatever a
file holds, reading it costs bounded time and memory, and a file that breaks a bound is one error line:

* a path is opened without blocking and checked to be a regular file first, so a directory, a FIFO, a
  device (a link to ``/dev/zero``) or a symlink loop is named as what it is, never read (a FIFO would
  wait for a writer forever, ``/dev/zero`` never ends);
* a file is read up to a byte bound, and JSON and YAML are parsed only up to :data:`MAX_DEPTH` levels
  of nesting, checked before anything recurses (CPython's JSON decoder and PyYAML's composer recurse
  once per level: 100,000 levels ended in ``RecursionError``);
* YAML aliases (``*name``) are refused and a document holds at most :data:`MAX_NODES` nodes, counted
  as they are composed: a 300-byte "billion laughs" document of nine levels of aliases would expand
  to 10^9 nodes.

No torch here: the command line reads its inputs before importing it.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from pathlib import Path
from typing import Any

import yaml

from .errors import RetrofitError, excerpt, first_line

MAX_DEPTH = 32  # levels of nesting; a recipe's deepest value (overrides: a list of maps of lists) has 4
MAX_NODES = 100_000  # values in one YAML document: a recipe has tens, an `only:` list of every module a few thousand
YAML_BYTES = 1 << 20  # a recipe or space file is a few hundred bytes; one listing every module of a large model ~100 KB

_KINDS = (
    (stat.S_ISDIR, "is a directory"),
    (stat.S_ISFIFO, "is not a regular file (a FIFO)"),
    (stat.S_ISCHR, "is not a regular file (a character device)"),
    (stat.S_ISBLK, "is not a regular file (a block device)"),
    (stat.S_ISSOCK, "is not a regular file (a socket)"),
)


def open_regular(path: str | Path, what: str, error: type[RetrofitError] = RetrofitError) -> int:
    """A file descriptor of ``path``, opened for reading without blocking and checked to be a regular file.

    Raises ``error`` (one line, ``"{what} {path} {why}"``) for a path that is missing, a directory,
    a FIFO, a device or a socket (also through a symbolic link), a symlink loop, or unreadable."""
    try:
        fd = os.open(Path(path).expanduser(), os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except OSError as err:
        raise error(f"{what} {excerpt(path, bare=True)} {_why(err)}") from None
    mode = os.fstat(fd).st_mode
    for test, why in _KINDS:
        if test(mode):
            os.close(fd)
            raise error(f"{what} {excerpt(path, bare=True)} {why}")
    os.set_blocking(fd, True)
    return fd


def regular_file(path: str | Path, what: str, error: type[RetrofitError] = RetrofitError) -> Path:
    """``path`` (``~`` expanded) after :func:`open_regular` found a regular file there: for a file that a
    library opens by its name (safetensors, ``torch.load``, timm)."""
    os.close(open_regular(path, what, error))
    return Path(path).expanduser()


def read_text(path: str | Path, what: str, limit: int = YAML_BYTES, error: type[RetrofitError] = RetrofitError) -> str:
    """The text of the regular file ``path``, at most ``limit`` bytes (a larger file is refused unread)."""
    with os.fdopen(open_regular(path, what, error), "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise error(f"{what} {excerpt(path, bare=True)} is larger than {limit:,} bytes; is it the right file?")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise error(f"{what} {excerpt(path, bare=True)} is not UTF-8 text (byte {err.start:,})") from None


def _why(err: OSError) -> str:
    if err.errno in (errno.ENOENT, errno.ENOTDIR):
        return "not found"
    if err.errno == errno.ELOOP:
        return "is a symlink loop (a link that leads back to itself)"
    return f"cannot be opened ({err.strerror or type(err).__name__})"


# -- JSON ---------------------------------------------------------------------------------------
_JSON_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)  # a string, or a bracket


def load_json(text: str, max_depth: int = MAX_DEPTH, **options: Any) -> Any:
    """``json.loads(text, **options)`` once its nesting is known to be at most ``max_depth`` levels (counted
    over the text's brackets outside strings, no recursion); a ``ValueError`` naming the problem if not,
    or if it is no valid JSON (its message is one short line)."""
    depth = 0
    for token in _JSON_TOKENS.finditer(text):
        bracket = token.group()
        if bracket in "[{":
            depth += 1
            if depth > max_depth:
                raise ValueError(f"nested more than {max_depth} levels deep")
        elif bracket in "]}":
            depth -= 1
    try:
        return json.loads(text, **options)
    except RecursionError:  # not reached after the count above; kept as one line all the same
        raise ValueError(f"nested more than {max_depth} levels deep") from None
    except ValueError as err:  # JSONDecodeError, or a number of more digits than Python converts
        raise ValueError(f"not valid JSON ({first_line(err)[:80]})") from None


# -- YAML ---------------------------------------------------------------------------------------
class OverBound(yaml.YAMLError):
    """A YAML document that breaks a bound of :class:`BoundedLoader`: ``problem`` at ``mark``."""

    def __init__(self, problem: str, mark):
        super().__init__(problem)
        self.problem, self.problem_mark = problem, mark


class BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader (plain data, no Python objects), refusing aliases and composing at most
    :data:`MAX_DEPTH` levels and :data:`MAX_NODES` nodes, each checked before the node is composed."""

    def __init__(self, stream):
        super().__init__(stream)
        self.depth = self.nodes = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise OverBound(
                f"uses an alias (*{excerpt(event.anchor, 40, bare=True)}); aliases are not allowed, "
                f"write the value out",
                event.start_mark,
            )
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise OverBound(f"holds more than {MAX_NODES:,} values", event.start_mark)
        if self.depth >= MAX_DEPTH and isinstance(event, yaml.CollectionStartEvent):  # a level: a list or a mapping
            raise OverBound(f"is nested more than {MAX_DEPTH} levels deep", event.start_mark)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def load_yaml(text: str) -> Any:
    """The one YAML document in ``text``, read by :class:`BoundedLoader`; a ``ValueError`` naming the
    problem and its line if it is not valid YAML or breaks a bound."""
    loader = BoundedLoader(text)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"at line {mark.line + 1}" if mark is not None else ""
        if isinstance(err, OverBound):
            first, _, rest = err.problem.partition(";")
            raise ValueError(" ".join(filter(None, (first, where))) + (f";{rest}" if rest else "")) from None
        raise ValueError(" ".join(filter(None, ("not valid YAML", where)))) from None
    except RecursionError:  # a constructor recursing on a key's nesting; the composer's bound comes first
        raise ValueError(f"is nested more than {MAX_DEPTH} levels deep") from None
    finally:
        loader.dispose()


def read_yaml(path: str | Path, what: str, error: type[RetrofitError] = RetrofitError) -> Any:
    """The YAML document of the file ``path`` (:func:`read_text`, :func:`load_yaml`); every problem one
    ``error`` line naming ``what`` and the path."""
    text = read_text(path, what, YAML_BYTES, error)
    try:
        return load_yaml(text)
    except ValueError as err:
        raise error(f"{what} {excerpt(path, bare=True)}: {err}{'' if ';' in str(err) else '; fix the file'}") from None
