"""The trials as rows (what ``trials.jsonl``, ``--json`` and :func:`retrofit.tune` give), their progress
lines and the closing summary, all read from the store."""

from __future__ import annotations

import json
from typing import Any

from optuna.trial import TrialState

from .workers import FAILED, SURPLUS, WORKER, gave_up, retry_of

STATES = ("complete", "pruned", "skipped", "duplicate", "failed", "running", "waiting")


def trial_rows(trials, epochs: int) -> list[dict[str, Any]]:
    """One row per trial of the study (the surplus ones, which lost a race before drawing, left out);
    ``epochs``: the phase-1 epochs of a trial (its searched phase-2 epochs come on top)."""
    return [trial_row(t, epochs) for t in trials if not t.user_attrs.get(SURPLUS)]


def trial_row(t, epochs: int) -> dict[str, Any]:
    a = t.user_attrs
    train = a.get("train") or {}
    key = a.get("recipe")
    row = {
        "number": t.number,
        "state": _state(t),
        "label": a.get("label", ""),
        "recipe": json.loads(key)["recipe"] if key else None,
        "train": train,
        "added_params": a.get("added_params"),
        "params_percent": a.get("params_percent"),
        "added_macs": a.get("added_macs"),
        "macs_percent": a.get("macs_percent"),
        "blocks": a.get("blocks"),
        "latency": a.get("latency"),
        "epochs": len(t.intermediate_values),
        "planned_epochs": epochs + train.get("phase2_epochs", 0),
        "top1": _top1(t),
        "reason": a.get("reason") or gave_up(t),
        "duplicate_of": a.get("duplicate_of"),
        "retry_of": retry_of(t),
        "host": (a.get(WORKER) or {}).get("host"),
        "rows": a.get("rows"),
    }
    return row


def _state(t) -> str:
    if t.state == TrialState.COMPLETE:
        return "duplicate" if "duplicate_of" in t.user_attrs else "complete"
    if t.state == TrialState.PRUNED:
        if "duplicate_of" in t.user_attrs:
            return "duplicate"
        if t.user_attrs.get(FAILED):  # stored PRUNED so that the sampler learns from it (.claim.failed)
            return "failed"
        return "pruned" if "rows" in t.user_attrs else "skipped"
    return {TrialState.FAIL: "failed", TrialState.RUNNING: "running"}.get(t.state, "waiting")


def _top1(t) -> float | None:
    if t.state == TrialState.COMPLETE and t.value is not None:
        return t.value
    if t.intermediate_values:
        return t.intermediate_values[max(t.intermediate_values)]
    return None


def trial_line(row: dict[str, Any]) -> str:
    """``[trial 7] standard se r 4 stages all | +12,345 params (1.20%) | 2/2 epochs | top-1 81.25% | complete``."""
    parts = [f"[trial {row['number']}] {row['label'] or '(not drawn)'}"]
    if row["added_params"] is not None:
        parts.append(f"+{row['added_params']:,} params ({row['params_percent']:.2f}%)")
    parts.append(f"{row['epochs']}/{row['planned_epochs']} epochs")
    if row["top1"] is not None:
        parts.append(f"top-1 {row['top1']:.2f}%")
    state = row["state"]
    end = {
        "duplicate": f"= trial {row['duplicate_of']} (same recipe{', which failed' if row['reason'] else ''})",
        "skipped": row["reason"] or "skipped",
        "failed": f"failed ({row['reason'] or 'its process is gone'})",
    }.get(state, state)
    if row["retry_of"] is not None:
        end += f" (retry of trial {row['retry_of']})"
    return " | ".join(parts + [end])


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Trials by state, and the training epochs spent against what as many full trials would cost."""
    by = {s: sum(r["state"] == s for r in rows) for s in STATES}
    trained = [r for r in rows if r["state"] in ("complete", "pruned", "failed")]
    spent = sum(r["epochs"] for r in rows)
    full = sum(r["planned_epochs"] for r in trained)
    retried = sum(r["retry_of"] is not None for r in rows)
    line = (
        f"{len(rows)} trials: {by['complete']} complete, {by['pruned']} pruned, {by['skipped']} skipped before "
        f"training (limits, no site), {by['duplicate']} duplicate recipes, {by['failed']} failed"
        f"{f' ({retried} retried)' if retried else ''}; {spent} training epochs, against {full} for "
        f"{len(trained)} full trials ({_pct(spent, full)})"
    )
    return {
        "trials": len(rows),
        **by,
        "retried": retried,
        "epochs": spent,
        "full_epochs": full,
        "trained": len(trained),
        "line": line,
    }


def _pct(a: int, b: int) -> str:
    return f"{100 * a / b:.0f}%" if b else "-"
