"""`retrofit add-se`: insert blocks by a recipe, report the overhead, optionally save."""
from __future__ import annotations

import copy
from pathlib import Path

import typer

from ..errors import RetrofitError
from .common import (
    AT,
    CHECKPOINT,
    INPUT_SIZE,
    NUM_CLASSES,
    PRETRAINED,
    app,
    build_model,
    console,
    fail_cleanly,
    json_target,
    print_skipped,
    rounds_bar,
    say,
    write_json,
)
from .finetune import finetune_options, is_main_process, run_finetune


@app.command("add-se", short_help="Insert SE blocks by a recipe; report the sites and the overhead.")
@fail_cleanly
@finetune_options
def add_se_command(
    model: str = typer.Argument(..., help="A timm model name, e.g. resnet101."),
    recipe: str | None = typer.Option(None, "--recipe", "-R", help="Built-in recipe name or YAML file (default: "
                                                                   "standard)."),
    position: str | None = typer.Option(None, "--position", "-p", help="standard | pre | post | identity | inside."),
    r: str | None = typer.Option(None, "--r", "-r", help="Reduction ratio r (recipe default 16), or per stage: "
                                                         "2:8,3:8,4:16,5:32 (stages not named keep the recipe's r; "
                                                         "default:V sets them)."),
    squeeze: str | None = typer.Option(None, "--squeeze", help="avg | max (or per stage, e.g. 5:max)."),
    gate: str | None = typer.Option(None, "--gate", help="sigmoid | hard_sigmoid | tanh | relu (or per stage, e.g. "
                                                         "5:tanh)."),
    stages: str | None = typer.Option(None, "--stages", help="Stages to retrofit, e.g. 3,4 or all (stage = log2 output "
                                                             "stride)."),
    divisor: str | None = typer.Option(None, "--divisor", help="Round the reduced width to a multiple of this (or per "
                                                               "stage, e.g. 4:8,5:8)."),
    min_width: str | None = typer.Option(None, "--min-width", help="Smallest reduced width (or per stage)."),
    bias: bool | None = typer.Option(None, "--bias/--no-bias", help="Biases on the block's two 1x1 convs."),
    init: str | None = typer.Option(None, "--init", help="preserve (start as identity) | paper (random) (or per stage, "
                                                         "e.g. 5:paper)."),
    module: str | None = typer.Option(None, "--module", help="Block to insert: se | ese | eca | ceca | cbam | gc "
                                                             "(default se), or per stage, e.g. 2:eca,3:eca."),
    allow_wide: bool = typer.Option(False, "--allow-wide", help="Allow r below 1 (blocks wider than their input; still "
                                                                "r >= 1/16)."),
    kinds: str | None = typer.Option(None, "--kinds", help="Site kinds to retrofit, e.g. residual,inception (inside = "
                                                           "conv3x3; pyramid: feature-pyramid merges, an FPN's "
                                                           "top-down sums, off by default)."),
    only: str | None = typer.Option(None, "--only", help="Module-path globs of the sites to retrofit, e.g. 'layer3.*' "
                                                         "(comma-separated)."),
    skip: str | None = typer.Option(None, "--skip", help="Module-path globs of sites to leave out, e.g. "
                                                         "'layer1.*,layer2.0'."),
    at: str | None = AT,
    input_size: str | None = INPUT_SIZE,
    checkpoint: Path | None = CHECKPOINT,
    pretrained: bool = PRETRAINED,
    num_classes: str | None = NUM_CLASSES,
    every_block: bool = typer.Option(False, "--blocks", help="List every inserted block (default: per stage the first "
                                                             "and the last, the others folded into one row)."),
    json_path: str | None = typer.Option(None, "--json", help="Write the numbers as JSON to FILE (- for stdout)."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Save the retrofitted model (.safetensors) for "
                                                                    "retrofit.load, and its model card NAME.README.md "
                                                                    "beside it."),
    adapter: bool = typer.Option(False, "--adapter", help="With --output: save an adapter, only the blocks (and a new "
                                                          "head, and what phase 2 changed) with a hash of the base "
                                                          "weights; retrofit.load(OUTPUT, base=CHECKPOINT) rebuilds "
                                                          "the model."),
    finetune: Path | None = typer.Option(None, "--finetune", help="Then fine-tune on this ImageFolder (DIR/train, "
                                                                  "DIR/val), with the fine-tune options below (those "
                                                                  "of `retrofit finetune`); --output gets the best "
                                                                  "model, checkpoints go to OUTPUT's name + -add-se/. "
                                                                  "It cannot be resumed: for a run to resume, save "
                                                                  "with `add-se ... --output F`, then `retrofit "
                                                                  "finetune F --data DIR` (which takes --resume)."),
    latency: bool = typer.Option(False, "--latency", help="Also time the retrofitted model against the original: the "
                                                          "median ratio of the two, back to back in each round, with "
                                                          "its interval over the rounds (at least 95%)."),
    batch: int = typer.Option(8, "--batch", help="Batch size of the --latency runs."),
    runs: int = typer.Option(10, "--runs", help="Timed rounds for --latency (each times both models)."),
    meta: bool | None = typer.Option(None, "--meta/--no-meta", help="Build the model on the meta device (no weights, "
                                                                    "no memory); default: when nothing needs real "
                                                                    "weights (no --output, --checkpoint, --pretrained, "
                                                                    "--latency, --finetune)."),
    *, train: dict,
):
    """Insert SE blocks by a recipe and report the sites and the overhead."""
    # deferred: torch and timm load when a command runs, not for --help
    from ..files.adapter import head_keys, remember_base, state_bytes
    from ..files.atomic import check_writable
    from ..files.card import command_line, write_card
    from ..files.checkpoint import save
    from ..files.models import new_head
    from ..graph.model import model_name
    from ..measure.latency import measure_latency
    from ..measure.meta import build_and_scan
    from ..measure.overhead import planned_overhead, traced_cost
    from ..measure.report import blocks_table, latency_json, latency_line, overhead_table, sites_by_stage, sites_json
    from ..surgery.insert import paused_gc, retrofit_scanned
    from ..surgery.named import named_sites
    from ..surgery.recipe import resolve_recipe
    from ..surgery.trainable import trainable_parameters

    chosen = resolve_recipe(recipe, position=position, r=r, squeeze=squeeze, gate=gate, stages=stages,
                            divisor=divisor, min_width=min_width, bias=bias, init=init, module=module,
                            allow_wide=True if allow_wide else None, kinds=kinds, only=only, skip=skip, at=at)
    json_target(json_path)
    if finetune is not None and output is None:
        raise RetrofitError("--finetune needs --output FILE for the fine-tuned model (its checkpoints go to "
                            "FILE's name + -add-se/)")
    if finetune is not None and train["device"] is not None:
        from ..train.distributed import check_device  # deferred: torch loads when a command runs

        check_device(train["device"])  # before the model is built
    if output is not None:
        output = output.expanduser()
        check_writable(output)
        if checkpoint is not None and output.resolve() == Path(checkpoint).expanduser().resolve():
            raise RetrofitError(f"--output {output} is the input checkpoint; input weights are never "
                                f"overwritten, choose another file")
    if adapter and output is None:
        raise RetrofitError("--adapter needs --output FILE for the adapter")
    if adapter and checkpoint is None and not pretrained:
        raise RetrofitError("--adapter needs a base others can rebuild: --checkpoint FILE or --pretrained (random "
                            "weights cannot be made again)")
    if batch < 1 or runs < 1:
        raise RetrofitError(f"--batch and --runs must be at least 1, got {batch} and {runs}")
    needs_weights = output is not None or checkpoint is not None or pretrained or latency or finetune is not None
    if meta and needs_weights:
        raise RetrofitError("--meta builds the model without weights: it cannot go with --output, --checkpoint, "
                            "--pretrained, --latency or --finetune; drop --meta")
    with paused_gc():
        net, found = build_and_scan(lambda: build_model(model, checkpoint, pretrained, num_classes), input_size,
                                    meta=not needs_weights if meta is None else meta)
        size = found.traced.input_size
        # the modules `at` names, read before the surgery adds its own (a glob could match those)
        named = named_sites(found.traced, chosen.at, model_name(net)) if chosen.at else []
        base = traced_cost(found.traced, found.macs)  # measured before the surgery changes `net`
        original = copy.deepcopy(net) if latency else None
        info = retrofit_scanned(found, net, chosen)  # in place: the CLI owns this model
        info.weights = "checkpoint" if checkpoint is not None else "pretrained" if pretrained else "random"
        report = planned_overhead(base, info.blocks, chosen)  # a block adds only itself: no second trace
    head = new_head(model, checkpoint, pretrained, num_classes)
    trainable = trainable_parameters(net, head=head)  # what phase 1 of a fine-tune trains
    base_name = f"{model}, " + (f"weights {Path(checkpoint).name}" if checkpoint is not None else
                                "timm's pretrained weights" if pretrained else "random weights")
    if adapter or finetune is not None:  # the base: the weights as built (a new head is not the base's, and
        remember_base(net, base_name, new=head_keys(net) if head else set())  # the fine-tune says it is new)
    timing = None
    if latency:
        with rounds_bar("timing the original and the retrofitted model, in turns", quiet=json_path == "-") as bar:
            timing = measure_latency({"original": original, "retrofitted": net}, batch=batch, input_size=size,
                                     runs=runs, on_round=bar)
        del original
    data = {"model": model_name(net), "recipe": chosen.to_dict(), "sites": sites_json(found, named),
            **report.to_dict(), "skipped": [{"where": s.where, "reason": s.reason} for s in info.skipped],
            "trainable_parameters": {"trainable": trainable.trainable, "total": trainable.total}}
    if timing is not None:
        data["latency"] = latency_json(timing)
    if json_path != "-":
        say((model_name(net), "bold"), f": {found.summary()}{f', {len(named)} named' if named else ''} sites at "
            f"input {'x'.join(map(str, size))}; recipe: {chosen.describe()}")
        console().print(sites_by_stage(found, named))
        console().print(blocks_table(report, chosen.block.module, every=every_block))
        console().print(overhead_table(report))
        console().print(str(trainable))
        if timing is not None:
            say(latency_line(timing))
        print_skipped(info.skipped, found.traced.opaque)
        if found.pyramid_note():
            say((found.pyramid_note(), "dim"))
        if info.weights == "random" and (output is not None or finetune is not None):
            say(("note:", "yellow"), f" {model} has random weights (no --checkpoint or --pretrained): its sites and "
                "costs hold for any weights, but a fine-tune of it is only a demonstration")
    write_json(data, json_path)
    result = None
    if finetune is not None:  # the best epoch by val top-1 (step 0 included) is what --output gets
        result = run_finetune(net, finetune, output.with_name(f"{output.stem}-add-se"), quiet=json_path == "-",
                              resumable=False, said_random=True,
                              inputs=tuple(p for p in (checkpoint,) if p is not None), **train)
    if output is not None and is_main_process():
        save(net, output, adapter=adapter)
        card = write_card(output, net, overhead=report, result=result, command=command_line(), base_name=base_name)
        if json_path != "-":
            if adapter:
                size, full = output.stat().st_size, state_bytes(net)
                say(f"saved adapter {output}: {size / 1e6:.1f} MB, {100 * size / full:.1f}% of the full "
                f"model's {full / 1e6:.1f} MB (load with retrofit.load(path, base=...) or "
                f"`retrofit finetune {output.name} --base ...`); card: {card}")
            else:
                say(f"saved {output} (load with retrofit.load); card: {card}")
