"""Run a pytest selection against the surviving mutants of a cosmic-ray session, in another checkout (one with
the tests written since): each survivor's diff is applied with `git apply`, the tests run, the diff taken
back. Shows that the new tests kill them (docs/mutation.md). Under the lock, as one job:

    flock /tmp/cpu.lock .venv/bin/python tools/mutation/recheck.py SESSION.sqlite TREE PYTEST-ARGS...

TREE must hold the mutated module as the session's checkout did (the same file, only tests added)."""

import subprocess
import sys

from cosmic_ray.work_db import WorkDB, use_db
from cosmic_ray.work_item import TestOutcome, WorkerOutcome
from pytest_command import PYTEST  # tools/mutation/, this script's folder

session, tree, tests = sys.argv[1], sys.argv[2], sys.argv[3:]
with use_db(session, WorkDB.Mode.open) as db:
    items = {item.job_id: item for item in db.work_items}
    survivors = [
        (job, r)
        for job, r in db.results
        if r.worker_outcome == WorkerOutcome.NORMAL and r.test_outcome == TestOutcome.SURVIVED
    ]
base = subprocess.run([*PYTEST, *tests], cwd=tree, capture_output=True, text=True)
print("unmutated:", "pass" if base.returncode == 0 else "FAIL", "|", base.stdout.strip().splitlines()[-1], flush=True)
for job, result in sorted(survivors, key=lambda s: items[s[0]].mutations[0].start_pos):
    diff = result.diff.split("\n", 1)[1] + "\n"  # past cosmic-ray's "--- mutation diff ---" line
    subprocess.run(["git", "apply", "-"], cwd=tree, input=diff, text=True, check=True)
    try:
        run = subprocess.run([*PYTEST, "-x", *tests], cwd=tree, capture_output=True, text=True, timeout=600)
    finally:
        subprocess.run(["git", "apply", "-R", "-"], cwd=tree, input=diff, text=True, check=True)
    m = items[job].mutations[0]
    failed = [line.split(" - ")[0] for line in run.stdout.splitlines() if line.startswith("FAILED")]
    print(
        job[:8],
        f"line {m.start_pos[0]}",
        m.operator_name,
        "killed" if run.returncode else "survived",
        failed[:1],
        flush=True,
    )
