"""The generated docs are up to date: docs/options.md is what tools/options_doc.py makes from the one
definition of each option (FinetuneConfig's and Recipe's fields), and what --help and the docstrings say
comes from the same fields (issue 23, item 3)."""
import sys
from pathlib import Path

import typer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import options_doc  # noqa: E402  (tools/options_doc.py)


def test_the_options_page_is_up_to_date():
    assert (ROOT / "docs" / "options.md").read_text() == options_doc.page(), \
        "docs/options.md is stale: run `python tools/options_doc.py`"


def test_recipe_help_is_written_once_and_shown_everywhere():
    import dataclasses

    import retrofit
    from retrofit.cli import app

    add_se = {p.name: p for p in typer.main.get_command(app).commands["add-se"].params}
    page = (ROOT / "docs" / "options.md").read_text()
    for f in dataclasses.fields(retrofit.Recipe):
        text = f.metadata["help"]
        assert text in page and f"{f.name}: {text[:60]}" in " ".join(retrofit.Recipe.__doc__.split()), f.name
        if f.name != "overrides":  # only in a YAML file
            assert add_se[f.name].help.startswith(text), f.name
    block = {f.name: f.metadata["help"] for f in dataclasses.fields(retrofit.blocks.config.BlockConfig)}
    assert all(retrofit.Recipe.__dataclass_fields__[name].metadata["help"] == text for name, text in block.items())
