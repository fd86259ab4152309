"""`retrofit sites`: list the sites the pass finds."""

from __future__ import annotations

import typer

from .common import AT, INPUT_SIZE, NUM_CLASSES, app, console, fail_cleanly, json_target, print_skipped, say, write_json


@app.command("sites", short_help="List the sites the pass finds in a model.")
@fail_cleanly
def sites_command(
    model: str = typer.Argument(..., help="A timm model name, e.g. resnet50."),
    at: str | None = AT,
    input_size: str | None = INPUT_SIZE,
    num_classes: str | None = NUM_CLASSES,
    json_path: str | None = typer.Option(None, "--json", help="Write the sites as JSON to FILE (- for stdout)."),
):
    """List the sites the pass finds: residual merges, Inception merges, 3x3 convs in residual branches,
    feature-pyramid merges (and, with --at, the outputs of the modules named); modules whose forward is
    kept as is, and what was skipped, with why."""
    # deferred: torch and timm load when a command runs, not for --help
    from ..files.create import build_named
    from ..graph.model import model_name, resolve_input_size
    from ..measure.report import sites_by_stage, sites_json, sites_table
    from ..surgery.named import named_sites
    from ..surgery.recipe import Recipe
    from ..surgery.sites import scan

    globs = Recipe(at=at).at  # checked like the recipe field
    json_target(json_path)
    net = build_named(model, num_classes=num_classes)
    found = scan(net, resolve_input_size(net, input_size))
    named = named_sites(found.traced, globs, model_name(net)) if globs else []
    if json_path != "-":
        console().print(sites_table(found, named))
        console().print(sites_by_stage(found, named))
        print_skipped(found.skipped, found.traced.opaque)
        if found.pyramid_note():
            say((found.pyramid_note(), "dim"))
    write_json(sites_json(found, named), json_path)
