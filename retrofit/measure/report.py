"""Rich tables and JSON for sites, overhead reports, latency and fine-tuning results."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..blocks.attention import DISPLAY_NAMES
from ..surgery.sites import KINDS, NAMED, Scan, Site
from .fit import Col, FitTable
from .overhead import Overhead

if TYPE_CHECKING:
    from .latency import Timing


def _n(x: int) -> str:
    return f"{x:,}"


def _pct(x: float) -> str:
    return f"{x:.2f}%" if x >= 0.01 or x == 0 else f"{x:.4f}%"


def sites_by_stage(scan: Scan, named: list[Site] = ()) -> FitTable:
    """Sites found, one row per stage (and the ``named`` ones, a recipe's ``at``, in a column)."""
    kinds = scan.kinds() + ((NAMED,) if named else ())
    table = FitTable(
        [Col("stage"), Col("stride", drop=1), Col("size", drop=0), *(Col(k) for k in kinds)], title="Sites found"
    )
    stages: dict[int, dict] = {}
    for s in [*scan.sites, *named]:
        row = stages.setdefault(s.stage, {"size": s.size, **{k: 0 for k in kinds}})
        row[s.kind] += 1
    for stage, row in sorted(stages.items()):
        table.add_row(str(stage), str(2**stage), f"{row['size'][0]}x{row['size'][1]}", *(str(row[k]) for k in kinds))
    table.add_row(
        "all", "", "", *(str(scan.count(k)) for k in scan.kinds()), *([str(len(named))] if named else []), style="bold"
    )
    return table


def sites_table(scan: Scan, named: list[Site] = ()) -> FitTable:
    """Every site, one row each (the discovered ones, then the ``named`` ones); a module path is never cut
    (it is what ``--only``/``--skip``/``--at`` take)."""
    table = FitTable(
        [
            Col("#"),
            Col("kind", "left"),
            Col("module", "left"),
            Col("stage", drop=4),
            Col("stride", drop=0),
            Col("channels", drop=3),
            Col("size", drop=1),
            Col("detail", "left", drop=2, text=True),
        ],
        title="Sites",
    )
    for i, s in enumerate([*scan.sites, *named]):
        table.add_row(
            str(i),
            s.kind,
            s.module or "<model>",
            str(s.stage),
            str(s.stride),
            str(s.channels),
            f"{s.size[0]}x{s.size[1]}",
            s.detail,
        )
    return table


def blocks_table(report: Overhead, module: str = "se", every: bool = False) -> FitTable:
    """The inserted blocks (one per site); ``module``: the block kind for the title when the blocks do
    not say. Blocks of several kinds (per-stage or per-module recipes) get a ``module`` column instead.

    Folded by default, so a deep network fits a terminal: per stage the first and the last block, and
    between them one row ``... N more`` (their width, size and per-block costs when the N blocks are
    alike, else blank). ``every``: one row per block. Block names, parameters and multiply-adds are
    never cut (the names are what ``--only``/``--skip`` take): a narrow terminal leaves other columns out.
    """
    names = DISPLAY_NAMES
    kinds = list(dict.fromkeys(b.module for b in report.blocks if b.module))
    mixed = len(kinds) > 1
    kind = kinds[0] if len(kinds) == 1 else module if isinstance(module, str) else ""
    title = "Blocks inserted" if mixed or not kind else f"{names.get(kind, kind)} blocks inserted"
    folded = not every and any(len(group) > 3 for group in _by_stage(report.blocks))
    cols = [
        Col("block", "left"),
        *([Col("module", "left", drop=6)] if mixed else []),
        Col("site", "left", drop=5),
        Col("stage", drop=4),
        Col("channels", drop=3),
        Col("width", drop=2),
        Col("size", drop=1),
        Col("params"),
        Col("MACs"),
        Col("pool+scale ops", drop=0),
    ]
    table = FitTable(
        cols,
        title=title,
        caption="... N more: the blocks between a stage's first and last, with the costs of each "
        "(blank where they differ); --blocks lists every block."
        if folded
        else None,
    )
    for group in _by_stage(report.blocks):
        shown = group if every or len(group) <= 3 else [group[0], group[1:-1], group[-1]]
        for b in shown:
            if isinstance(b, list):
                row = _middle_row(b)
                if mixed:
                    row.insert(1, _same(b, lambda x: names.get(x.module, x.module)))
                table.add_row(*row, style="dim")
            else:
                table.add_row(
                    b.path,
                    *([names.get(b.module, b.module)] if mixed else []),
                    b.site,
                    str(b.stage),
                    str(b.channels),
                    str(b.width),
                    f"{b.size[0]}x{b.size[1]}",
                    _n(b.params),
                    _n(b.macs),
                    _n(b.pool_ops + b.scale_ops),
                )
    return table


def _by_stage(blocks: list) -> list[list]:
    """The blocks in order, in runs of one stage."""
    groups: list[list] = []
    for b in blocks:
        if groups and groups[-1][-1].stage == b.stage:
            groups[-1].append(b)
        else:
            groups.append([b])
    return groups


def _same(blocks: list, get, fmt=str) -> str:
    """The value ``get`` gives every one of ``blocks``, formatted; blank where they differ."""
    values = {get(b) for b in blocks}
    return fmt(values.pop()) if len(values) == 1 else ""


def _middle_row(blocks: list) -> list[str]:
    """``... N more`` and the values the folded blocks share (blank where they differ)."""

    def same(get, fmt=str) -> str:
        return _same(blocks, get, fmt)

    return [
        f"... {len(blocks)} more",
        same(lambda b: b.site),
        same(lambda b: b.stage),
        same(lambda b: b.channels),
        same(lambda b: b.width),
        same(lambda b: b.size, lambda s: f"{s[0]}x{s[1]}"),
        same(lambda b: b.params, _n),
        same(lambda b: b.macs, _n),
        same(lambda b: b.pool_ops + b.scale_ops, _n),
    ]


def overhead_table(report: Overhead, title: str = "Overhead") -> FitTable:
    """Added parameters and multiply-adds per stage and in total, against the base model."""
    cols = [
        Col("stage"),
        Col("stride", drop=1),
        Col("blocks", drop=3),
        Col("params added"),
        Col("% params"),
        Col("MACs added"),
        Col("% MACs", drop=2),
        Col("pool+scale ops", drop=0),
    ]
    table = FitTable(
        cols,
        title=title,
        caption="MACs: multiply-adds (torch.utils.flop_counter FLOPs / 2), batch 1. "
        "pool+scale ops: the squeeze and scale passes over each block's input "
        "(C x H x W each), elementwise, not multiply-adds.",
    )
    for s in report.stages():
        table.add_row(
            str(s.stage),
            str(s.stride),
            str(s.blocks),
            _n(s.params),
            _pct(report.params_percent(s.params)),
            _n(s.macs),
            _pct(report.macs_percent(s.macs)),
            _n(s.pool_ops + s.scale_ops),
        )
    table.add_row(
        "total",
        "",
        str(len(report.blocks)),
        _n(report.added_params),
        _pct(report.params_percent()),
        _n(report.added_macs),
        _pct(report.macs_percent()),
        _n(report.pool_ops + report.scale_ops),
        style="bold",
    )
    table.add_section()
    table.add_row("base", "", "", _n(report.base_params), "", _n(report.base_macs), "", "")
    table.add_row("retrofitted", "", "", _n(report.params), "", _n(report.macs), "", "")
    return table


def latency_line(timing: Timing, name: str = "retrofitted", reference: str = "original") -> str:
    """The measured latency of ``name`` against ``reference`` (add-se: the retrofitted model against the
    original; fold: the folded against the unfolded), in one line, with its interval over the rounds."""
    ratio = timing.ratio(name, reference)
    low, high, coverage = timing.interval(name, reference)
    verdict = "within noise: no difference measurable in this run" if low <= 1 <= high else f"{100 * (ratio - 1):+.1f}%"
    return (
        f"Latency ({len(timing.samples[reference])} rounds, the two models back to back in each, batch "
        f"{timing.batch}, {'x'.join(map(str, timing.input_size))}): {reference} "
        f"{timing.median(reference) * 1e3:.1f} ms, {name} {timing.median(name) * 1e3:.1f} ms "
        f"(medians); ratio {ratio:.3f} [{low:.3f}, {high:.3f}] ({100 * coverage:.0f}% interval of the "
        f"median per-round ratio): {verdict}"
    )


def latency_cell(ratio: float, low: float, high: float) -> str:
    """A sweep row's latency: ``1.130x [1.09, 1.19]``, ending `` noise`` when the interval holds 1.0."""
    return f"{ratio:.3f}x [{low:.2f}, {high:.2f}]" + (" noise" if low <= 1 <= high else "")


def latency_json(timing: Timing, name: str = "retrofitted", reference: str = "original") -> dict[str, Any]:
    """The latency measurement of an add-se run (or ``name`` against ``reference``): medians (ms), the ratio
    with its interval, every sample."""
    low, high, coverage = timing.interval(name, reference)
    return {
        "batch": timing.batch,
        "input_size": list(timing.input_size),
        "runs": len(timing.samples[reference]),
        f"{reference}_ms": round(timing.median(reference) * 1e3, 3),
        f"{name}_ms": round(timing.median(name) * 1e3, 3),
        "ratio": round(timing.ratio(name, reference), 4),  # the median of the per-round ratios
        "ratio_low": round(low, 4),
        "ratio_high": round(high, 4),
        "ratio_coverage": round(coverage, 4),
        "within_noise": low <= 1 <= high,
        "samples_ms": {name: [round(t * 1e3, 4) for t in v] for name, v in timing.samples.items()},
    }


def sites_json(scan: Scan, named: list[Site] = ()) -> dict[str, Any]:
    counts = {k: scan.count(k) for k in KINDS}
    if named:
        counts[NAMED] = len(named)
    return {
        "input_size": list(scan.traced.input_size),
        "image_size": list(scan.traced.image_size),  # what strides are measured against
        "counts": counts,
        "sites": [
            {
                "kind": s.kind,
                "module": s.module,
                "node": s.node,
                "stage": s.stage,
                "stride": s.stride,
                "channels": s.channels,
                "size": list(s.size),
                "detail": s.detail,
                "layout": s.layout,
                "prefix": s.prefix,
            }
            for s in [*scan.sites, *named]
        ],
        "kept": [{"module": path, "reason": line} for path, line in scan.traced.opaque],
        "skipped": [{"where": s.where, "reason": s.reason} for s in scan.skipped],
    }


def results_table(result: Any, title: str = "Fine-tuning results") -> FitTable:
    """One table of a :class:`retrofit.FinetuneResult` (its ``rows`` and ``best``): original, step 0 and
    every epoch, with the best one marked; losses and top-1 are never left out at any width."""
    table = FitTable(
        [
            Col("model", "left"),
            Col("phase", drop=2),
            Col("lr", drop=1),
            Col("train loss"),
            Col("val loss"),
            Col("top-1 %"),
            Col("top-5 %", drop=0),
            Col("", "left"),
        ],
        title=title,
        elsewhere="metrics.jsonl",
    )
    for r in result.rows:
        label = {"original": "original (no SE)", "step 0": "retrofitted, step 0"}.get(r["name"], r["name"])
        table.add_row(
            label,
            str(r["phase"] or ""),
            f"{r['lr']:.2e}" if r["lr"] is not None else "",
            f"{r['train_loss']:.4f}" if r["train_loss"] is not None else "",
            f"{r['val_loss']:.4f}",
            f"{r['top1']:.2f}",
            f"{r['top5']:.2f}",
            "best" if r["name"] == result.best["name"] else "",
        )
    return table


def excitation_table(blocks: list) -> FitTable:
    """One row per channel gate of a :func:`retrofit.inspect` report (:class:`~retrofit.measure.excitation.GateReport`):
    where it is, its mean excitation and spreads, saturation and constancy (definitions in the caption)."""
    cols = [
        Col("block", "left"),
        Col("stage", drop=6),
        Col("position", "left", drop=5),
        Col("channels", drop=4),
        Col("mean"),
        Col("spread images"),
        Col("spread classes"),
        Col("saturated", drop=3),
        Col("local change"),
        Col("logit change", drop=2),
        Col("loss change", drop=1),
        Col("", "left", drop=0),
    ]
    table = FitTable(
        cols,
        title="Channel gates: what each excitation does on these images",
        caption=(
            "mean: of the raw gate (sigmoid: 0 to 1) over images and channels; spread: its standard deviation over "
            "images, and over the class means (class-specificity), averaged over channels; saturated: channels whose "
            "mean is within 0.05 of the gate's top; local change: ||x (s - mean s)|| / ||x s|| at the block; logit "
            "change: ||L' - L|| / ||L|| with this gate at its mean, loss change: the cross-entropy's (nats); "
            "constant: input-independent by its weights."
        ),
    )
    for b in blocks:
        table.add_row(
            b.path,
            str(b.stage),
            b.position,
            str(b.channels),
            f"{b.mean:.4f}",
            f"{b.image_spread:.4f}",
            f"{b.class_spread:.4f}",
            "" if b.saturated is None else f"{100 * b.saturated:.0f}%",
            f"{b.local_change:.4f}",
            "" if b.logit_change is None else f"{b.logit_change:.4f}",
            "" if b.loss_change is None else f"{b.loss_change:+.4f}",
            "constant" if b.constant else "",
        )
    return table


def fold_table(blocks: list) -> FitTable:
    """The blocks :func:`retrofit.fold` folded (:class:`~retrofit.sweep.fold.FoldedBlock`): where each scale
    went, why there, and what the fold saved."""
    table = FitTable(
        [
            Col("block", "left"),
            Col("stage", drop=4),
            Col("into", "left"),
            Col("neighbour", "left"),
            Col("params saved"),
            Col("MACs saved"),
            Col("pool+scale ops saved", drop=2),
            Col("local change", drop=3),
            Col("why not a neighbour", "left", drop=1, text=True),
        ],
        title="Folded blocks",
    )
    for b in blocks:
        table.add_row(
            b.path,
            str(b.stage),
            b.into,
            b.neighbour,
            _n(b.params_saved),
            _n(b.macs_saved),
            _n(b.ops_saved),
            "constant" if b.constant else "" if b.local_change is None else f"{b.local_change:.4f}",
            b.why,
        )
    return table
