"""`retrofit sites`: list the sites the pass finds."""
from __future__ import annotations

from typing import Optional

import typer

from .common import INPUT_SIZE, NUM_CLASSES, console, fail_cleanly, json_target, build_model, print_skipped, write_json, app


@app.command("sites")
@fail_cleanly
def sites_command(
    model: str = typer.Argument(..., help="A timm model name, e.g. resnet50."),
    input_size: Optional[str] = INPUT_SIZE,
    num_classes: Optional[str] = NUM_CLASSES,
    json_path: Optional[str] = typer.Option(None, "--json", help="Write the sites as JSON to FILE (- for stdout)."),
):
    """List the sites the pass finds: residual merges, Inception merges, 3x3 convs in residual branches."""
    from ..models import resolve_input_size
    from ..report import sites_by_stage, sites_json, sites_table
    from ..sites import scan

    json_target(json_path)
    net = build_model(model, None, False, num_classes)
    found = scan(net, resolve_input_size(net, input_size))
    if json_path != "-":
        console().print(sites_table(found))
        console().print(sites_by_stage(found))
        print_skipped(found.skipped)
    write_json(sites_json(found), json_path)
