"""The two references of the site that are generated, never written by hand.

* ``facade-api``: one autodoc entry per public name of the facade, read from ``retrofit._API`` (the lazy
  mapping ``retrofit/__init__.py`` resolves names by), grouped by the layer that defines it. A new public
  name appears in the reference with no edit to the docs; tests/test_docs.py checks each one is there.
* references to the package's own objects that the site does not document
  (``:func:`retrofit.graph.model.own_input_size```, a signature's ``StageMap``): the public ones are
  linked to their entry, whatever path they were written with; the others are shown as code, once
  checked to exist. A reference to something that does not exist stays an error of the strict build.
* the command-line reference: each command's ``--help``, as typer prints it, put into
  ``reference/cli.md`` where its ``{typer-help}`` line stands.

sphinx-click cannot read this app: typer 0.29 carries its own copy of click (``typer._click``), whose
command classes are not click's, and sphinx-click's checks refuse them ("... is not click.Command or
click.Group"). The help text of each command is the reference instead: exactly what users see.
"""

from __future__ import annotations

import importlib
import inspect

import typer.main
from docutils import nodes
from docutils.statemachine import StringList
from sphinx import addnodes
from sphinx.pycode import ModuleAnalyzer
from sphinx.util.docutils import SphinxDirective

import retrofit
from retrofit.cli import app

HELP_WIDTH = 80  # the width the help is wrapped at: a code block of the page shows 80 columns unscrolled

# the layer (first part of the defining module's path) -> its heading, in the order of the facade's list
LAYERS = {
    "surgery": "Retrofitting a model",
    "blocks": "Blocks",
    "measure": "Measuring",
    "files": "Saving and loading",
    "train": "Fine-tuning",
    "sweep": "Sweeps and the recipe search",
    "events": "Progress events",
    "errors": "Errors and warnings",
}


def autodoc_directive(name: str, module: str) -> list[str]:
    """The autodoc directive for ``retrofit.<name>``, by what the name is."""
    obj = getattr(importlib.import_module(f"retrofit.{module}"), name)
    if inspect.isclass(obj) and issubclass(obj, BaseException):
        kind, options = "autoexception", [":show-inheritance:"]
    elif inspect.isclass(obj):
        kind, options = "autoclass", [":members:"]
    elif callable(obj):
        kind, options = "autofunction", []
    else:  # a registry (POSITIONS, ATTENTIONS): its value is filled at import, and long
        return data_directive(name, module)
    return [f".. {kind}:: retrofit.{name}", *(f"   {option}" for option in options)]


def data_directive(name: str, module: str) -> list[str]:
    """A module-level value: its ``#:`` comment where it is defined (autodoc would look for one in the
    facade, which has none, and show the docstring of the value's type: ``dict``'s)."""
    comment = ModuleAnalyzer.for_module(f"retrofit.{module}").find_attr_docs().get(("", name))
    if not comment:
        raise ValueError(f"retrofit.{module}.{name} has no '#:' comment to document it by")
    annotation = ModuleAnalyzer.for_module(f"retrofit.{module}").annotations.get(("", name))
    return [
        f".. py:data:: retrofit.{name}",
        *([f"   :type: {annotation}"] if annotation else []),
        "",
        *(f"   {line}" for line in comment),
    ]


class FacadeApi(SphinxDirective):
    """``facade-api``: the autodoc entries of every name in ``retrofit._API``. Used inside MyST's
    ``{eval-rst}`` (autodoc writes reStructuredText, and the docstrings are reStructuredText too)."""

    def run(self) -> list[nodes.Node]:
        by_layer: dict[str, list[tuple[str, str]]] = {}
        for name, module in retrofit._API.items():
            by_layer.setdefault(module.split(".")[0], []).append((name, module))
        unknown = set(by_layer) - set(LAYERS)
        if unknown:
            raise self.error(f"facade-api: no heading for the layer(s) {sorted(unknown)}: add them to LAYERS")
        lines: list[str] = []
        for layer, heading in LAYERS.items():
            if layer not in by_layer:
                continue
            lines += [f".. rubric:: {heading}", ""]
            for name, module in by_layer[layer]:
                lines += [*autodoc_directive(name, module), ""]
        container = nodes.container()
        self.state.nested_parse(StringList(lines, source="retrofit._API"), self.content_offset, container)
        return container.children


def find(path: str) -> tuple[bool, object]:
    """``(True, obj)`` for the object at dotted ``path`` (a module, or attributes of one), else ``(False, None)``."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False, None
        return True, obj
    return False, None


def documented_module(node: nodes.Element) -> str | None:
    """The module whose docstring ``node`` comes from: named in its source ("docstring of
    retrofit.files.checkpoint.save"), or, where napoleon's fields lost that, the module defining the API
    entry the node sits in."""
    where = (node.source or "").rpartition("docstring of ")[2]
    entry = node.parent
    while not where and entry is not None:
        if isinstance(entry, addnodes.desc) and entry.children:
            signature = entry.children[0]
            full = ".".join(filter(None, (signature.get("module"), signature.get("fullname"))))
            name = full.removeprefix("retrofit.").partition(".")[0]
            where = f"retrofit.{retrofit._API[name]}" if name in retrofit._API else ""
            break
        entry = entry.parent
    while where:
        found, obj = find(where)
        if found and inspect.ismodule(obj):
            return where
        where = where.rpartition(".")[0]
    return None


def resolve_own(app, env, node: nodes.Element, contnode: nodes.Element) -> nodes.Element | None:
    """``missing-reference``: a reference to one of retrofit's objects (see the module docstring)."""
    target = node.get("reftarget", "")
    if node.get("refdomain") != "py":
        return None
    module = documented_module(node)
    path = target if target.startswith("retrofit.") else f"{module}.{target}" if module else None
    if path is None:
        return None
    found, obj = find(path)
    if not found:
        return None
    name = path.rpartition(".")[2]
    if name in retrofit._API and getattr(retrofit, name) is obj:  # public: the entry of the API page
        py = env.domains.python_domain
        return py.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], f"retrofit.{name}", node, contnode)
    return contnode


def command_help() -> str:
    """Markdown: a section per command of ``retrofit``, holding its ``--help`` as printed."""
    group = typer.main.get_command(app)
    root = group.make_context(
        "retrofit", [], resilient_parsing=True, terminal_width=HELP_WIDTH, max_content_width=HELP_WIDTH
    )
    parts = [f"## retrofit\n\n```text\n{group.get_help(root)}\n```\n"]
    for name in group.list_commands(root):
        command = group.get_command(root, name)
        ctx = command.make_context(name, [], parent=root, resilient_parsing=True)
        parts.append(f"## retrofit {name}\n\n```text\n{command.get_help(ctx)}\n```\n")
    return "\n".join(parts)


def insert_command_help(app, docname: str, source: list[str]) -> None:
    if "{typer-help}" in source[0]:
        source[0] = source[0].replace("{typer-help}", command_help())


def setup(app):
    app.add_directive("facade-api", FacadeApi)
    app.connect("source-read", insert_command_help)
    app.connect("missing-reference", resolve_own)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
