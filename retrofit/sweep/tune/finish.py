"""The honest finish: the best recipes re-run from scratch over seeds, next to the sweep's control arms.

* **Finalists**: the ``K`` best trained COMPLETE trials with distinct recipes, by value (ties: fewer added
  parameters, then the lower number).
* **Seeds**: the finish uses the sweep's seeds ``0..S-1`` for every finalist and every control, not the
  search seed: the recipe that won the search on its seed is biased there (the winner's curse). The
  validation images serve the search and the finish alike, which the caption says.
* **Controls**: the sweep's three arms (``original``, ``head+norms``, ``full``), trained as long as the
  finalists. When the learning rate or the phase-2 epochs are searched, the controls run at each
  finalist's settings too (a tuned rate against an untuned control would flatter the recipe), each such
  arm named with its settings, and the best control is the best of all.
* **Jobs**: every (finalist or control, seed) run is a job of the study ``NAME:final`` in the same store,
  run once over every process (:func:`.claim.run_jobs`); each job keeps its result rows in the store and
  every process builds the same table from it (:func:`retrofit.sweep.ablation.control_rows`, ``with_stats``,
  ``pareto``, ``verdict``). A job whose run failed, or whose process died too often, is a row with its
  reason. The job of a finalist's first seed saves that model, for the winner's file.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from ...files.checkpoint import save
from ...surgery.recipe import Recipe
from ...train.distributed import PeerLost
from ..ablation import CONTROL_OPTIONS, control_rows, failure, pareto, with_stats
from ..rows import Cost, Finalist, SweepRow
from .claim import job_failure, run_jobs
from .limits import recipe_cost
from .objective import Search
from .space import Candidate, canonical
from .workers import WORKER, Worker

FINALISTS = "finalists"  # folder of the finalists' first-seed models, in the output folder


def finalists(trials, k: int) -> list:
    """The ``k`` best trained COMPLETE trials with distinct recipes (see the module docstring)."""
    done = sorted(
        (t for t in trials if t.state == TrialState.COMPLETE and "rows" in t.user_attrs),
        key=lambda t: (-t.value, t.user_attrs.get("added_params", 0), t.number),
    )
    out, seen = [], set()
    for t in done:
        if t.user_attrs["recipe"] not in seen:
            seen.add(t.user_attrs["recipe"])
            out.append(t)
    return out[:k]


def control_settings(search: Search, chosen: list) -> list[dict[str, Any]]:
    """The (lr, epochs) the controls run at: the tune's own, and each finalist's when they are searched."""
    base = {"lr": search.config.lr, "epochs": search.epochs}
    settings = [] if search.space.lr is not None else [base]
    for t in chosen:
        searched = t.user_attrs.get("train") or {}
        s = {"lr": searched.get("lr", base["lr"]), "epochs": search.total_epochs(searched)}
        if s not in settings:
            settings.append(s)
    return settings


def job_keys(search: Search, chosen: list, seeds: list[int]) -> list[str]:
    settings = control_settings(search, chosen)
    keys = [
        canonical({"kind": "control", "arm": arm, **s, "seed": seed})
        for s in settings
        for arm in CONTROL_OPTIONS
        for seed in seeds
    ]
    keys += [canonical({"kind": "finalist", "trial": t.number, "seed": seed}) for t in chosen for seed in seeds]
    return keys


def arm_name(arm: str, setting: dict[str, Any], several: bool) -> str:
    return f"{arm} (lr {setting['lr']:.2e}, {setting['epochs']} epochs)" if several else arm


def run_job(search: Search, study, trial, key: str, seeds: list[int], out: Path | None, adapter: bool) -> float:
    """One finish job on rank 0 (sent to the other ranks first): its result rows in the store, its value the
    last epoch's top-1 (0 when it failed, with the reason: a failed run is a row, not a job to redo)."""
    job = json.loads(key)
    recipe, searched, options = _job_plan(search, study, job)
    search.voice.send(("job", key, recipe, searched, options))
    try:
        result = search.run(f"job {key}", recipe, searched, job["seed"], **options)
    except PeerLost:
        raise
    except Exception as err:  # noqa: BLE001 - a failed run: its row says why
        trial.set_user_attr("failed", failure(err))
        return 0.0
    trial.set_user_attr("result", {"last": result["last"], "original": result["original"]})
    if job["kind"] == "finalist" and job["seed"] == seeds[0] and out is not None:
        path = out / FINALISTS / f"trial-{job['trial']}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save(result["model"], path, adapter=adapter)  # atomic (retrofit.files.atomic)
        trial.set_user_attr("model", str(path))
    return result["last"]["top1"]


def follow_job(search: Search, key: str, recipe, searched, options) -> None:
    """A rank other than 0: run the job rank 0 sent (a failed run fails on rank 0 too, which records it)."""
    try:
        search.run(f"job {key}", recipe, searched, json.loads(key)["seed"], **dict(options))
    except PeerLost:
        raise
    except Exception:  # noqa: BLE001 - rank 0 has the same failure, and records it
        pass


def _job_plan(search: Search, study, job: dict) -> tuple[Recipe | None, dict, dict]:
    """What a job trains: (recipe or None for a control, searched settings, fine-tune options)."""
    if job["kind"] == "control":
        searched = {"lr": job["lr"]}
        return None, searched, {**CONTROL_OPTIONS[job["arm"]], "epochs": job["epochs"]}
    t = study.get_trials(deepcopy=False)[job["trial"]]
    cand = search.space.candidate(t.params)
    return cand.recipe, cand.train, {}


def finish(
    search: Search, final_study, chosen: list, seeds: list[int], worker: Worker, out: Path | None, adapter: bool, study
) -> list[SweepRow]:
    """Run (or join) every job of the finish and build its rows, the same on every process."""
    keys = job_keys(search, chosen, seeds)
    jobs = run_jobs(
        final_study,
        keys,
        lambda trial, key: run_job(search, study, trial, key, seeds, out, adapter),
        worker,
        say=search.say,
    )
    return finish_rows(search, chosen, seeds, jobs)


def finish_rows(search: Search, chosen: list, seeds: list[int], jobs: dict[str, Any]) -> list[SweepRow]:
    settings = control_settings(search, chosen)
    several = len(settings) > 1
    controls: dict[str, Any] = {}
    notes = {}
    for s in settings:
        for arm in CONTROL_OPTIONS:
            name = arm_name(arm, s, several)
            runs = [jobs[canonical({"kind": "control", "arm": arm, **s, "seed": seed})] for seed in seeds]
            failed = next((job_failure(r) for r in runs if job_failure(r)), None)
            controls[name] = failed if failed else [r.user_attrs["result"] for r in runs]
            if several:
                notes[name] = f"{arm}: lr {s['lr']:.2e}, {s['epochs']} epochs"
    rows, best = control_rows(controls, seeds, latency=False, notes=notes)
    for t in chosen:
        runs = [jobs[canonical({"kind": "finalist", "trial": t.number, "seed": seed})] for seed in seeds]
        row = finalist_row(search, t)
        failed = next((job_failure(r) for r in runs if job_failure(r)), None)
        if failed:
            rows.append(dataclasses.replace(row, seeds=tuple(seeds), note=f"fine-tune failed: {failed}"))
        else:
            rows.append(with_stats(row, [r.user_attrs["result"] for r in runs], seeds, best))
    return pareto(rows, latency=False)


def finalist_row(search: Search, t) -> SweepRow:
    """A finalist's cost row (the sweep's columns), with its whole recipe, settings and trial."""
    cand: Candidate = search.space.candidate(t.params)
    cost = recipe_cost(search.found, search.base, cand.recipe)
    extra = [f"module {cand.recipe.module}"] if cand.recipe.module != "se" else []
    extra += [f"{k} {getattr(cand.recipe, k)}" for k in ("gate", "squeeze") if len(getattr(search.space, k)) > 1]
    extra += [f"lr {cand.train['lr']:.2e}"] if "lr" in cand.train else []
    extra += [f"phase 2 {cand.train['phase2_epochs']}"] if "phase2_epochs" in cand.train else []
    return SweepRow(
        cand.recipe.position,
        cand.recipe.r,
        cand.recipe.stages,
        Cost.of(cost),
        finalist=Finalist(cand.recipe, cand.train, t.number, ", ".join(extra)),
        note=f"trial {t.number}" + "".join(", " + e for e in extra),
    )


def winner(rows: list[SweepRow]) -> SweepRow | None:
    """The finalist with the best mean top-1 (ties: fewer added parameters)."""
    scored = [r for r in rows if r.arm == "se" and r.top1 is not None]
    return max(scored, key=lambda r: (r.top1, -r.params), default=None)


def final_study(storage, name: str):
    """The finish's job queue, ``NAME:final`` in the same store (each job's one parameter is fixed)."""
    return optuna.create_study(
        storage=storage,
        study_name=f"{name}:final",
        direction="maximize",
        sampler=optuna.samplers.RandomSampler(seed=0),
        pruner=optuna.pruners.NopPruner(),
        load_if_exists=True,
    )


def model_of(jobs_study, trial_number: int, seed: int) -> tuple[str | None, str | None]:
    """Where the winner's first-seed model was saved, and by which host."""
    for t in jobs_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        job = json.loads(t.params.get("job", "{}"))
        if job.get("kind") == "finalist" and job.get("trial") == trial_number and job.get("seed") == seed:
            return t.user_attrs.get("model"), (t.user_attrs.get(WORKER) or {}).get("host")
    return None, None
