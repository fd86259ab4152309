"""Keep a seeded random sample of a cosmic-ray session's pending mutants and mark the rest skipped, when a
module has more mutants than the time of a run allows (docs/mutation.md says which runs are samples):

    .venv/bin/python tools/mutation/sample.py SESSION.sqlite N SEED

Run after `cosmic-ray init`, before `cosmic-ray exec`. The sample is drawn from the job ids sorted, so the
same session, N and seed give the same mutants."""

import random
import sys

from cosmic_ray.work_db import use_db
from cosmic_ray.work_item import WorkerOutcome, WorkResult

session, n, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with use_db(session) as db:
    jobs = sorted(item.job_id for item in db.pending_work_items)
    kept = set(random.Random(seed).sample(jobs, min(n, len(jobs))))
    skipped = [job for job in jobs if job not in kept]
    if skipped:
        db.set_multiple_results(skipped, WorkResult(output="not in the sample", worker_outcome=WorkerOutcome.SKIPPED))
print(f"{len(kept)} of {len(jobs)} mutants kept (seed {seed})")
