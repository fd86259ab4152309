"""`retrofit recipes`: list the built-in recipes."""

from __future__ import annotations

from rich.table import Table

from .common import app, console, fail_cleanly


@app.command("recipes", short_help="List the built-in recipes.")
@fail_cleanly
def recipes_command():
    """List the built-in recipes."""
    # deferred: torch and timm load when a command runs, not for --help
    from ..surgery.recipe import Recipe, builtin_recipes

    table = Table(title="Built-in recipes (use by name: --recipe NAME)", title_justify="left")
    table.add_column("name")
    table.add_column("what it does")
    table.add_column("fields")
    for name, path in builtin_recipes().items():
        first = next((ln.lstrip("# ").strip() for ln in path.read_text().splitlines() if ln.startswith("#")), "")
        table.add_row(name, first, Recipe.load(name).describe())
    console().print(table)
