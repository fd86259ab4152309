"""Which process runs which trial, whether it is still alive, and what happens to the trials of one that died.

Optuna 5.1 leaves a trial whose process was killed RUNNING for ever on a journal store (``JournalStorage`` is
no ``BaseHeartbeat``, ``optuna.storages.fail_stale_trials`` does nothing there), and its RDB heartbeat runs
only inside ``study.optimize`` (which cannot run exactly N trials over several processes, see :mod:`.claim`).
So :class:`Worker` keeps liveness, judged on **one clock**, never by comparing two machines' clocks:

* **A trial of this machine**: each process holds an ``flock`` on its own file
  ``OUT/workers/<host>.<pid>.<id>.lock`` (released by the kernel when the process dies, however it dies);
  the trial carries ``retrofit:worker`` (host, boot id, pid, the lock's path), and it is dead exactly when
  its lock can be taken. Immediate and exact, on every store. "This machine" is the same boot id
  (``/proc/sys/kernel/random/boot_id``), not the same host name, which two machines may share.
* **On an RDB store**, a trial of another machine is judged by Optuna's own heartbeat: the storage is opened
  with ``heartbeat_interval`` and ``grace_period``, the trial's process calls ``RDBStorage.record_heartbeat``
  every :data:`INTERVAL` seconds, which stores the database server's ``now()``, and
  ``optuna.storages.fail_stale_trials`` fails the trials whose last heartbeat is older than the grace period
  by the server's ``now()``: both times come from the server's clock.
* **On a journal** (no server), the trial's process bumps a counter ``retrofit:heartbeat`` every
  :data:`INTERVAL` seconds; an observer notes, by its own monotonic clock, when it first saw the counter's
  current value, and the trial is dead once that value has not changed for :data:`GRACE` seconds. Only
  times of the observer's clock are compared, so a fresh observer waits the grace period before failing a
  dead trial of another machine. A RUNNING trial without any stamp (its process died between ``ask()`` and
  the stamp) is judged so on both stores.

A dead trial is told FAIL (the store orders the writes: of two processes trying, one wins) and retried by
Optuna's ``RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)``: a WAITING copy with the same parameters,
``failed_trial`` and ``retry_history`` in its system attrs (:class:`Requeue`; on an RDB it is the storage's
``heartbeat_stale_trial_callback``). A recipe whose process died ``MAX_RETRY + 1`` times (the out-of-memory
killer, say) is not retried again: it stays failed, and its row says why (:func:`gave_up`).
"""

from __future__ import annotations

import copy
import fcntl
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

WORKER = "retrofit:worker"  # user attr: {"host", "boot", "pid", "lock"} of the process running the trial
BEAT = "retrofit:heartbeat"  # user attr (journal): a counter its process bumps every INTERVAL seconds
SURPLUS = "retrofit:surplus"  # user attr: a trial that lost the race for the last slot (FAIL, not shown)
UNCOUNTED = "retrofit:uncounted"  # user attr: a trial that does not count towards --trials (limits, duplicate)
FAILED = "retrofit:failed"  # user attr: a trial whose fine-tune failed (its reason in the attr "reason")
GRACE = 120  # seconds without a heartbeat before a trial of another machine is dead
INTERVAL = 30  # seconds between heartbeats
MAX_RETRY = 2  # times a trial whose process died is run again (3 tries in all)


def boot_id() -> str:
    """This machine, as long as it runs: the kernel's boot id (the host name where there is none)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return socket.gethostname()


def tries(t) -> int:
    """How many times a trial's recipe has run: this trial and the dead ones it retries."""
    return len(t.system_attrs.get("retry_history", ())) + 1


def retry_of(t) -> int | None:
    """The trial whose dead process this one retries (the first of the series), as Optuna records it."""
    return t.system_attrs.get("failed_trial")


def gave_up(t) -> str | None:
    """Why a FAIL trial is not run again: its process died :data:`MAX_RETRY` + 1 times; None otherwise."""
    if t.state != TrialState.FAIL or t.user_attrs.get(SURPLUS) or tries(t) <= MAX_RETRY:
        return None
    series = [*t.system_attrs.get("retry_history", ()), t.number]
    return f"its process died {len(series)} times (trials {', '.join(map(str, series))}); not retried again"


class Requeue:
    """What happens to a trial whose process died: Optuna's ``RetryHeartbeatStaleTrialCallback(max_retry)``
    (retry history and cap included), given the trial without the dead process's marks (a retry stamped
    with them would look dead before its new process stamps it) and without the pruner's rungs (the retry
    starts from epoch 0, its intermediate values are not inherited). Neither a trial that drew nothing (killed
    right after ``ask()``, nothing fixed) nor a surplus one is retried. Each call is noted in :attr:`failed`
    as ``(number, retried)`` for the progress lines."""

    def __init__(self, max_retry: int = MAX_RETRY):
        self.max_retry = max_retry
        self.retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
        self.failed: list[tuple[int, bool]] = []

    def __call__(self, study, trial) -> None:
        drawn = bool(trial.params) or "fixed_params" in trial.system_attrs
        retried = drawn and not trial.user_attrs.get(SURPLUS) and tries(trial) <= self.max_retry
        if retried:
            clean = copy.deepcopy(trial)
            for key in (WORKER, BEAT):
                clean.user_attrs.pop(key, None)
            for key in [k for k in clean.system_attrs if k.startswith("completed_rung_")]:
                del clean.system_attrs[key]
            self.retry(study, clean)
        self.failed.append((trial.number, retried))


class Worker:
    """This process in the study: its lock file (held until :meth:`close`), the heartbeat of its trial, and
    what it has seen of the other processes' trials (see the module docstring)."""

    def __init__(
        self,
        lock_dir: Path,
        storage=None,
        requeue: Requeue | None = None,
        *,
        interval: float = INTERVAL,
        grace: float = GRACE,
    ):
        lock_dir = Path(lock_dir).absolute()
        lock_dir.mkdir(parents=True, exist_ok=True)
        self.host, self.boot = socket.gethostname(), boot_id()
        self.path = lock_dir / f"{self.host}.{os.getpid()}.{uuid.uuid4().hex[:8]}.lock"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        self.rdb = isinstance(storage, RDBStorage) and storage.heartbeat_interval is not None
        self.storage = storage
        self.requeue = requeue if requeue is not None else Requeue()
        self.interval = storage.heartbeat_interval if self.rdb else interval
        self.grace = grace
        self.seen: dict[tuple[str, int], tuple[Any, float]] = {}  # (study, number) -> (its stamp, first seen)

    def stamp(self, trial) -> None:
        """Mark ``trial`` as this process's, with its first heartbeat."""
        trial.set_user_attr(WORKER, {"host": self.host, "boot": self.boot, "pid": os.getpid(), "lock": str(self.path)})
        self.beat(trial, 0)

    def beat(self, trial, count: int) -> None:
        if self.rdb:
            self.storage.record_heartbeat(trial._trial_id)  # Optuna's own trial id: its heartbeat API takes it
        else:
            trial.set_user_attr(BEAT, count)

    def beating(self, trial) -> Heartbeat:
        return Heartbeat(self, trial)

    def close(self) -> None:
        os.close(self.fd)
        self.path.unlink(missing_ok=True)

    def is_dead(self, study, t) -> bool:
        """Whether the process of the RUNNING trial ``t`` is gone (see the module docstring); an RDB's trials
        of other machines are left to Optuna's heartbeat (False here)."""
        info = t.user_attrs.get(WORKER)
        if info and info.get("boot", info.get("host")) == self.boot:
            return lock_free(info["lock"])
        if info and self.rdb:
            return False
        stamp, now = (repr(info), t.user_attrs.get(BEAT)), time.monotonic()
        key = (study.study_name, t.number)
        if key not in self.seen or self.seen[key][0] != stamp:
            self.seen[key] = (stamp, now)
        return now - self.seen[key][1] > self.grace

    def fail_stale(self, study, say=None) -> list[int]:
        """Tell every RUNNING trial whose process is gone FAIL and retry it (:class:`Requeue`), once: the
        process whose FAIL write wins does it. Returns the numbers this process failed."""
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        self.seen = {
            k: v for k, v in self.seen.items() if k[0] != study.study_name or k[1] in {t.number for t in running}
        }  # forget the finished ones
        for t in running:
            if not self.is_dead(study, t):
                continue
            try:
                study.tell(t.number, state=TrialState.FAIL)
            except (optuna.exceptions.UpdateFinishedTrialError, ValueError):
                continue  # another process failed it first, or it finished meanwhile
            info = t.user_attrs.get(WORKER) or {}
            if info.get("boot", info.get("host")) == self.boot and info.get("lock"):
                Path(info["lock"]).unlink(missing_ok=True)
            self.requeue(study, copy.deepcopy(t))
        if self.rdb:
            optuna.storages.fail_stale_trials(study)  # the server's clock; it calls the same Requeue
        failed, self.requeue.failed = self.requeue.failed, []
        for number, retried in failed:
            if say is not None:
                say(
                    f"[trial {number}] its process is gone; marked failed"
                    + (", its recipe queued again" if retried else " for good (see trials.jsonl)")
                )
        return [number for number, _ in failed]


def lock_free(path: str) -> bool:
    """Whether the lock file of a process of this machine can be taken: its process is gone."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False  # its process holds the lock: alive
    finally:
        os.close(fd)
    return True


class Heartbeat:
    """A thread that beats for ``trial`` every interval while the ``with`` block runs."""

    def __init__(self, worker: Worker, trial):
        self.worker, self.trial = worker, trial
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        count = 0
        while not self._stop.wait(self.worker.interval):
            count += 1
            try:
                self.worker.beat(self.trial, count)
            except Exception:  # noqa: BLE001 - a store that failed once: the trial's own writes will say so
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
