"""``python -m retrofit`` and the ``retrofit`` script (pyproject: ``retrofit = "retrofit.__main__:run"``)."""

import sys


def run() -> None:
    """The command line. A Ctrl-C while it is still loading (typer, rich, the commands) is ``interrupted``
    and exit 130 too, as in a command, not a traceback out of the import system."""
    try:
        from .cli import main  # deferred: inside the try, so a Ctrl-C during the import is caught
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    main()


if __name__ == "__main__":
    run()
