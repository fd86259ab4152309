"""Does a second worker process speed up `retrofit tune`, on a PostgreSQL server and on the journal?

The same study (the same command, space, seed and ``--trials``) is run with 1 and with 2 worker processes
started at once, on each store: a PostgreSQL server (a throwaway one on 127.0.0.1, as the test suite starts
it, ``tests/postgres.py``; or ``--storage URL`` of your own, each run in a fresh study) and the journal file
(the workers share one output folder). The machine's cores are split between the workers (``torch`` threads =
cores / workers), so both rows use the same machine. Printed, side by side from one run: the wall time from
the start to the last worker's end (median over ``--rounds``, the four configurations in rotating order each
round), the counted trials and the training epochs, and trials and epochs per minute, with the ratio to one
worker on the same store; then the machine's state. On a machine with few cores expect little gain: the
workers share the cores, and each starts the same Python, torch and model scan.

Every trial runs its full epochs (``--pruner none``), so trials and epochs are comparable between the rows.
The data is the test suite's toy ImageFolder (``tests/support.py``: noise plus a bright channel per class,
32x32), larger: 40 train and 10 val images per class of 3, on ``test_resnet`` with random weights of the
search seed.

Run: ``python benchmarks/tune_workers.py`` (needs ``pip install -c constraints.txt -e '.[test]'`` and
PostgreSQL's ``initdb``, or ``--storage URL``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the suite's toy data and throwaway server: one definition of each


def command(data: Path, out: Path, trials: int, epochs: int, storage: str | None, study: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "retrofit",
        "tune",
        "test_resnet",
        "--num-classes",
        "3",
        "--input-size",
        "3,32,32",
        "--data",
        str(data),
        "-r",
        "off,4,8,16",
        "--per-stage",
        "--position",
        "identity,post",
        "--epochs",
        str(epochs),
        "--trials",
        str(trials),
        "--pruner",
        "none",
        "--finalists",
        "0",
        "-b",
        "8",
        "--lr",
        "1e-2",
        "-j",
        "0",
        "-o",
        str(out),
        "--study",
        study,
        *(["--storage", storage] if storage else []),
    ]


def run(data: Path, root: Path, workers: int, trials: int, epochs: int, storage: str | None) -> dict:
    """One new study (a name of its own) with ``workers`` processes started at once; wall seconds, counted
    trials, epochs."""
    import optuna

    from retrofit.sweep.tune.storage import open_storage

    threads = str(max(1, (os.cpu_count() or 1) // workers))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    outs = [root / (f"w{i}" if storage else "shared") for i in range(workers)]
    study = f"bench-{uuid.uuid4().hex[:8]}"
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            command(data, out, trials, epochs, storage, study),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for out in outs
    ]
    errors = [p.communicate()[1] for p in procs]
    wall = time.perf_counter() - start
    for p, err in zip(procs, errors):
        if p.returncode != 0:
            raise SystemExit(f"a worker failed ({p.returncode}): {err.strip()[-800:]}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    found = optuna.load_study(study_name=study, storage=open_storage(storage or outs[0] / "study.journal"))
    done = [t for t in found.trials if t.state == optuna.trial.TrialState.COMPLETE and "rows" in t.user_attrs]
    return {"wall": wall, "trials": len(done), "epochs": sum(len(t.intermediate_values) for t in done)}


def machine(server_version: str) -> str:
    import optuna
    import torch

    load = " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "?"
    return (
        f"{datetime.datetime.now().isoformat(timespec='minutes')}, {platform.machine()} "
        f"{platform.processor() or ''} {os.cpu_count()} CPU(s), load average {load} at the end, Python "
        f"{platform.python_version()}, torch {torch.__version__}, optuna {optuna.__version__}, {server_version}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--storage", help="a PostgreSQL URL of your own (each run makes a new study in it)")
    args = parser.parse_args()

    from support import make_folder

    with tempfile.TemporaryDirectory(prefix="tune-workers-") as tmp:
        tmp = Path(tmp)
        data = make_folder(tmp / "data", train=40, val=10)
        server = None
        if args.storage is None:
            from postgres import Postgres, find_bin

            bindir = find_bin()
            if bindir is None:
                raise SystemExit("no PostgreSQL initdb here: apt-get install postgresql, or give --storage URL")
            server = Postgres(bindir)
            server.start()
        try:
            version = (
                subprocess.run(
                    [os.path.join(server.bindir, "postgres"), "--version"], capture_output=True, text=True
                ).stdout.strip()
                if server
                else "PostgreSQL at --storage"
            )
            url = server.database() if server else args.storage
            configs = [(store, n) for store in ("postgres", "journal") for n in (1, 2)]
            samples: dict[tuple[str, int], list[dict]] = {c: [] for c in configs}
            for r in range(args.rounds):
                for store, n in configs[r % len(configs) :] + configs[: r % len(configs)]:
                    root = tmp / f"{store}-{n}-{r}"
                    root.mkdir()
                    samples[(store, n)].append(
                        run(data, root, n, args.trials, args.epochs, url if store == "postgres" else None)
                    )
            report(samples, args, machine(version))
        finally:
            if server is not None:
                server.stop()
                server.remove()


def report(samples: dict, args, state: str) -> None:
    print(
        f"retrofit tune, the same study ({args.trials} trials of {args.epochs} epochs, test_resnet 32x32, "
        f"pruner none) with 1 and 2 worker processes; median of {args.rounds} rounds"
    )
    print(
        f"{'store':<10} {'workers':>7} {'wall s':>8} {'trials':>7} {'epochs':>7} {'trials/min':>11} "
        f"{'epochs/min':>11} {'vs 1 worker':>12}"
    )
    base = {}
    for (store, n), runs in samples.items():
        wall = statistics.median(r["wall"] for r in runs)
        trials, epochs = runs[0]["trials"], runs[0]["epochs"]
        per_min = (60 * trials / wall, 60 * epochs / wall)
        base.setdefault(store, per_min)
        print(
            f"{store:<10} {n:>7} {wall:>8.1f} {trials:>7} {epochs:>7} {per_min[0]:>11.2f} {per_min[1]:>11.2f} "
            f"{per_min[1] / base[store][1]:>11.2f}x"
        )
    print(state)


if __name__ == "__main__":
    main()
