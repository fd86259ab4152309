"""Helpers the benchmark scripts share: interleaved repeats, medians, whole-process time and memory,
and the training step of the tool's phases (``phase1_speed.py`` on CPU, ``gpu.py`` on a GPU).

Every figure a script prints is a ratio of two things measured in turns in the same run (order
rotating each round), so a machine shared with other jobs slows both sides alike; medians, not
means, so one stall does not decide the result.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
RETROFIT = [PYTHON, "-m", "retrofit"]


def interleaved(
    jobs: Mapping[str, Callable[[], object]], runs: int, setup: Callable[[str], object] | None = None, warmup: int = 1
) -> dict[str, list[float]]:
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


# The training arms: each a model with its trainable parameters set by the tool's own
# retrofit.train.params, trained by the tool's own epoch loop (retrofit.train.loop.train_epoch).
# torch, timm and retrofit are imported in the functions (deferred: the process-level benchmarks that
# also use this module need none of them in the parent process).


def build(arm: str, model_name: str, size: int, classes: int, device: str = "cpu", channels_last: bool = False):
    """The model of one arm on ``device`` (in ``channels_last`` memory format if asked), its trainable
    parameters and norm modes set, and its optimizer (timm's AdamW through retrofit.train.optim):

    * ``phase1``: retrofitted (default recipe: standard position, r 16), only the inserted blocks
      trainable, norm layers in eval mode: what ``retrofit finetune`` trains in phase 1 when the head
      already fits the classes (``params.block_params``, ``params.set_modes(frozen_norms=True)``);
    * ``phase2``: the same retrofitted model, everything trainable, norm layers training: phase 2;
    * ``full``: the plain timm model, everything trainable: a full fine-tune without the tool.
    """
    import timm
    import torch

    import retrofit
    from retrofit.train import optim, params

    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=classes)
    if arm != "full":
        model = retrofit.add_se(model, input_size=(3, size, size), inplace=True)
    params.set_trainable(model, params.block_params(model) if arm == "phase1" else None)
    params.set_modes(model, frozen_norms=arm == "phase1")
    model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    optimizer, _ = optim.create(
        model, opt="adamw", lr=1e-4, weight_decay=0.0, sched="cosine", epochs=1, warmup_epochs=0
    )
    return model, optimizer


class Steps(list):
    """Batches of one epoch, each a whole optimizer step: what the loop asks of its loader's batch
    sampler (a step's image count, to weigh each image) is answered from the batch itself."""

    @property
    def batch_sampler(self) -> Steps:
        return self

    def step_images(self, i: int) -> int:
        return len(self[i].targets)


def batches(n: int, batch: int, size: int, classes: int, device: str = "cpu") -> Steps:
    """``n`` batches of random images and labels (seeded), already on ``device``: synthetic data, so
    a step's time is the model's and the optimizer's, not a loader's."""
    import torch

    from retrofit.train.data import Batch

    g = torch.Generator().manual_seed(0)
    return Steps(
        [
            Batch(
                torch.randn(batch, 3, size, size, generator=g).to(device),
                torch.randint(0, classes, (batch,), generator=g).to(device),
                (),
            )
            for _ in range(n)
        ]
    )


def step_fn(model, optimizer, loader, classes: int, device: str = "cpu", channels_last: bool = False):
    """One epoch over ``loader`` by the tool's loop, as a function of no argument: on CUDA under the
    tool's bf16 autocast (``Dist.autocast``), images in ``channels_last`` format if asked; it returns
    when the device has finished (CUDA is synchronised)."""
    import torch

    from retrofit.train.distributed import Dist
    from retrofit.train.loop import train_epoch
    from retrofit.train.loss import Objective
    from retrofit.train.progress import Progress

    objective = Objective(classes, smoothing=0.0, mixup=0.0, cutmix=0.0, distill=0.0, temperature=1.0)
    env = Dist(device=torch.device(device))

    def run():
        train_epoch(
            model,
            model,
            loader,
            optimizer,
            accum=1,
            env=env,
            progress=Progress(False),
            label="",
            seen_bad=set(),
            objective=objective,
            clip_grad=None,
            clip_mode="norm",
            channels_last=channels_last,
        )
        if env.device.type == "cuda":
            torch.cuda.synchronize(env.device)

    return run


def rss_now() -> int:
    """This process's resident memory now (bytes; Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """This process's peak resident memory (bytes): ``VmHWM`` on Linux, else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset the peak resident memory (``VmHWM``) to the current one (Linux ``/proc/self/clear_refs``);
    False where that is not possible (the peak then counts from the process's start)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
