"""What every command shares: the app, consoles, clean failures, model and JSON helpers, options.

Every command turns bad input into one red line and a non-zero exit (see :mod:`retrofit.errors`).
Recipe options are taken as text and checked by the recipe's own validators, so ``--r abc`` is
reported like ``r: abc`` in a YAML file: naming the field and the allowed values.

Everything is printed as text, never as rich markup: a message, a path or a module name holding
``[/x]`` or ``:smile:`` prints as it is (styles come from :class:`rich.text.Text`, see :func:`say`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.text import Text
from typer.core import TyperGroup

from ..errors import RetrofitError, first_line
from ..files.atomic import atomic_write, check_writable  # no torch: plain file writes
from .options import recipe_option

NB_HYPHEN = "\u2011"  # a non-breaking hyphen: textwrap does not break a word there


class HelpFormatter(typer.Context.formatter_class):
    """click's help formatter (public API: ``Context.formatter_class``), wrapping at spaces only.

    click wraps help with textwrap's ``break_on_hyphens``, which cut ``--input-size`` into ``--input-`` /
    ``size`` and ``[default: no-channels-last]`` at its hyphens. Each text is written with its hyphens
    made non-breaking (the same width), and they are plain hyphens again in the help printed."""

    def write_usage(self, prog: str, args: str = "", prefix: str | None = None) -> None:
        super().write_usage(prog, args.replace("-", NB_HYPHEN), prefix)

    def write_text(self, text: str) -> None:
        super().write_text(text.replace("-", NB_HYPHEN))

    def write_dl(self, rows, col_max: int = 30, col_spacing: int = 2) -> None:
        super().write_dl([(first, second.replace("-", NB_HYPHEN)) for first, second in rows], col_max, col_spacing)

    def getvalue(self) -> str:
        return super().getvalue().replace(NB_HYPHEN, "-")


class HelpContext(typer.Context):
    formatter_class = HelpFormatter


class Group(TyperGroup):
    """The app's click group: it and each of its commands format their help with :class:`HelpFormatter`."""

    context_class = HelpContext

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for command in self.commands.values():  # click's Command.context_class: the context make_context makes
            command.context_class = HelpContext


app = typer.Typer(
    name="retrofit",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    cls=Group,
    # click's plain help, wrapped to the terminal: typer's rich panels share 80 columns between 6 or 7
    # columns and cut the rest with an ellipsis, option names included (--backbone-lr-sc…)
    rich_markup_mode=None,
    help="Add Squeeze-and-Excitation blocks to a trained network, keeping its weights, and report the overhead.",
)


def console(stderr: bool = False) -> Console:
    """A console for this print: it follows a redirected ``sys.stdout``, and output to a file or pipe
    gets a wide fixed width instead of rich's 80 columns, so no number in a table is cut (an exported
    ``COLUMNS`` wins, as on a terminal). Markup and emoji codes are off: text prints as it is. Under
    torchrun only rank 0 speaks: N processes hitting the same bad input print one ``error:`` line."""
    stream = sys.stderr if stderr else sys.stdout
    tty = stream.isatty()
    quiet = os.environ.get("RANK", "0") != "0"
    fixed = not tty and not os.environ.get("COLUMNS", "").isdigit()
    return Console(
        stderr=stderr,
        highlight=False,
        markup=False,
        emoji=False,
        width=200 if fixed else None,
        soft_wrap=fixed,
        quiet=quiet,
    )


def say(*parts: str | tuple[str, str], stderr: bool = False) -> None:
    """Print one line of text; a ``(text, style)`` part is styled (``("error:", "red")``), no part is
    ever read as markup. Long lines are not wrapped, so a path is never broken.

    The line is rendered here and written to ``sys.stderr`` (``sys.stdout``) as text: while rich's live
    progress display runs in a terminal, that stream is its proxy, which prints the line above the bars.
    A console printing on its own would unwrap the proxy (rich's ``rich_proxied_file``) and write into
    the bars."""
    out = console(stderr=stderr)
    if out.quiet:
        return
    with out.capture() as captured:
        out.print(Text.assemble(*parts), soft_wrap=True)
    stream = sys.stderr if stderr else sys.stdout
    stream.write(captured.get())
    stream.flush()


@contextlib.contextmanager
def warnings_as_they_happen():
    """Each of retrofit's warnings printed as one ``warning:`` line on stderr when it is raised, others
    silenced. Before, a command's warnings were recorded and printed after it: below its results, and
    not at all when it then failed."""

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, UserWarning) and "retrofit" in str(category.__module__):
            say(("warning:", "yellow"), f" {message}", stderr=True)

    with warnings.catch_warnings():  # restores the filters and warnings.showwarning afterwards
        warnings.simplefilter("always")
        warnings.showwarning = show
        yield


@contextlib.contextmanager
def rounds_bar(label: str, quiet: bool = False):
    """A transient progress bar on stderr while something counts rounds (rank 0; none when ``quiet``);
    yields an ``on_event`` callback that moves it on each ``round`` event (:mod:`retrofit.events`)."""
    if quiet or os.environ.get("RANK", "0") != "0":
        yield None
        return
    with Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bars:
        task = bars.add_task(label, total=None)
        yield (
            lambda e: bars.update(task, completed=e.data["done"], total=e.data["total"]) if e.kind == "round" else None
        )


def fail_cleanly(fn):
    """One clear line and a non-zero exit for bad input; never a traceback (RETROFIT_DEBUG=1 shows it)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            with warnings_as_they_happen():
                return fn(*args, **kwargs)
        except RetrofitError as e:
            # one line: torch.fx's interpreter appends "While executing ..." lines to what passes through it
            say(("error:", "red"), f" {(str(e).strip().splitlines() or [''])[0]}", stderr=True)
            raise typer.Exit(2) from None  # said in one line: the exit carries no other error
        except KeyboardInterrupt:
            say(("interrupted", "red"), stderr=True)
            raise typer.Exit(130) from None
        except typer.Exit:  # a command's own exit, its message said
            raise
        except Exception as e:  # a bug: still one line, with a way to see more
            if os.environ.get("RETROFIT_DEBUG"):
                raise
            if isinstance(e.__context__, KeyboardInterrupt):  # a Ctrl-C inside an import surfaces as another error
                say(("interrupted", "red"), stderr=True)
                raise typer.Exit(130) from None
            say(
                ("internal error:", "red"),
                f" {type(e).__name__}: {first_line(e) if str(e).strip() else ''} "
                f"(rerun with RETROFIT_DEBUG=1 for the traceback and report it)",
                stderr=True,
            )
            raise typer.Exit(3) from None

    return run


def json_target(path: str | None) -> Path | None:
    if path is None or path == "-":
        return None
    target = Path(path).expanduser()
    check_writable(target)
    return target


def write_json(data: dict, path: str | None) -> None:
    text = json.dumps(data, indent=2)
    if path == "-":
        sys.stdout.write(text + "\n")
    elif path is not None:
        with atomic_write(Path(path).expanduser()) as tmp:
            tmp.write_text(text + "\n")


def plural(n: int, word: str) -> str:
    """``1 combination``, ``2 combinations``."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def print_skipped(skipped, kept=()) -> None:
    """The candidates passed over, one line per reason; first the modules whose forward is kept as
    is (``kept``: ``Traced.opaque``), one line each with its path."""
    for path, line in kept:
        say((f"kept as is: {path or '<model>'}: {line}", "dim"))
    said = {line for _, line in kept}
    for reason, n in Counter(s.reason for s in skipped if s.reason not in said).most_common():
        say((f"skipped {n} candidate(s): {reason}", "dim"))


CHECKPOINT = typer.Option(None, "--checkpoint", help="Local weights (.safetensors, .pth) loaded through timm.")
PRETRAINED = typer.Option(False, "--pretrained", help="Download timm's weights (needs network access).")
NUM_CLASSES = typer.Option(None, "--num-classes", help="Classifier size (a new head when it differs).")
INPUT_SIZE = typer.Option(None, "--input-size", help="C,H,W to trace with (default: the model's own).")
AT = recipe_option("at")
# reading a saved model: `finetune`, `inspect`, `fold`
SAVED = typer.Argument(
    ...,
    help="A retrofitted model saved by `retrofit add-se --output` (its folder, or a "
    ".safetensors file), or an adapter (with --base).",
)
BASE = typer.Option(
    None,
    "--base",
    help="When CHECKPOINT is an adapter: the base weights it was made on (plain "
    "weights, or a model saved by retrofit: a file or a folder).",
)
FORCE = typer.Option(
    False, "--force", help="Rebuild an adapter on a --base whose weights hash differs from its own base's."
)
IMAGES = typer.Option(
    None, "--images", min=1, help="Read an evenly spaced subset of this many val images (default: all)."
)


def globs(text: str | None) -> list[str] | None:
    """``'layer3.*, layer4.*'`` -> ``['layer3.*', 'layer4.*']``; None stays None."""
    return None if text is None else [g.strip() for g in text.split(",") if g.strip()]
