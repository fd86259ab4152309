"""Helpers the benchmark scripts share: interleaved repeats, medians, whole-process time and memory.

Every figure a script prints is a ratio of two things measured in turns in the same run (order
rotating each round), so a machine shared with other jobs slows both sides alike; medians, not
means, so one stall does not decide the result.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Mapping

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
RETROFIT = [PYTHON, "-m", "retrofit"]


def interleaved(jobs: Mapping[str, Callable[[], object]], runs: int, setup: Callable[[str], object] | None = None,
                warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each job, ``runs`` times, in rotating order. ``setup(name)`` runs before each timed
    call, untimed (a fresh model, say); its result is passed to the job if the job takes an argument."""
    names = list(jobs)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for i in range(warmup + runs):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            arg = setup(name) if setup is not None else None
            t = time.perf_counter()
            jobs[name](arg) if setup is not None else jobs[name]()
            if i >= warmup:
                samples[name].append(time.perf_counter() - t)
            del arg
    return samples


def process(cmd: list[str]) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (user + system: what the process itself spent, less sensitive to
    other jobs than wall time) and peak resident memory (bytes) of one process run to completion."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    err = proc.stderr.read().decode()
    proc.stderr.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {err.strip()[-500:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024  # Linux reports kilobytes


def processes(cmds: Mapping[str, list[str]], runs: int):
    """Wall times and CPU times (rotating order, ``runs`` rounds) and the largest peak memory of each
    command: ``(wall, cpu, peak)``, dicts by name."""
    names = list(cmds)
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    peak = {n: 0 for n in names}
    for i in range(runs):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            wall, used, rss = process(cmds[name])
            times[name].append(wall)
            cpu[name].append(used)
            peak[name] = max(peak[name], rss)
    return times, cpu, peak


def med(xs) -> float:
    return statistics.median(xs)


def spread(xs) -> str:
    return f"median {med(xs):.3f} s (min {min(xs):.3f}, max {max(xs):.3f}, n={len(xs)})"


def verdict(ratio: float, target: float) -> str:
    return f"{'meets' if ratio <= target else 'MISSES'} target <= {target}"
