"""Exactly N trials, or every finish job once, over any number of processes on one store.

Optuna's own recipe for several workers, ``optimize(callbacks=[MaxTrialsCallback(N)])`` in each, runs more
than N trials: the callback counts after a trial ends, so a worker starts one while another's last is still
running (9 trials for 8 with two workers in the design's test). Here the slots go by trial number:

1. before ``ask()``: dead processes' trials are failed and retried (:func:`.workers.fail_stale`); stop when N
   trials count; when the counted and running ones already fill N and nothing waits, wait (one of the
   running ones may die and need a replacement);
2. after ``ask()``: if N counted-or-running trials have a lower number, this one lost the race for the
   last slot: it is told FAIL as ``retrofit:surplus`` before any parameter is drawn (a retry it popped is
   queued again).

A trial *counts* when it is COMPLETE or PRUNED by the pruner; one over the limits or a duplicate of a
finished recipe trains nothing and does not count (``retrofit:uncounted``). ``--budget`` adds two stops: the
training epochs of the whole study (a running trial reserves all of its epochs), or this process's wall
time. The finish runs as a job queue in a second study of the same store (:func:`run_jobs`), so every
process ends with the same table, built from the store.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from .workers import RETRY_OF, SURPLUS, UNCOUNTED, Worker, fail_stale

POLL = 0.5  # seconds between looks at the store while the other processes' trials run


class TrialFailed(Exception):
    """A trial that failed for a reason of its own (its fine-tune raised): FAIL, and the search goes on."""


def counted(t) -> bool:
    return t.state in (TrialState.COMPLETE, TrialState.PRUNED) and not t.user_attrs.get(UNCOUNTED)


def epochs_run(t) -> int:
    return len(t.intermediate_values)


@dataclass
class Budget:
    """When a process stops asking: ``trials`` counted trials, ``epochs`` training epochs in the whole study
    (a running trial reserves its ``trial_epochs``), ``seconds`` of this process's wall time."""

    trials: int | None = None
    epochs: int | None = None
    seconds: float | None = None
    trial_epochs: int = 1
    stall: int = 20  # uncounted trials in a row (duplicates, over the limits) after which the search stops

    def done(self, trials, started: float) -> str | None:
        """Why no trial should start now ('' to wait for the running ones), or None to start one."""
        if self.trials is not None and sum(counted(t) for t in trials) >= self.trials:
            return "trials"
        if self.seconds is not None and time.monotonic() - started >= self.seconds:
            return "time"
        if self.epochs is not None:
            spent = sum(epochs_run(t) for t in trials if t.state != TrialState.RUNNING)
            running = sum(max(self.trial_epochs, epochs_run(t)) for t in trials if t.state == TrialState.RUNNING)
            if spent + running + self.trial_epochs > self.epochs:
                return "epochs" if not running else ""
        if self.trials is not None:
            busy = sum(counted(t) or t.state == TrialState.RUNNING for t in trials)
            if busy >= self.trials and not any(t.state == TrialState.WAITING for t in trials):
                return ""
        return None


def run_trials(study, objective: Callable, budget: Budget, worker: Worker, say=None,
               after: Callable[[int], None] | None = None) -> str:
    """Run trials until ``budget`` says stop; returns why (``trials``, ``epochs``, ``time``, ``stalled``).

    ``objective(trial)`` returns the value, raises ``optuna.TrialPruned`` (PRUNED) or :class:`TrialFailed`
    (FAIL, and on); any other exception fails the trial and is raised. ``after(number)`` is called once each
    trial of this process is told (progress)."""
    started, stalled = time.monotonic(), 0
    while True:
        fail_stale(study, say=say)
        why = budget.done(study.get_trials(deepcopy=False), started)
        if why == "":
            time.sleep(POLL)
            continue
        if why is not None:
            return wait_quiet(study, why, say)
        if stalled >= max(budget.stall, budget.trials or 0):
            return wait_quiet(study, "stalled", say)
        trial = study.ask()
        worker.stamp(trial)
        if _lost_the_race(study, trial, budget.trials):
            continue
        with worker.beating(trial):
            state, value = _run_one(objective, trial)
        study.tell(trial, value, state=state)
        if after is not None:
            after(trial.number)
        stalled = stalled + 1 if trial.user_attrs.get(UNCOUNTED) else 0


def _run_one(objective, trial):
    try:
        return TrialState.COMPLETE, objective(trial)
    except optuna.TrialPruned:
        return TrialState.PRUNED, None
    except TrialFailed:
        return TrialState.FAIL, None
    except BaseException:
        trial.study.tell(trial, state=TrialState.FAIL)
        raise


def _lost_the_race(study, trial, n: int | None) -> bool:
    """A trial with ``n`` counted-or-running trials before it is surplus: failed before any draw (a retry
    it popped goes back into the queue)."""
    if n is None:
        return False
    ahead = sum(1 for t in study.get_trials(deepcopy=False)
                if t.number < trial.number and (counted(t) or t.state == TrialState.RUNNING))
    if ahead < n:
        return False
    trial.set_user_attr(SURPLUS, True)
    fixed = study.get_trials(deepcopy=False)[trial.number].system_attrs.get("fixed_params")
    study.tell(trial, state=TrialState.FAIL)
    if fixed:
        study.enqueue_trial(fixed, user_attrs={k: v for k, v in trial.user_attrs.items() if k == RETRY_OF})
    return True


def wait_quiet(study, why: str, say=None) -> str:
    """Wait until no trial runs (other processes' ones finish or die), so every process then reads the same
    finished study; returns ``why``."""
    while True:
        fail_stale(study, say=say)
        if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            return why
        time.sleep(POLL)


# -- the finish: every job once ----------------------------------------------------------------------
JOB = "job"  # the one parameter of a job trial: its key


def job_key(t) -> str | None:
    return t.system_attrs.get("fixed_params", {}).get(JOB) or t.params.get(JOB)


def run_jobs(study, keys: list[str], run_job: Callable, worker: Worker, say=None) -> dict[str, object]:
    """Run every job of ``keys`` once over all processes; returns ``{key: its COMPLETE trial}`` once all are
    done (the same on every process). Each process enqueues the keys not yet present (one log line each, so
    atomic); when two enqueued the same key, the lower trial number is the job and a higher one popped is
    surplus. ``run_job(trial, key)`` returns the job's value (and may set user attrs on the trial); a run that
    fails must be a value too (with its reason in a user attr), or it would be queued for ever."""
    dist = {JOB: CategoricalDistribution(sorted(keys))}
    present = {job_key(t) for t in study.get_trials(deepcopy=False) if t.state != TrialState.FAIL}
    for k in keys:
        if k not in present:
            study.enqueue_trial({JOB: k})
    while True:
        fail_stale(study, say=say)
        trials = study.get_trials(deepcopy=False)
        done = {job_key(t): t for t in trials if t.state == TrialState.COMPLETE}
        if all(k in done for k in keys):
            return {k: done[k] for k in keys}
        if not any(t.state == TrialState.WAITING and job_key(t) in keys for t in trials):
            time.sleep(POLL)  # the others' running jobs; one may die and come back
            continue
        trial = study.ask(fixed_distributions=dist)
        worker.stamp(trial)
        key = trial.params[JOB]
        first = min(t.number for t in study.get_trials(deepcopy=False)
                    if job_key(t) == key and t.state != TrialState.FAIL)
        if first != trial.number or key in done:
            trial.set_user_attr(SURPLUS, True)
            study.tell(trial, state=TrialState.FAIL)
            continue
        with worker.beating(trial):
            state, value = _run_one(lambda t: run_job(t, key), trial)  # noqa: B023 (called here, in this iteration)
        study.tell(trial, value, state=state)
