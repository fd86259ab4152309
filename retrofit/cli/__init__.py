"""The ``retrofit`` command line (typer + rich): one module per command, all on :data:`common.app`.

Every command turns bad input into one red line and a non-zero exit (see :mod:`retrofit.errors`).
Recipe options are taken as text and checked by the recipe's own validators, so ``--r abc`` is
reported like ``r: abc`` in a YAML file: naming the field and the allowed values.
"""

from __future__ import annotations

import importlib
import sys

import typer

from .common import app, say

COMMANDS = (
    "add_se",
    "sites",
    "recipes",
    "finetune",
    "inspect",
    "fold",
    "sweep",
    "check",
    "tune",
)  # one module each, registered on `app` when imported
for _command in COMMANDS:
    importlib.import_module(f".{_command}", __name__)

__all__ = ["app", "main"]


def main() -> None:
    """Entry point: usage errors (a missing argument, an unknown option) are one line too."""
    try:
        code = app(standalone_mode=False, prog_name="retrofit")
    except typer.TyperException as e:  # the base of typer's usage errors
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `retrofit`: the help was shown
            sys.exit(0)
        ctx = getattr(e, "ctx", None)
        hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
        say(("error:", "red"), f" {e.format_message()}{hint}", stderr=True)
        sys.exit(getattr(e, "exit_code", 2))
    except (typer.Abort, KeyboardInterrupt):  # a Ctrl-C while typer parses, before a command's own handler
        say(("interrupted", "red"), stderr=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
