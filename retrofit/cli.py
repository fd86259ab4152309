"""The ``retrofit`` command line (typer + rich).

Every command turns bad input into one red line and a non-zero exit (see :mod:`retrofit.errors`).
Recipe options are taken as text and checked by the recipe's own validators, so ``--r abc`` is
reported like ``r: abc`` in a YAML file: naming the field and the allowed values.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

from .errors import RetrofitError

app = typer.Typer(
    name="retrofit", add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Add Squeeze-and-Excitation blocks to a trained network, keeping its weights, and report the overhead.",
)


def _console(stderr: bool = False) -> Console:
    """A console for this print: it follows a redirected ``sys.stdout``, and output to a file or pipe
    gets a wide fixed width instead of rich's 80 columns, so no number in a table is cut."""
    stream = sys.stderr if stderr else sys.stdout
    tty = stream.isatty()
    return Console(stderr=stderr, highlight=False, width=None if tty else 200, soft_wrap=not tty)


def _fail_cleanly(fn):
    """One clear line and a non-zero exit for bad input; never a traceback (RETROFIT_DEBUG=1 shows it)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = fn(*args, **kwargs)
            for w in caught:
                if issubclass(w.category, UserWarning) and "retrofit" in str(w.category.__module__):
                    _console(stderr=True).print(f"[yellow]warning:[/] {w.message}")
            return result
        except RetrofitError as e:
            _console(stderr=True).print(f"[red]error:[/] {e}", soft_wrap=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            _console(stderr=True).print("[red]interrupted[/]")
            raise typer.Exit(130)
        except Exception as e:  # a bug: still one line, with a way to see more
            if os.environ.get("RETROFIT_DEBUG"):
                raise
            _console(stderr=True).print(f"[red]internal error:[/] {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''} "
                      f"(rerun with RETROFIT_DEBUG=1 for the traceback and report it)", soft_wrap=True)
            raise typer.Exit(3)
    return run


def _model(name: str, checkpoint: Optional[Path], pretrained: bool, num_classes: Optional[str]):
    from .models import create_model

    kwargs: dict[str, Any] = {}
    if num_classes is not None:
        if not num_classes.strip().isdigit():
            raise RetrofitError(f"--num-classes must be a whole number, got {num_classes!r}")
        kwargs["num_classes"] = int(num_classes)
    return create_model(name, checkpoint=checkpoint, pretrained=pretrained, **kwargs)


def _json_target(path: Optional[str]) -> Optional[Path]:
    if path is None or path == "-":
        return None
    from .checkpoint import check_writable

    target = Path(path).expanduser()
    check_writable(target)
    return target


def _write_json(data: dict, path: Optional[str]) -> None:
    text = json.dumps(data, indent=2)
    if path == "-":
        sys.stdout.write(text + "\n")
    elif path is not None:
        target = Path(path).expanduser()
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(text + "\n")
            os.replace(tmp, target)
        except OSError as e:
            raise RetrofitError(f"cannot write {target}: {e.strerror or e}") from None
        finally:
            tmp.unlink(missing_ok=True)


def _print_skipped(skipped) -> None:
    if not skipped:
        return
    for reason, n in Counter(s.reason for s in skipped).most_common():
        _console().print(f"[dim]skipped {n} candidate(s): {reason}[/]")


CHECKPOINT = typer.Option(None, "--checkpoint", help="Local weights (.safetensors, .pth) loaded through timm.")
PRETRAINED = typer.Option(False, "--pretrained", help="Download timm's weights (needs network access).")
NUM_CLASSES = typer.Option(None, "--num-classes", help="Classifier size (a new head when it differs).")
INPUT_SIZE = typer.Option(None, "--input-size", help="C,H,W to trace with (default: the model's own).")


@app.command("add-se")
@_fail_cleanly
def add_se_command(
    model: str = typer.Argument(..., help="A timm model name, e.g. resnet101."),
    recipe: Optional[str] = typer.Option(None, "--recipe", "-R", help="Built-in recipe name or YAML file (default: standard)."),
    position: Optional[str] = typer.Option(None, "--position", "-p", help="standard | pre | post | identity | inside."),
    r: Optional[str] = typer.Option(None, "--r", "-r", help="Reduction ratio r (recipe default 16)."),
    squeeze: Optional[str] = typer.Option(None, "--squeeze", help="avg | max."),
    gate: Optional[str] = typer.Option(None, "--gate", help="sigmoid | hard_sigmoid | tanh | relu."),
    stages: Optional[str] = typer.Option(None, "--stages", help="Stages to retrofit, e.g. 3,4 or all (stage = log2 output stride)."),
    divisor: Optional[str] = typer.Option(None, "--divisor", help="Round the reduced width to a multiple of this."),
    min_width: Optional[str] = typer.Option(None, "--min-width", help="Smallest reduced width."),
    bias: Optional[bool] = typer.Option(None, "--bias/--no-bias", help="Biases on the block's two 1x1 convs."),
    init: Optional[str] = typer.Option(None, "--init", help="preserve (start as identity) | paper (random)."),
    input_size: Optional[str] = INPUT_SIZE,
    checkpoint: Optional[Path] = CHECKPOINT,
    pretrained: bool = PRETRAINED,
    num_classes: Optional[str] = NUM_CLASSES,
    json_path: Optional[str] = typer.Option(None, "--json", help="Write the numbers as JSON to FILE (- for stdout)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Save the retrofitted model (.safetensors) for retrofit.load."),
):
    """Insert SE blocks by a recipe and report the sites and the overhead."""
    from .checkpoint import check_writable, save
    from .insert import model_name, paused_gc, retrofit_scanned
    from .measure import compare, cost, traced_cost
    from .models import resolve_input_size
    from .recipe import resolve_recipe
    from .report import blocks_table, overhead_table, sites_by_stage, sites_json
    from .sites import scan

    chosen = resolve_recipe(recipe, position=position, r=r, squeeze=squeeze, gate=gate, stages=stages,
                            divisor=divisor, min_width=min_width, bias=bias, init=init)
    _json_target(json_path)
    if output is not None:
        output = output.expanduser()
        check_writable(output)
        if checkpoint is not None and output.resolve() == Path(checkpoint).expanduser().resolve():
            raise RetrofitError(f"--output {output} is the input checkpoint; input weights are never "
                                f"overwritten, choose another file")
    net = _model(model, checkpoint, pretrained, num_classes)
    size = resolve_input_size(net, input_size)
    with paused_gc():
        found = scan(net, size, macs=True)
        base = traced_cost(found.traced, found.macs)  # measured before the surgery changes `net`
        info = retrofit_scanned(found, net, chosen)  # in place: the CLI owns this model
        report = compare(base, cost(net, size))
    data = {"model": model_name(net), "recipe": chosen.to_dict(), "sites": sites_json(found),
            **report.to_dict(), "skipped": [{"where": s.where, "reason": s.reason} for s in info.skipped]}
    if json_path != "-":
        _console().print(f"[bold]{model_name(net)}[/]: {found.summary()} sites at input {'x'.join(map(str, size))}; "
                  f"recipe: {chosen.describe()}")
        _console().print(sites_by_stage(found))
        _console().print(blocks_table(report))
        _console().print(overhead_table(report))
        _print_skipped(info.skipped)
    _write_json(data, json_path)
    if output is not None:
        save(net, output)
        if json_path != "-":
            _console().print(f"saved {output} (load with retrofit.load)")


@app.command("sites")
@_fail_cleanly
def sites_command(
    model: str = typer.Argument(..., help="A timm model name, e.g. resnet50."),
    input_size: Optional[str] = INPUT_SIZE,
    num_classes: Optional[str] = NUM_CLASSES,
    json_path: Optional[str] = typer.Option(None, "--json", help="Write the sites as JSON to FILE (- for stdout)."),
):
    """List the sites the pass finds: residual merges, Inception merges, 3x3 convs in residual branches."""
    from .models import resolve_input_size
    from .report import sites_by_stage, sites_json, sites_table
    from .sites import scan

    _json_target(json_path)
    net = _model(model, None, False, num_classes)
    found = scan(net, resolve_input_size(net, input_size))
    if json_path != "-":
        _console().print(sites_table(found))
        _console().print(sites_by_stage(found))
        _print_skipped(found.skipped)
    _write_json(sites_json(found), json_path)


@app.command("recipes")
@_fail_cleanly
def recipes_command():
    """List the built-in recipes."""
    from rich.table import Table

    from .recipe import Recipe, builtin_recipes

    table = Table(title="Built-in recipes (use by name: --recipe NAME)", title_justify="left")
    table.add_column("name")
    table.add_column("what it does")
    table.add_column("fields")
    for name, path in builtin_recipes().items():
        first = next((ln.lstrip("# ").strip() for ln in path.read_text().splitlines() if ln.startswith("#")), "")
        table.add_row(name, first, Recipe.load(name).describe())
    _console().print(table)


def main() -> None:
    """Entry point: usage errors (a missing argument, an unknown option) are one line too."""
    try:
        code = app(standalone_mode=False, prog_name="retrofit")
    except typer.TyperException as e:  # the base of typer's usage errors
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `retrofit`: the help was shown
            sys.exit(0)
        ctx = getattr(e, "ctx", None)
        hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
        _console(stderr=True).print(f"[red]error:[/] {e.format_message()}{hint}", soft_wrap=True)
        sys.exit(getattr(e, "exit_code", 2))
    except typer.Abort:
        _console(stderr=True).print("[red]interrupted[/]")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
