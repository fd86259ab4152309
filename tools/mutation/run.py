"""Run a cosmic-ray session in batches, each batch one job under the machine-wide lock (the two cores are
shared: a locked job is kept to a few minutes, and a lock taken per mutant would wait behind every other
job once per mutant). Run from the checkout being mutated (a separate one: cosmic-ray edits its files),
after `cosmic-ray init` (the first batch checks that the tests pass unmutated) (and tools/mutation/sample.py,
if the run is a sample):

    .venv/bin/python tools/mutation/run.py CONFIG.toml SESSION.sqlite [BATCH]

Each batch: every pending mutant but the next BATCH is marked deferred, `flock /tmp/cpu.lock cosmic-ray
exec` runs the batch (the config's test-command takes no lock itself), the deferred ones are made pending
again. The locked seconds of each batch are printed and summed (the run's cost on the shared machine)."""

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import tomllib
from cosmic_ray.work_db import use_db
from cosmic_ray.work_item import WorkerOutcome, WorkResult

DEFERRED = "deferred to a later batch"
config, session = sys.argv[1], sys.argv[2]
batch = int(sys.argv[3]) if len(sys.argv) > 3 else 25
cosmic_ray = str(Path(sys.executable).parent / "cosmic-ray")


def undefer():
    with sqlite3.connect(session) as db:  # WorkDB has no call that clears a result
        db.execute("DELETE FROM work_results WHERE output = ?", (DEFERRED,))


undefer()  # a batch that failed leaves none deferred, but an interrupted run may
test_command = tomllib.loads(Path(config).read_text())["cosmic-ray"]["test-command"]
total, first = 0.0, True
while True:
    with use_db(session) as db:
        jobs = sorted(item.job_id for item in db.pending_work_items)
        if not jobs:
            break
        if jobs[batch:]:
            db.set_multiple_results(jobs[batch:], WorkResult(output=DEFERRED, worker_outcome=WorkerOutcome.SKIPPED))
    # the first batch runs the tests on the unmutated code first: a selection that fails there kills everything
    baseline = f"{test_command} >/dev/null || {{ echo 'the tests fail unmutated' >&2; exit 3; }}; " if first else ""
    first = False
    script = (
        f'start=$(date +%s.%N); uptime >&2; {baseline}{cosmic_ray} exec {config} {session}; rc=$?; '
        'echo "$(date +%s.%N) - $start" | bc >&2; exit $rc'
    )
    run = subprocess.run(["flock", "/tmp/cpu.lock", "sh", "-c", script], stderr=subprocess.PIPE, text=True)
    lines = run.stderr.strip().splitlines()
    undefer()
    if run.returncode:
        sys.exit(f"batch failed ({run.returncode}): {run.stderr[-2000:]}")
    locked = float(lines[-1])
    total += locked
    print(
        f"{time.strftime('%H:%M:%S')} batch of {min(batch, len(jobs))}: {locked:.0f} s locked "
        f"({lines[0].strip() if lines else ''}); "
        f"{len(jobs) - min(batch, len(jobs))} left",
        flush=True,
    )
print(f"total locked: {total:.0f} s")
