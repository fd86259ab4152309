"""The study plumbing of `retrofit tune` without training: the journal store and its lock, the claim of the
last slot, dead workers' trials (on this machine, on another, on a journal and on a PostgreSQL server, on one
clock), their capped retries, the per-trial seeding, Hyperband's first bracket, budgets."""

import json
import time

import optuna
import pytest
from optuna.trial import TrialState

from retrofit.sweep.tune import workers as workers_module
from retrofit.sweep.tune.api import parse_budget
from retrofit.sweep.tune.claim import Budget, _lost_the_race, counted, run_jobs, run_trials
from retrofit.sweep.tune.report import trial_row
from retrofit.sweep.tune.sampling import TrialSeededSampler, init_pruner, make_pruner
from retrofit.sweep.tune.storage import FlockLock, StorageError, open_storage
from retrofit.sweep.tune.workers import BEAT, SURPLUS, WORKER, Requeue, Worker

optuna.logging.set_verbosity(optuna.logging.WARNING)


def study(path, name="s", **kw):
    return optuna.create_study(
        storage=open_storage(path), study_name=name, direction="maximize", load_if_exists=True, **kw
    )


def test_a_torn_last_line_is_cut_under_the_lock_and_the_journal_stays_readable(tmp_path):
    """A writer killed inside its write leaves a line without its newline; Optuna would merge the next append
    with it and every later read would fail (the design's q5c)."""
    path = tmp_path / "j.journal"
    s = study(path)
    s.enqueue_trial({"x": 1.0})
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"op_code": 4, "worker_id": "dead", "tri')  # a torn tail
    s2 = study(path)
    s2.enqueue_trial({"x": 2.0})  # the append after the cut
    assert path.read_bytes().startswith(whole) and b'"dead"' not in path.read_bytes()
    assert [t.system_attrs["fixed_params"] for t in study(path).trials] == [{"x": 1.0}, {"x": 2.0}]
    lock = FlockLock(str(path))
    lock.acquire()
    lock.release()
    assert not (tmp_path / "j.journal.lock").exists()  # no lock file a dead process could leave behind


def test_a_file_that_is_not_a_journal_is_refused_and_left_alone(tmp_path):
    for content in (b"hello\n", b"\x00\x01binary", b'{"a": 1}\n'):
        path = tmp_path / "f"
        path.write_bytes(content)
        with pytest.raises(StorageError, match="not an Optuna journal file"):
            open_storage(path)
        assert path.read_bytes() == content
    with pytest.raises(StorageError, match="it is a folder"):
        open_storage(tmp_path)


def test_two_workers_asking_for_the_last_slot_run_one_trial(tmp_path):
    """Forced interleaving (two storages on one file): both see 1 free slot and ask; the later number is
    surplus, failed before any draw. Optuna's MaxTrialsCallback counts only after a trial ends."""
    path = tmp_path / "j.journal"
    a, b = study(path), study(path)
    ta, tb = a.ask(), b.ask()
    assert not _lost_the_race(a, ta, Budget(trials=1))
    ta.suggest_float("x", 0, 1)
    a.tell(ta, 1.0)
    assert _lost_the_race(b, tb, Budget(trials=1))
    trials = study(path).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL]
    assert trials[1].user_attrs[SURPLUS] and trials[1].params == {}
    assert sum(counted(t) for t in trials) == 1


def on_store(tmp_path, store, name="s", grace=(1, 2), **kw):
    """A study on the journal in ``tmp_path`` (``store`` None) or on a PostgreSQL database, opened as the
    tune opens it (an RDB with Optuna's heartbeat: ``grace`` = (interval, grace period) in seconds)."""
    requeue = Requeue()
    storage = open_storage(store or tmp_path / "j.journal", heartbeat=grace, on_stale=requeue)
    return (
        optuna.create_study(storage=storage, study_name=name, direction="maximize", load_if_exists=True, **kw),
        storage,
        requeue,
    )


def other_machine(tmp_path, storage, requeue, monkeypatch, **kw):
    """A Worker that this machine's workers see as another machine's (its boot id differs)."""
    with monkeypatch.context() as m:
        m.setattr(workers_module, "boot_id", lambda: "another-machine")
        return Worker(tmp_path / "elsewhere", storage, requeue, **kw)


def test_a_trial_of_another_machine_on_a_journal_is_dead_once_its_stamp_stays_the_same_for_the_grace_period(
    tmp_path, monkeypatch
):
    """Judged on the observer's own clock: a stamp 10 minutes old by the observer's clock (the writer's clock
    behind) is not dead while it changes; one that stops changing is, after the grace period."""
    s, storage, requeue = on_store(tmp_path, None)
    there = other_machine(tmp_path, storage, requeue, monkeypatch)
    here = Worker(tmp_path / "workers", storage, requeue, grace=0.5)
    t = s.ask()
    t.suggest_float("x", 0, 1)
    there.stamp(t)
    t.set_user_attr(BEAT, time.time() - 600)  # what a clock 10 minutes behind would have stamped before
    assert here.fail_stale(s) == []  # first seen now: alive, whatever its stamp says
    time.sleep(0.3)
    t.set_user_attr(BEAT, time.time() - 590)  # a heartbeat: the stamp changed
    time.sleep(0.3)
    assert here.fail_stale(s) == []  # 0.6 s since first seen, but only 0.3 s since its last change
    time.sleep(0.6)
    assert here.fail_stale(s) == [0]  # no change for the grace period: its process is gone
    trials = s.trials
    assert trials[0].state == TrialState.FAIL and trials[1].state == TrialState.WAITING
    assert trials[1].params == trials[0].params and trials[1].system_attrs["failed_trial"] == 0
    assert WORKER not in trials[1].user_attrs and BEAT not in trials[1].user_attrs  # not born dead
    here.close()


def test_on_postgresql_a_trial_of_another_machine_is_judged_by_the_servers_clock(tmp_path, pg_url, monkeypatch):
    """Optuna's RDB heartbeat stores the server's now() and compares it with the server's now(): a writer or
    an observer whose clock is an hour off, or whose session has another time zone, changes nothing."""
    s, storage, requeue = on_store(tmp_path, pg_url)
    monkeypatch.setenv("PGTZ", "Asia/Tokyo")  # libpq sends it as the session's time zone
    there = other_machine(tmp_path, storage, requeue, monkeypatch)
    t = s.ask()
    t.suggest_float("x", 0, 1)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() - 3600)  # the writer's clock an hour behind
    there.stamp(t)
    monkeypatch.setattr(time, "time", lambda: real() + 3600)  # the observer's an hour ahead
    monkeypatch.setenv("PGTZ", "America/New_York")
    s2, storage2, requeue2 = on_store(tmp_path, pg_url)
    here = Worker(tmp_path / "workers", storage2, requeue2)
    assert here.fail_stale(s2) == []  # beaten 0 s ago by the server's clock
    with there.beating(t):
        time.sleep(3)
        assert here.fail_stale(s2) == []  # beating every second, grace 2 s: alive
    time.sleep(2.5)  # no heartbeat for more than the grace period, by the server's clock
    assert here.fail_stale(s2) == [0]
    assert s2.trials[1].state == TrialState.WAITING and s2.trials[1].system_attrs["failed_trial"] == 0
    here.close()


def test_a_trial_on_this_machine_is_dead_exactly_when_its_workers_lock_is_free(tmp_path):
    s, storage, requeue = on_store(tmp_path, None)
    worker = Worker(tmp_path / "workers", storage, requeue)
    observer = Worker(tmp_path / "workers", storage, requeue)
    t = s.ask()
    worker.stamp(t)
    assert t.user_attrs[WORKER]["boot"] == observer.boot
    assert not observer.is_dead(s, s.trials[0])  # its lock is held: alive, however old its heartbeat
    worker.close()
    assert observer.is_dead(s, s.trials[0])
    observer.close()
    assert not list((tmp_path / "workers").iterdir())


@pytest.mark.parametrize("store", ["journal", "postgres"], indirect=True)
def test_a_recipe_whose_process_keeps_dying_is_retried_twice_then_failed_for_good(tmp_path, store):
    """Optuna's RetryHeartbeatStaleTrialCallback(max_retry=2) is the model: the retries carry failed_trial and
    retry_history, and the third death is the last, reported with its reason; no retry without end."""
    s, storage, requeue = on_store(tmp_path, store)
    observer = Worker(tmp_path / "workers", storage, requeue)
    lines = []
    for death in range(4):  # noqa: B007 - read after the loop: the try that failed for good
        doomed = Worker(tmp_path / "workers", storage, requeue)  # a process the OOM killer takes each time
        t = s.ask()
        doomed.stamp(t)
        t.suggest_categorical("r", [4, 16])
        doomed.close()
        observer.fail_stale(s, say=lines.append)
        if not [x for x in s.trials if x.state == TrialState.WAITING]:
            break
    trials = s.trials
    assert [x.state for x in trials] == [TrialState.FAIL] * 3 and death == 2
    assert len({x.params["r"] for x in trials}) == 1  # the same recipe each time
    assert [x.system_attrs.get("retry_history", []) for x in trials] == [[], [0], [0, 1]]
    assert [x.system_attrs.get("failed_trial") for x in trials] == [None, 0, 0]
    assert lines == [
        "[trial 0] its process is gone; marked failed, its recipe queued again",
        "[trial 1] its process is gone; marked failed, its recipe queued again",
        "[trial 2] its process is gone; marked failed for good (see trials.jsonl)",
    ]
    row = trial_row(trials[2], 1)
    assert row["state"] == "failed" and row["retry_of"] == 0
    assert row["reason"] == "its process died 3 times (trials 0, 1, 2); not retried again"
    observer.close()


def test_seeded_per_trial_one_process_repeats_itself_and_two_do_not_share_draws(tmp_path):
    def draws(path, n):
        s = study(path, sampler=TrialSeededSampler(lambda seed: optuna.samplers.RandomSampler(seed=seed), 7))
        out = []
        for _ in range(n):
            t = s.ask()
            out.append((t.suggest_float("x", 0, 1), t.suggest_categorical("r", ["off", 4, 8, 16, 32])))
            s.tell(t, out[-1][0])
        return out

    first, again = draws(tmp_path / "a", 6), draws(tmp_path / "b", 6)
    assert first == again  # reproducible from (seed, trial number)
    assert len({x for x, _ in first}) == 6
    shared = tmp_path / "c"  # two processes on one study: each trial number once, so no two draws alike
    s1 = study(shared, sampler=TrialSeededSampler(lambda seed: optuna.samplers.RandomSampler(seed=seed), 7))
    s2 = study(shared, sampler=TrialSeededSampler(lambda seed: optuna.samplers.RandomSampler(seed=seed), 7))
    t1, t2 = s1.ask(), s2.ask()
    assert t1.suggest_float("x", 0, 1) == first[0][0] and t2.suggest_float("x", 0, 1) == first[1][0]


def test_hyperband_is_placed_before_its_first_trial(tmp_path):
    """A fresh HyperbandPruner puts every trial in bracket 0 until its first prune(); a resumed or second
    process would otherwise sample its first trial against the wrong history."""
    pruner = make_pruner("hyperband", 9)  # 9 epochs, eta 3: 3 brackets
    s = study(tmp_path / "j.journal", pruner=pruner)
    assert pruner._n_brackets is None
    init_pruner(s, pruner)
    assert pruner._n_brackets == 3
    assert isinstance(make_pruner("sha", 1), optuna.pruners.NopPruner)  # one epoch: nothing to stop early


def test_run_trials_counts_pruned_trials_and_stops_at_the_epoch_budget(tmp_path):
    s, storage, requeue = on_store(tmp_path, None)
    worker = Worker(tmp_path / "workers", storage, requeue)

    def objective(trial):
        x = trial.suggest_int("x", 0, 1000)
        trial.report(float(x), 1)
        if x % 2:
            raise optuna.TrialPruned()
        trial.report(float(x), 2)
        return float(x)

    assert run_trials(s, objective, Budget(trials=5, trial_epochs=2), worker) == "trials"
    assert sum(counted(t) for t in s.trials) == 5 and len(s.trials) == 5
    spent = sum(len(t.intermediate_values) for t in s.trials)
    assert run_trials(s, objective, Budget(epochs=spent + 4, trial_epochs=2), worker) == "epochs"
    assert spent + 3 <= sum(len(t.intermediate_values) for t in s.trials) <= spent + 4  # no trial past the budget
    worker.close()


@pytest.mark.parametrize("store", ["journal", "postgres"], indirect=True)
def test_every_job_runs_once_and_a_failed_one_is_a_value(tmp_path, store):
    s, storage, requeue = on_store(tmp_path, store, name="s:final", sampler=optuna.samplers.RandomSampler(0))
    worker = Worker(tmp_path / "workers", storage, requeue)
    ran = []

    def job(trial, key):
        ran.append(key)
        trial.set_user_attr("result", json.loads(key))
        return float(json.loads(key)["seed"])

    keys = [json.dumps({"seed": i}) for i in range(4)]
    done = run_jobs(s, keys, job, worker)
    assert sorted(ran) == sorted(keys) and {k: t.value for k, t in done.items()} == {
        k: float(i) for i, k in enumerate(keys)
    }
    assert run_jobs(s, keys, job, worker) and len(ran) == 4  # all done: nothing runs again
    worker.close()


@pytest.mark.parametrize(
    "text, want",
    [
        ("60", Budget(epochs=60, trial_epochs=2)),
        ("2h", Budget(seconds=7200, trial_epochs=2)),
        ("90s", Budget(seconds=90, trial_epochs=2)),
    ],
)
def test_budgets(text, want):
    assert parse_budget(text, None, 2) == want
