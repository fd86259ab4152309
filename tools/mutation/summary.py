"""One line of counts for a cosmic-ray session (the table of docs/mutation.md), then each surviving mutant's
diff: `.venv/bin/python tools/mutation/summary.py SESSION.sqlite`. Mutants outside a sample (skipped) are not
counted; the kill rate is killed / (killed + survived), timeouts counted as killed, as cosmic-ray does (a
test run ended by the config's `timeout` is told from a failure by pytest's missing summary line)."""

import re
import sys
from collections import Counter

from cosmic_ray.work_db import WorkDB, use_db
from cosmic_ray.work_item import TestOutcome, WorkerOutcome

with use_db(sys.argv[1], WorkDB.Mode.open) as db:
    items = {item.job_id: item for item in db.work_items}
    results = dict(db.results)
counts, survivors = Counter(), []
for job_id, result in results.items():
    if result.worker_outcome == WorkerOutcome.SKIPPED:
        counts["skipped"] += 1
    elif result.worker_outcome != WorkerOutcome.NORMAL:
        counts[result.worker_outcome.value] += 1  # exception, abnormal (cosmic-ray's own failures)
    elif result.test_outcome == TestOutcome.INCOMPETENT:
        counts["incompetent"] += 1
    elif result.test_outcome == TestOutcome.KILLED:
        # cosmic-ray's own timeout says "timeout"; the config's `timeout 120` ends pytest before its summary line
        ended = re.search(r" in [0-9.]+s", result.output or "")
        counts["killed" if ended and result.output != "timeout" else "timeout"] += 1
    else:
        counts["survived"] += 1
        survivors.append((items[job_id], result))
pending = len(items) - len(results)
done = counts["killed"] + counts["timeout"] + counts["survived"]
rate = f"{100 * (counts['killed'] + counts['timeout']) / done:.1f}%" if done else "-"
other = sum(v for k, v in counts.items() if k not in ("killed", "survived", "incompetent", "timeout", "skipped"))
print(
    f"mutants {len(items)}, run {done + counts['incompetent']}, killed {counts['killed']}, survived "
    f"{counts['survived']}, incompetent {counts['incompetent']}, timeout {counts['timeout']}, skipped "
    f"{counts['skipped']}, pending {pending}, other {other}: kill rate {rate}"
)
for item, result in sorted(survivors, key=lambda s: (str(s[0].mutations[0].module_path), s[0].mutations[0].start_pos)):
    m = item.mutations[0]
    print(f"\n--- survivor {item.job_id[:8]} {m.module_path}:{m.start_pos[0]} {m.operator_name} #{m.occurrence}")
    print(
        "\n".join(
            line for line in (result.diff or "").splitlines() if line[:1] in "+-" and line[:3] not in ("+++", "---")
        )
    )
