"""Exactly N trials, or every finish job once, over any number of processes on one store; a search that
always ends.

Optuna's own recipe for several workers, ``optimize(callbacks=[MaxTrialsCallback(N)])`` in each, runs more
than N trials: the callback counts after a trial ends, so a worker starts one while another's last is still
running (9 trials for 8 with two workers in the design's test). Here the slots go by trial number:

1. before ``ask()``: dead processes' trials are failed and retried (:meth:`.workers.Worker.fail_stale`); stop
   when N trials count; when the counted and running ones already fill N and nothing waits, wait (one of the
   running ones may die and need a replacement);
2. after ``ask()``: if N counted-or-running trials have a lower number, this one lost the race for the
   last slot: it is told FAIL as ``retrofit:surplus`` before any parameter is drawn (a retry or a queued
   recipe it popped is queued again as it was).

A trial *counts* when it is COMPLETE or PRUNED by the pruner; one over the limits, a duplicate of a finished
recipe, or one whose fine-tune failed (:func:`failed`) does not count (``retrofit:uncounted``). ``--budget``
adds two stops: the training epochs of the whole study (a running trial reserves all of its epochs), or this
process's wall time. No input makes a search run for ever or its store grow without bound:

* a run of ``max(20, N)`` trials in a row that count for nothing (duplicates, over the limits, failed) stops
  this process's search (``stalled``);
* when this process's first :data:`FAILURES` trials (or N, if fewer) failed and no trial of the study counts,
  the search stops with one error naming the first failure's reason, and so does a search that ends with
  every trial failed (:class:`SearchFailed`): a recipe that failed is never trained again in the study, so the
  same command would only try others of the same kind;
* a trial whose process died is retried at most :data:`.workers.MAX_RETRY` times.

The finish runs as a job queue in a second study of the same store (:func:`run_jobs`), so every process ends
with the same table, built from the store.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

from ...errors import RetrofitError
from .workers import BEAT, FAILED, SURPLUS, UNCOUNTED, WORKER, Worker, gave_up

POLL = 0.5  # seconds between looks at the store while the other processes' trials run
FAILURES = 5  # failed trials of one process, none of the study counted, that stop the search


class SearchFailed(RetrofitError):
    """Every trial so far failed: the search as set up cannot work (one line: the first reason, what to do)."""


def counted(t) -> bool:
    return t.state in (TrialState.COMPLETE, TrialState.PRUNED) and not t.user_attrs.get(UNCOUNTED)


def failed(t) -> bool:
    """A trial that failed for good: its fine-tune raised (stored PRUNED with its reason and a violated
    constraint, so the sampler learns from it: Optuna's samplers ignore FAIL trials), or its process died
    too often (:func:`.workers.gave_up`)."""
    return bool(t.user_attrs.get(FAILED)) or gave_up(t) is not None


def epochs_run(t) -> int:
    return len(t.intermediate_values)


@dataclass
class Budget:
    """When a process stops asking: ``trials`` counted trials, ``epochs`` training epochs in the whole study
    (a running trial reserves its ``trial_epochs``), ``seconds`` of this process's wall time. On a ``grid``
    (every recipe of the space queued once) a slot is a recipe's turn, whatever came of it."""

    trials: int | None = None
    epochs: int | None = None
    seconds: float | None = None
    trial_epochs: int = 1
    stall: int = 20  # trials in a row that count for nothing (duplicates, over the limits, failed): stop
    grid: bool = False

    def fills(self, t) -> bool:
        """Whether ``t`` takes one of the ``trials`` slots: it counts, or on a grid it had its turn."""
        if self.grid:
            return t.state in (TrialState.COMPLETE, TrialState.PRUNED) or gave_up(t) is not None
        return counted(t)

    def done(self, trials, started: float) -> str | None:
        """Why no trial should start now ('' to wait for the running ones), or None to start one."""
        if self.trials is not None and sum(self.fills(t) for t in trials) >= self.trials:
            return "trials"
        if self.seconds is not None and time.monotonic() - started >= self.seconds:
            return "time"
        if self.epochs is not None:
            spent = sum(epochs_run(t) for t in trials if t.state != TrialState.RUNNING)
            running = sum(max(self.trial_epochs, epochs_run(t)) for t in trials if t.state == TrialState.RUNNING)
            if spent + running + self.trial_epochs > self.epochs:
                return "epochs" if not running else ""
        if self.trials is not None:
            busy = sum(self.fills(t) or t.state == TrialState.RUNNING for t in trials)
            if busy >= self.trials and not any(t.state == TrialState.WAITING for t in trials):
                return ""
        return None


def run_trials(
    study, objective: Callable, budget: Budget, worker: Worker, say=None, after: Callable[[int], None] | None = None
) -> str:
    """Run trials until ``budget`` says stop; returns why (``trials``, ``epochs``, ``time``, ``stalled``), or
    raises :class:`SearchFailed` (see the module docstring).

    ``objective(trial)`` returns the value or raises ``optuna.TrialPruned`` (PRUNED; a failed fine-tune is
    one too, marked :func:`failed`); any other exception leaves the trial RUNNING and is raised: this
    process's lock, released, then tells the others (or the same command again) to fail and retry it.
    ``after(number)`` is called once each trial of this process is told (progress)."""
    started, stalled, failures = time.monotonic(), 0, 0
    limit = min(FAILURES, budget.trials or FAILURES)
    while True:
        worker.fail_stale(study, say=say)
        trials = study.get_trials(deepcopy=False)
        if failures >= limit:
            check_failures(trials, f"the {failures} trials this process trained all failed")
        why = budget.done(trials, started)
        if why == "":
            time.sleep(POLL)
            continue
        if why is None and stalled >= max(budget.stall, budget.trials or 0):
            why = "stalled"
        if why is not None:
            why = wait_quiet(study, worker, why, say)
            check_failures(study.get_trials(deepcopy=False), "every trial failed")
            return why
        trial = study.ask()
        worker.stamp(trial)
        if _lost_the_race(study, trial, budget):
            continue
        with worker.beating(trial):
            outcome = _run_one(objective, trial)
        if outcome is None:  # another process failed it meanwhile (its heartbeat was late): nothing to tell
            if say is not None:
                say(
                    f"[trial {trial.number}] was marked failed by another process (its heartbeat came late); "
                    f"its result is dropped"
                )
            continue
        study.tell(trial, outcome[1], state=outcome[0])
        if after is not None:
            after(trial.number)
        frozen = study.get_trials(deepcopy=False)[trial.number]
        stalled = 0 if counted(frozen) else stalled + 1
        failures += failed(frozen)


def check_failures(trials, what: str) -> None:
    """Raise :class:`SearchFailed` when no trial of the study counts and some failed (see the module docstring)."""
    if any(counted(t) for t in trials):
        return
    fails = [t for t in trials if failed(t)]
    if not fails:
        return
    first = fails[0]
    why = first.user_attrs.get("reason") or gave_up(first)
    raise SearchFailed(
        f"the search stopped: {what} and no trial of the study completed; the first failure, trial "
        f"{first.number} ({first.user_attrs.get('label', 'no recipe')}): {why}. A failed recipe is "
        f"never trained again in this study: after a change, run with another --output-dir or --study"
    )


def _run_one(objective, trial):
    """``(state, value)`` of one trial, or None when another process failed it while it ran."""
    try:
        return TrialState.COMPLETE, objective(trial)
    except optuna.TrialPruned:
        return TrialState.PRUNED, None
    except optuna.exceptions.UpdateFinishedTrialError:
        return None


def _lost_the_race(study, trial, budget: Budget) -> bool:
    """A trial with N counted-or-running trials before it is surplus: failed before any draw (a recipe it
    popped from the queue, a retry or a grid's, goes back into the queue as it was)."""
    if budget.trials is None:
        return False
    trials = study.get_trials(deepcopy=False)
    ahead = sum(1 for t in trials if t.number < trial.number and (budget.fills(t) or t.state == TrialState.RUNNING))
    if ahead < budget.trials:
        return False
    popped = trials[trial.number]
    trial.set_user_attr(SURPLUS, True)
    study.tell(trial, state=TrialState.FAIL)
    kept = {k: v for k, v in popped.system_attrs.items() if k in ("fixed_params", "failed_trial", "retry_history")}
    if popped.params or "fixed_params" in kept:
        study.add_trial(
            create_trial(
                state=TrialState.WAITING,
                params=popped.params,
                distributions=popped.distributions,
                system_attrs=kept,
                user_attrs={k: v for k, v in popped.user_attrs.items() if k not in (WORKER, BEAT, SURPLUS)},
            )
        )
    return True


def wait_quiet(study, worker: Worker, why: str, say=None) -> str:
    """Wait until no trial runs (other processes' ones finish or die), so every process then reads the same
    finished study; returns ``why``."""
    while True:
        worker.fail_stale(study, say=say)
        if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            return why
        time.sleep(POLL)


# -- the finish: every job once ----------------------------------------------------------------------
JOB = "job"  # the one parameter of a job trial: its key


def job_key(t) -> str | None:
    return t.system_attrs.get("fixed_params", {}).get(JOB) or t.params.get(JOB)


def job_failure(t) -> str | None:
    """Why a finish job has no result: its run failed (a user attr), or its process died too often."""
    return t.user_attrs.get("failed") or gave_up(t)


def run_jobs(study, keys: list[str], run_job: Callable, worker: Worker, say=None) -> dict[str, object]:
    """Run every job of ``keys`` once over all processes; returns ``{key: its trial}`` once each is done (the
    same on every process): COMPLETE, or FAIL when its process died too often (:func:`job_failure`). Each
    process queues the keys that have no trial waiting, running or done (one log line each, so atomic); when
    two queued the same key, the lower trial number is the job and a higher one popped is surplus.
    ``run_job(trial, key)`` returns the job's value (and may set user attrs on the trial); a run that fails
    must be a value too (with its reason in the user attr ``failed``), or it would be queued for ever."""
    dist = {JOB: CategoricalDistribution(sorted(keys))}
    while True:
        worker.fail_stale(study, say=say)
        trials = study.get_trials(deepcopy=False)
        done = {job_key(t): t for t in trials if t.state == TrialState.COMPLETE}
        done |= {job_key(t): t for t in trials if gave_up(t) and job_key(t) not in done}
        if all(k in done for k in keys):
            return {k: done[k] for k in keys}
        live = {job_key(t) for t in trials if t.state in (TrialState.WAITING, TrialState.RUNNING)}
        missing = [k for k in keys if k not in done and k not in live]
        for k in missing:  # never queued, or its trial failed without a retry
            study.enqueue_trial({JOB: k})
        if missing:
            continue
        if not any(t.state == TrialState.WAITING and job_key(t) in keys for t in trials):
            time.sleep(POLL)  # the others' running jobs; one may die and come back
            continue
        trial = study.ask(fixed_distributions=dist)
        worker.stamp(trial)
        key = trial.params[JOB]
        first = min(
            t.number for t in study.get_trials(deepcopy=False) if job_key(t) == key and t.state != TrialState.FAIL
        )
        if first != trial.number or key in done:
            trial.set_user_attr(SURPLUS, True)
            study.tell(trial, state=TrialState.FAIL)
            continue
        with worker.beating(trial):
            outcome = _run_one(lambda t, key=key: run_job(t, key), trial)
        if outcome is not None:
            study.tell(trial, outcome[1], state=outcome[0])
