"""The errors users see.

Every bad input (unknown model, malformed recipe, impossible position, unreadable file...) ends in a
:class:`RetrofitError` whose message is one line that says what went wrong and what to do. The CLI
prints that line and exits non-zero; Python callers can catch the class.
"""


class RetrofitError(Exception):
    """Bad input or an impossible request; ``str(err)`` is one line that says what to do."""


class RecipeError(RetrofitError, ValueError):
    """A recipe field (from YAML, the CLI or keyword arguments) has a bad name or value."""


class RetrofitWarning(UserWarning):
    """Something was adjusted for the user (e.g. a reduced width raised to the minimum)."""


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (at most ``limit`` characters), or its type's name."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__
