"""Which process runs which trial, and what happens to the trials of a process that died.

Optuna 5.1 leaves a trial whose process was killed RUNNING for ever on a journal store: ``JournalStorage`` is
no ``BaseHeartbeat``, ``optuna.storages.fail_stale_trials`` does nothing there, and the RDB heartbeat works
only inside ``study.optimize`` (which cannot run exactly N trials over several processes, see
:mod:`.claim`). So liveness is kept here, the same way on every store:

* each process holds an ``flock`` on its own file ``OUT/workers/<host>.<pid>.<id>.lock``, which the kernel
  releases when the process dies; a trial it runs carries ``retrofit:worker`` (host, pid, the lock's path);
* a thread stamps ``retrofit:heartbeat`` on the running trial every 30 s, for processes on other machines;
* a RUNNING trial is dead when its lock can be taken (same host), or when its heartbeat is older than the
  grace period (120 s; another host). Any process may then tell it FAIL (``study.tell`` on its number; the
  store orders the writes, so of two processes one wins) and the winner enqueues a retry with the same
  parameters, so the recipe is not lost.
"""
from __future__ import annotations

import fcntl
import os
import socket
import threading
import time
import uuid
from pathlib import Path

import optuna
from optuna.trial import TrialState

WORKER = "retrofit:worker"        # user attr: {"host", "pid", "lock"} of the process running the trial
BEAT = "retrofit:heartbeat"       # user attr: unix time of its last heartbeat
RETRY_OF = "retrofit:retry_of"    # user attr of a re-enqueued trial: the number of the dead one
SURPLUS = "retrofit:surplus"      # user attr: a trial that lost the race for the last slot (FAIL, not shown)
UNCOUNTED = "retrofit:uncounted"  # user attr: a trial that does not count towards --trials (limits, duplicate)
GRACE = 120.0                     # seconds without a heartbeat before a trial of another host is dead
INTERVAL = 30.0                   # seconds between heartbeats


class Worker:
    """This process in the study: its lock file (held until :meth:`close`) and the heartbeat of its trial."""

    def __init__(self, lock_dir: Path, interval: float = INTERVAL):
        lock_dir = Path(lock_dir).absolute()
        lock_dir.mkdir(parents=True, exist_ok=True)
        self.host = socket.gethostname()
        self.path = lock_dir / f"{self.host}.{os.getpid()}.{uuid.uuid4().hex[:8]}.lock"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        self.interval = interval

    def stamp(self, trial) -> None:
        """Mark ``trial`` as this process's."""
        trial.set_user_attr(WORKER, {"host": self.host, "pid": os.getpid(), "lock": str(self.path)})
        trial.set_user_attr(BEAT, time.time())

    def beating(self, trial) -> Heartbeat:
        return Heartbeat(trial, self.interval)

    def close(self) -> None:
        os.close(self.fd)
        self.path.unlink(missing_ok=True)


class Heartbeat:
    """A thread that stamps ``trial`` every ``interval`` seconds while the ``with`` block runs."""

    def __init__(self, trial, interval: float):
        self.trial, self.interval = trial, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.trial.set_user_attr(BEAT, time.time())
            except Exception:  # noqa: BLE001 - a store that failed once: the trial's own writes will say so
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def is_dead(trial, grace: float = GRACE) -> bool:
    """Whether the process of a RUNNING trial is gone (see the module docstring)."""
    info = trial.user_attrs.get(WORKER)
    if info and info.get("host") == socket.gethostname():
        try:
            fd = os.open(info["lock"], os.O_RDWR)
        except FileNotFoundError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # its process holds the lock: alive
        finally:
            os.close(fd)
        return True
    last = trial.user_attrs.get(BEAT)
    if last is None:  # killed between ask() and stamp(): only its start time
        last = trial.datetime_start.timestamp() if trial.datetime_start else time.time()
    return time.time() - last > grace


def fail_stale(study, grace: float = GRACE, say=None) -> list[int]:
    """Tell every RUNNING trial whose process is gone FAIL, enqueue a retry of its parameters (once: the
    process whose FAIL write wins enqueues it) and remove the dead process's lock file. Returns their numbers."""
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not is_dead(t, grace):
            continue
        try:
            study.tell(t.number, state=TrialState.FAIL)
        except (optuna.exceptions.UpdateFinishedTrialError, ValueError):
            continue  # another process failed it first, or it finished meanwhile
        failed.append(t.number)
        lock = (t.user_attrs.get(WORKER) or {}).get("lock")
        if lock and (t.user_attrs.get(WORKER) or {}).get("host") == socket.gethostname():
            Path(lock).unlink(missing_ok=True)
        retried = bool(t.params) and not t.user_attrs.get(SURPLUS)
        if retried:
            study.enqueue_trial(t.params, user_attrs={RETRY_OF: t.user_attrs.get(RETRY_OF, t.number)})
        if say is not None:
            again = ", its recipe queued again" if retried else ""
            say(f"[trial {t.number}] its process is gone; marked failed{again}")
    return failed
