"""How the package's modules import each other: circles, imports inside functions, the layer graph.

    python tools/imports.py             # counts: modules, circles, imports inside functions
    python tools/imports.py --list      # ... and every import inside a function, with its comment
    python tools/imports.py --mermaid   # the layer graph as a mermaid diagram (docs/contributing/architecture.md)
    python tools/imports.py --root DIR  # the same for the package in DIR (e.g. an older checkout)

The import graph is grimp's (the library import-linter is built on; ``lint-imports`` checks the
contracts in pyproject.toml); the imports inside functions are read off the source with ``ast``,
which grimp does not tell apart from module-level ones. An import inside a function is *documented*
when a comment with the word "defer" stands on its line or on the line above its group of imports.
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import grimp

PACKAGE = "retrofit"
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class InnerImport:
    module: str  # the importing module
    line: int
    targets: tuple  # the package modules it imports (empty: a third-party or standard module)
    documented: bool
    text: str


def package_modules(root: Path = ROOT / PACKAGE) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def targets(module: str, path: Path, node: ast.AST, modules: dict[str, Path]) -> tuple[str, ...]:
    """The package modules an import statement of ``module`` imports (``retrofit``: the facade itself)."""
    if isinstance(node, ast.Import):
        return tuple(a.name for a in node.names if a.name.split(".")[0] == PACKAGE)
    base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    if node.level:
        base = base[: len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != PACKAGE:
        return ()
    return tuple(f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names)


def _documented(lines: list[str], node: ast.AST) -> bool:
    first, last = node.lineno - 1, (node.end_lineno or node.lineno) - 1
    if any("#" in lines[i] and "defer" in lines[i].split("#", 1)[1] for i in range(first, last + 1)):
        return True
    i = first - 1  # the comment above this import's group of imports
    while i >= 0 and lines[i].strip().startswith(("from ", "import ", ")")) or (i >= 0 and lines[i].strip() == ""):
        i -= 1
    above = lines[i].strip() if i >= 0 else ""
    return (above.startswith("#") or above.startswith("try:")) and "#" in above and "defer" in above.split("#", 1)[1]


def inner_imports(modules: dict[str, Path] | None = None) -> list[InnerImport]:
    """Every import statement inside a function of the package."""
    modules = modules or package_modules()
    found = []
    for module, path in modules.items():
        source = path.read_text()
        lines = source.splitlines()
        for fn in ast.walk(ast.parse(source)):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    found.append(
                        InnerImport(
                            module,
                            node.lineno,
                            targets(module, path, node, modules),
                            _documented(lines, node),
                            lines[node.lineno - 1].strip(),
                        )
                    )
    return sorted(set(found), key=lambda i: (i.module, i.line))


def circles(graph: grimp.ImportGraph | None = None) -> list[list[str]]:
    """The groups of modules that import each other in a circle (strongly connected components of
    more than one module), largest first. A package's ``__init__`` importing its own modules is not one."""
    graph = graph or grimp.build_graph(PACKAGE, exclude_type_checking_imports=True)
    modules = sorted(graph.modules)
    edges = {
        m: {
            t
            for t in graph.find_modules_directly_imported_by(m)
            if not m.startswith(f"{t}.") and not t.startswith(f"{m}.")
        }
        for m in modules
    }
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's algorithm, iterative over the stack of a recursion-free walk
        work = [(v, iter(sorted(edges[v])))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        group.append(w)
                        if w == node:
                            break
                    if len(group) > 1:
                        out.append(sorted(group))
            elif nxt not in index:
                index[nxt] = low[nxt] = counter[0]
                counter[0] += 1
                stack.append(nxt)
                on.add(nxt)
                work.append((nxt, iter(sorted(edges[nxt]))))
            elif nxt in on:
                low[node] = min(low[node], index[nxt])

    for m in modules:
        if m not in index:
            visit(m)
    return sorted(out, key=len, reverse=True)


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "(facade)"


def mermaid(graph: grimp.ImportGraph | None = None) -> str:
    """The layers, top first, and an arrow for each pair of layers with imports between them, labelled with
    the number of module-to-module imports (``errors`` and ``events``, the bottom layer every layer may import,
    left out)."""
    graph = graph or grimp.build_graph(PACKAGE, exclude_type_checking_imports=True)
    counts: dict[tuple[str, str], int] = {}
    for m in graph.modules:
        for t in graph.find_modules_directly_imported_by(m):
            a, b = layer_of(m), layer_of(t)
            if a != b and "(facade)" not in (a, b) and "__main__" not in (a, b) and not {"errors", "events"} & {a, b}:
                counts[(a, b)] = counts.get((a, b), 0) + 1
    order = ["cli", "sweep", "train", "files", "measure", "surgery", "graph", "blocks", "inputs"]
    lines = ["flowchart TD"]
    for (a, b), n in sorted(counts.items(), key=lambda kv: (order.index(kv[0][0]), order.index(kv[0][1]))):
        lines.append(f"    {a} -->|{n}| {b}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="list every import inside a function")
    parser.add_argument("--mermaid", action="store_true", help="print the layer graph as mermaid")
    parser.add_argument("--root", type=Path, default=ROOT, help="the folder holding the package")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(args.root.resolve()))
    graph = grimp.build_graph(PACKAGE, exclude_type_checking_imports=True)
    if args.mermaid:
        print(mermaid(graph))
        return 0
    inner = inner_imports(package_modules(args.root.resolve() / PACKAGE))
    own = [i for i in inner if i.targets]
    groups = circles(graph)
    print(f"modules: {len(graph.modules)}")
    print(f"circles: {len(groups)}" + "".join(f"\n  {len(g)}: {' '.join(g)}" for g in groups))
    print(
        f"imports inside functions: {len(inner)}, of package modules: {len(own)}, "
        f"documented deferrals: {sum(i.documented for i in inner)}, undocumented: "
        f"{sum(not i.documented for i in inner)}"
    )
    if args.list:
        for i in inner:
            print(f"  {'ok  ' if i.documented else 'BARE'} {i.module}:{i.line}  {i.text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
