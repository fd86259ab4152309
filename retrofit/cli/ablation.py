"""The accuracy columns and plot of `retrofit sweep --data` (rows from :mod:`retrofit.sweep.ablation`)."""

from __future__ import annotations

from pathlib import Path

from ..files.atomic import atomic_write
from ..measure.fit import Col  # rich only: no torch


def has_accuracy(rows) -> bool:
    return any(row.arm != "se" for row in rows)


def accuracy_caption(rows, latency: bool) -> str:
    seeds = next((len(row.seeds) for row in rows if row.seeds), 0)
    control = next((row.control for row in rows if row.control), None)
    return (
        f"top-1, val loss: the last epoch's, mean ± std over {seeds} seed(s). Δ top-1: paired difference "
        f"to the control arm '{control}' (the best control), mean ± std over the seeds [its 95% t-interval]. "
        f"front: on the Pareto front of top-1 against {'latency' if latency else 'added parameters'}, controls "
        "included."
    )


def accuracy_columns(rows) -> list:
    """The accuracy columns of the sweep table: top-1 and its difference to the control are headline
    columns (never left out), val loss and the front optional (:class:`retrofit.measure.fit.Col`)."""
    control = next((row.control for row in rows if row.control), "control")
    return [Col("top-1 %"), Col("val loss", drop=2), Col(f"Δ top-1 vs {control}"), Col("front", drop=6)]


def accuracy_cells(row) -> list[str]:
    if row.top1 is None:
        return ["", "", "", ""]
    delta = "" if row.delta_top1 is None else f"{row.delta_top1:+.2f} ± {row.delta_top1_std:.2f}"
    if row.delta_top1_ci is not None:
        delta += f" [{row.delta_top1_ci[0]:+.2f}, {row.delta_top1_ci[1]:+.2f}]"
    return [
        f"{row.top1:.2f} ± {row.top1_std:.2f}",
        f"{row.val_loss:.4f} ± {row.val_loss_std:.4f}",
        delta,
        "*" if row.pareto else "",
    ]


def draw_accuracy(pyplot, rows, name: str, path: Path, latency: bool) -> None:
    """Val top-1 against added parameters (or latency): one line per position (and stage set, when
    several were swept), error bars over the seeds; the control arms as horizontal lines."""
    several_stages = len({row.stages for row in rows if row.arm == "se"}) > 1
    lines: dict[str, list] = {}
    for row in rows:
        if row.arm == "se" and row.top1 is not None:
            label = row.position + (f" (stages {row.stages_label})" if several_stages else "")
            lines.setdefault(label, []).append(row)
    fig, ax = pyplot.subplots(figsize=(7.5, 4.8))

    def x_of(row):
        return (row.latency.ratio - 1) * 100 if latency else row.params_percent

    for label, points in lines.items():
        points.sort(key=x_of)
        ax.errorbar(
            [x_of(p) for p in points],
            [p.top1 for p in points],
            yerr=[p.top1_std for p in points],
            marker="o",
            capsize=3,
            label=label,
        )
        for p in points:
            ax.annotate(f"r={p.r_label}", (x_of(p), p.top1), textcoords="offset points", xytext=(4, 4), fontsize=7)
    control_lines(ax, rows)
    ax.set_xlabel("latency overhead (%)" if latency else "parameters added (%)")
    ax.set_ylabel("val top-1 (%), mean ± std over seeds")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"SE retrofit accuracy sweep: {name}")
    save_figure(pyplot, fig, path)


def control_lines(ax, rows) -> None:
    """The control arms of ``rows`` as horizontal lines at their mean top-1, labelled with mean ± std."""
    styles = ("--", "-.", ":")
    for i, row in enumerate(r for r in rows if r.arm != "se" and r.top1 is not None):
        ax.axhline(
            row.top1,
            linestyle=styles[i % len(styles)],
            color="gray",
            label=f"control: {row.arm} ({row.top1:.2f} ± {row.top1_std:.2f})",
        )


def save_figure(pyplot, fig, path: Path) -> None:
    """Write ``fig`` to ``path`` atomically (:func:`retrofit.files.atomic.atomic_write`) and close it; the
    format follows ``path``'s suffix."""
    fig.tight_layout()
    try:
        with atomic_write(path) as tmp:
            fig.savefig(tmp, format=path.suffix.lstrip(".") or None)
    finally:
        pyplot.close(fig)
