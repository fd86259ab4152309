"""Sphinx configuration of retrofit's documentation site.

Build it (the suite does, in tests/test_docs.py, with these same options)::

    .venv/bin/sphinx-build -W --keep-going -n docs docs/_build/html

The pages are Markdown (myst-parser); the Python API reference is made by autodoc from the facade's own
list of public names (``retrofit._API``, through the ``facade-api`` directive of ``_ext/retrofit_docs.py``) and
the command-line reference from the typer app's own ``--help`` of each command: neither is written by hand.
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "_ext"))

project = "retrofit"
author = "the retrofit developers"
copyright = "the retrofit developers, Apache-2.0"
release = metadata.version("retrofit")

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "retrofit_docs"]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3  # [text](page.md#a-heading) links resolve to the heading's anchor

html_theme = "furo"
html_title = f"retrofit {release}"

# autodoc: the signature as written (no type hints repeated in the description), members in source order
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
# the defaults as values: preserve_defaults re-reads them from the source def, which retrofit.finetune
# (its signature made from FinetuneConfig's fields, train/finetune.py) does not spell out
autodoc_preserve_defaults = False
autodoc_inherit_docstrings = False  # an nn.Module subclass would show torch's forward() docstring
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# Nitpicky (-n) checks every cross-reference. The site is built offline (no intersphinx inventories can
# be fetched), so references into the standard library and the dependencies cannot resolve: they are
# named here, by package, instead of being links. A reference into retrofit itself that does not
# resolve still fails the build.
_EXTERNAL = "|".join(
    [
        "torch",
        "timm",
        "numpy",
        "optuna",
        "PIL",
        "yaml",
        "safetensors",
        "click",
        "typer",
        "rich",  # dependencies
        "typing",
        "typing_extensions",
        "collections",
        "pathlib",
        "os",
        "io",
        "enum",
        "contextlib",
        "dataclasses",
        "concurrent",
        "threading",
        "types",
        "abc",
        "argparse",
        "datetime",
        "fnmatch",
        "json",
        "logging",
        "re",
        "signal",
        "socket",
        "subprocess",
        "warnings",
        "functools",
        "itertools",
        "builtins",  # the standard library
    ]
)
nitpick_ignore_regex = [(r"py:.*", rf"({_EXTERNAL})(\..*)?")]


def setup(app):
    # docs/contributing/architecture.md draws the layer graph as a ```mermaid block (GitHub renders it);
    # Pygments has no mermaid lexer, and a JavaScript renderer would need a CDN the offline site cannot
    # reach: the diagram's source is shown as plain text.
    from pygments.lexers.special import TextLexer

    app.add_lexer("mermaid", TextLexer)
