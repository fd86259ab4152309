"""The GPU check: training and inference speed of the retrofit on one GPU, side by side in one run.

One table (markdown, to paste), every figure a rate or a ratio measured in this run, in turns
(benchmarks/common.py: interleaved rounds in rotating order, medians):

1. **Training images/s** of three arms, each trained by the tool's own epoch loop
   (``retrofit.train.loop.train_epoch``, AdamW from timm, synthetic images already on the device) under
   the tool's bf16 autocast on CUDA (float32 on CPU, as the tool trains there), channels_last off and
   on: ``phase 1`` (resnet50 retrofitted with the default recipe, only the SE blocks trainable, norms
   frozen: what ``retrofit finetune`` trains in phase 1, set by ``retrofit.train.params``), ``phase 2``
   (the same model, everything trainable) and ``full fine-tune`` (the plain resnet50, everything);
   phase 1 / full fine-tune.
2. **Peak memory** of one training round of each arm, above what was allocated just before it
   (activations, gradients, the optimizer's temporaries): ``torch.cuda.max_memory_allocated`` on CUDA;
   on CPU the process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) above its
   resident set before, after ``malloc_trim`` has handed freed memory back (rough: the allocator keeps
   pages). And the whole run's peak.
3. **Inference latency** of resnet50 retrofitted with the ``timm`` recipe (fused scale and sum,
   seresnet50's weights loaded) over timm's ``seresnet50``, eager and under ``torch.compile``,
   channels_last off and on, all eight in one interleaved run; compile / eager and channels_last /
   contiguous for the retrofit.
4. **The collective backend**: a spawned ``torch.distributed`` group of one process (and of two when
   two GPUs are visible) joins with nccl and runs an all_reduce of 4 MiB (checked); on CPU gloo.

``--budget-s`` (default 420, under 8 minutes) bounds the run: the timed rounds are as many as the
budget's share allows (at least 3), a compile that would not fit is skipped and said so.
``--small`` is the CPU check of this script in the test suite: resnet18 / seresnet18, batch 4, 64x64,
and ``torch.compile`` with the ``eager`` backend (dynamo's capture only: inductor's C++ build would
take minutes on a CPU).

Run on a GPU machine: ``python benchmarks/gpu.py`` (``--device cuda:1``, ``--budget-s``, ``--batch``,
``--size``). On CPU: ``python benchmarks/gpu.py --device cpu --small``.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import datetime
import gc
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass

START = time.perf_counter()  # the budget counts the imports too

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import batches, build, interleaved, med, peak_rss, reset_peak_rss, rss_now, step_fn  # noqa: E402

ARMS = {
    "phase1": "phase 1 (SE blocks only)",
    "phase2": "phase 2 (retrofit, everything)",
    "full": "full fine-tune (plain model)",
}
FORMATS = {False: "contiguous", True: "channels_last"}
MODES = ("eager", "compile")
MIB = 2**20


@dataclass
class Config:
    device: torch.device
    small: bool
    budget: float
    batch: int
    size: int
    steps: int
    classes: int
    plain: str  # the model retrofitted
    native: str  # timm's own SE model of the same layout
    backend: str  # torch.compile's
    train_rounds: tuple[int, int]  # (fewest, most) timed rounds
    latency_rounds: tuple[int, int]


class Clock:
    """Seconds since the process started (its imports included), against the budget."""

    def __init__(self, budget: float, start: float):
        self.start, self.budget = start, budget

    def used(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget - self.used()


class Table:
    """The rows, in order: ``(what, value, unit, note)``; a value of None is a check that did not give a
    number (failed or skipped), said in its note."""

    def __init__(self):
        self.rows: list[tuple[str, float | None, str, str]] = []

    def add(self, what: str, value: float | None, unit: str, note: str = "") -> None:
        self.rows.append((what, value, unit, note))

    def failed(self) -> list[str]:
        return [what for what, value, _, note in self.rows if value is None and not note.startswith("skipped")]

    def markdown(self) -> str:
        lines = ["| what | value | unit | note |", "| --- | ---: | --- | --- |"]
        for what, value, unit, note in self.rows:
            shown = "-" if value is None else (f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}")
            lines.append(f"| {what} | {shown} | {unit} | {note} |")
        return "\n".join(lines)


def rounds(share_s: float, round_s: float, bounds: tuple[int, int]) -> int:
    """How many timed rounds of ``round_s`` seconds fit in ``share_s``, within ``bounds``."""
    lo, hi = bounds
    return max(lo, min(hi, int(share_s / max(round_s, 1e-9))))


def timed(jobs: dict, share_s: float, bounds: tuple[int, int], warmup: int = 1) -> dict[str, list[float]]:
    """Interleaved seconds of ``jobs``: ``warmup`` untimed rounds, one round to size the run, then as
    many rounds as ``share_s`` allows."""
    probe = interleaved(jobs, runs=1, warmup=warmup)
    n = rounds(share_s, sum(v[0] for v in probe.values()), bounds)
    return interleaved(jobs, runs=n, warmup=0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- memory ----------------------------------------------------------------------------------


class Memory:
    """Peak memory of one call above what was held just before it, and the whole run's peak (bytes)."""

    def __init__(self, device: torch.device):
        self.device, self.overall = device, 0
        self.libc = None
        if device.type == "cpu":
            try:
                self.libc = ctypes.CDLL("libc.so.6")  # glibc's malloc_trim: freed pages back to the system
            except OSError:
                pass

    def _peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else peak_rss()

    def of(self, fn) -> int:
        gc.collect()
        self.overall = max(self.overall, self._peak())
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
        else:
            if self.libc is not None:
                self.libc.malloc_trim(0)
            before = rss_now()
            reset_peak_rss()
        fn()
        sync(self.device)
        peak = self._peak()
        self.overall = max(self.overall, peak)
        return peak - before

    def finish(self) -> int:
        """The whole run's peak (bytes): the peaks seen at each call and the one since the last."""
        self.overall = max(self.overall, self._peak())
        return self.overall

    def what(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated, above memory_allocated before"
        return (
            "the process's peak resident set (VmHWM, reset through /proc/self/clear_refs"
            + (" after malloc_trim" if self.libc else "")
            + ") above its resident set before: rough on CPU"
        )


# ---- 1 and 2: training -----------------------------------------------------------------------


def training(cfg: Config, table: Table, memory: Memory, share_s: float) -> str:
    """Images/s and memory of the three arms, channels_last off and on; returns what trains in each."""
    dev = str(cfg.device)
    built = {
        (arm, cl): build(arm, cfg.plain, cfg.size, cfg.classes, device=dev, channels_last=cl)
        for arm in ARMS
        for cl in FORMATS
    }
    loader = batches(cfg.steps, cfg.batch, cfg.size, cfg.classes, device=dev)
    jobs = {
        key: step_fn(model, opt, loader, cfg.classes, device=dev, channels_last=key[1])
        for key, (model, opt) in built.items()
    }
    counts = {arm: sum(p.numel() for p in built[arm, False][0].parameters() if p.requires_grad) for arm in ARMS}
    for job in jobs.values():  # first steps: cudnn's search, the optimizer's state, the allocator's pools
        job()
    grown = {key: memory.of(job) for key, job in jobs.items()}
    times = timed(jobs, share_s, cfg.train_rounds, warmup=0)  # warm already
    images = cfg.steps * cfg.batch
    ips = {key: images / med(t) for key, t in times.items()}
    n = len(next(iter(times.values())))
    for cl, fmt in FORMATS.items():
        for arm, label in ARMS.items():
            t = times[arm, cl]
            table.add(
                f"train, {label}, {fmt}",
                ips[arm, cl],
                "images/s",
                f"median of {n} rounds of {cfg.steps} step{'s' if cfg.steps > 1 else ''} (min "
                f"{images / max(t):.1f}, max {images / min(t):.1f})",
            )
        table.add(
            f"train, phase 1 / full fine-tune, {fmt}",
            ips["phase1", cl] / ips["full", cl],
            "ratio",
            "images/s over images/s",
        )
    for arm, label in ARMS.items():
        table.add(
            f"train, channels_last / contiguous, {label}",
            ips[arm, True] / ips[arm, False],
            "ratio",
            "images/s over images/s",
        )
    for cl, fmt in FORMATS.items():
        for arm, label in ARMS.items():
            table.add(
                f"memory, one training round, {label}, {fmt}",
                grown[arm, cl] / MIB,
                "MiB",
                "peak above the memory held before the round",
            )
        table.add(f"memory, phase 1 / full fine-tune, {fmt}", grown["phase1", cl] / max(grown["full", cl], 1), "ratio")
    return ", ".join(f"{arm} {counts[arm] / 1e6:.2f} M trainable parameters" for arm in ARMS)


# ---- 3: latency -------------------------------------------------------------------------------


def inference_models(cfg: Config) -> tuple[dict, float]:
    """timm's SE model and the fused retrofit with its weights (randomised, so the blocks matter), each
    contiguous and channels_last; and the retrofit's largest difference from it (float32, eager)."""
    import timm

    import retrofit
    from retrofit.sweep.check import randomize

    torch.manual_seed(0)
    native = randomize(timm.create_model(cfg.native)).eval()
    fused = retrofit.add_se(timm.create_model(cfg.plain), recipe="timm", input_size=(3, cfg.size, cfg.size)).eval()
    fused.load_state_dict(native.state_dict())
    native, fused = native.to(cfg.device), fused.to(cfg.device)
    x = torch.randn(2, 3, cfg.size, cfg.size, device=cfg.device)
    with torch.inference_mode():
        ref = native(x)
        diff = ((fused(x) - ref).abs().max() / ref.abs().max().clamp(min=1)).item()
    models = {}
    for cl in FORMATS:
        fmt = torch.channels_last if cl else torch.contiguous_format
        models[cfg.native, cl] = copy.deepcopy(native).to(memory_format=fmt) if cl else native
        models["retrofit", cl] = copy.deepcopy(fused).to(memory_format=fmt) if cl else fused
    return models, diff


def latency(cfg: Config, clock: Clock, table: Table, share_s: float, reserve_s: float, settle) -> str:
    """Eager and compiled forward latency, all in one interleaved run; returns a note on the outputs.
    ``settle()`` runs after the compiles, before anything is timed."""
    from retrofit.train.distributed import Dist

    models, diff = inference_models(cfg)
    env = Dist(device=cfg.device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(cfg.batch, 3, cfg.size, cfg.size, generator=g).to(cfg.device)
    inputs = {False: x, True: x.contiguous(memory_format=torch.channels_last)}
    run = {("eager", *key): m for key, m in models.items()}
    compiled, notes, worst = {}, {}, 30.0 if cfg.device.type == "cuda" else 5.0
    for key, m in models.items():
        if clock.left() - share_s - reserve_s < worst:
            notes[key] = f"skipped: the budget leaves no time to compile (about {worst:.0f} s each); raise --budget-s"
            continue
        t = time.perf_counter()
        try:
            c = torch.compile(m, backend=cfg.backend)
            with torch.inference_mode(), env.autocast():
                c(inputs[key[1]])
            sync(cfg.device)
        except Exception as err:  # a compile that fails is a finding of this check: said in its row
            notes[key] = (
                f"failed: {type(err).__name__}: {str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}"
            )
            continue
        compiled[key] = time.perf_counter() - t
        worst = max(worst, compiled[key])
        run[("compile", *key)] = c  # a tuple key spelled out: `d[a, *b]` is Python 3.11+, the package says 3.10

    settle()

    def job(m, cl):
        def call():
            m(inputs[cl])
            sync(cfg.device)

        return call

    with torch.inference_mode(), env.autocast():
        times = timed({key: job(m, key[2]) for key, m in run.items()}, share_s, cfg.latency_rounds)
    n = len(next(iter(times.values())))
    ms = {key: med(t) * 1e3 for key, t in times.items()}

    def ratio(what: str, top: tuple, bottom: tuple) -> None:
        """A row of ``ms[top] / ms[bottom]``; without one of them, the row says why (skipped, failed)."""
        gone = [notes.get(key[1:], "failed") for key in (top, bottom) if key not in ms]
        why = (
            ""
            if not gone
            else ("skipped" if all(n.startswith("skipped") for n in gone) else "failed") + ": a row above has no figure"
        )
        table.add(what, None if gone else ms[top] / ms[bottom], "ratio", why)

    for mode in MODES:
        for cl, fmt in FORMATS.items():
            for name in (cfg.native, "retrofit"):
                key = (mode, name, cl)
                if key in ms:
                    compile_note = f"; compiled in {compiled[name, cl]:.1f} s" if mode == "compile" else ""
                    note = f"median of {n} rounds" + compile_note
                else:
                    note = notes.get((name, cl), "failed")
                table.add(f"latency, {name}, {mode}, {fmt}", ms.get(key), "ms / batch", note)
            ratio(f"latency, retrofit / {cfg.native}, {mode}, {fmt}", (mode, "retrofit", cl), (mode, cfg.native, cl))
    for mode in MODES:
        ratio(
            f"latency, channels_last / contiguous, retrofit, {mode}",
            (mode, "retrofit", True),
            (mode, "retrofit", False),
        )
    for cl, fmt in FORMATS.items():
        ratio(f"latency, compile / eager, retrofit, {fmt}", ("compile", "retrofit", cl), ("eager", "retrofit", cl))
    return (
        f"retrofit ({cfg.plain}, timm recipe, fused) vs {cfg.native}: max |diff| / max |out| {diff:.1e} (float32, "
        "eager)"
    )


# ---- 4: the collective backend ----------------------------------------------------------------


def collective(rank: int, world: int, backend: str, store: str, out: str) -> None:
    """One process of the spawned group: join, all_reduce 4 MiB (checked), time 20 more."""
    import torch.distributed as dist

    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    t = time.perf_counter()
    dist.init_process_group(
        backend,
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        **({"device_id": device} if device.type == "cuda" else {}),
    )
    x = torch.full((MIB,), float(rank + 1), device=device)
    dist.all_reduce(x)
    sync(device)
    joined = time.perf_counter() - t
    if not torch.all(x == world * (world + 1) / 2):
        raise RuntimeError(f"all_reduce gave {x[0].item()}, not {world * (world + 1) / 2}")
    t = time.perf_counter()
    for _ in range(20):
        dist.all_reduce(x)
    sync(device)
    each = (time.perf_counter() - t) / 20
    dist.destroy_process_group()
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"joined": joined, "each": each}, f)


class Collectives:
    """The spawned groups: started, waited for before anything is timed, their rows added at the end."""

    def __init__(self, device: torch.device):
        import torch.multiprocessing as mp

        self.backend = "nccl" if device.type == "cuda" else "gloo"
        self.worlds = [1, 2] if device.type == "cuda" and torch.cuda.device_count() > 1 else [1]
        self.dir = tempfile.TemporaryDirectory(prefix="retrofit-gpu-")
        self.runs = {}
        for world in self.worlds:
            store, out = (os.path.join(self.dir.name, f"{k}{world}") for k in ("store", "out"))
            ctx = mp.start_processes(
                collective, args=(world, self.backend, store, out), nprocs=world, join=False, start_method="spawn"
            )
            self.runs[world] = (ctx, out)

    def wait(self, timeout_s: float) -> None:
        """Wait for the groups (so none runs while something is timed); the results are kept."""
        deadline = time.perf_counter() + timeout_s
        self.results = {}
        for world, (ctx, out) in self.runs.items():
            try:
                while not ctx.join(timeout=1):
                    if time.perf_counter() > deadline:
                        for p in ctx.processes:
                            p.terminate()
                        raise TimeoutError(f"no answer in {timeout_s:.0f} s")
                with open(out) as f:
                    self.results[world] = json.load(f)
            except Exception as err:  # the backend's failure is this row's finding
                msg = str(err).strip().splitlines()
                self.results[world] = f"failed: {type(err).__name__}: {msg[-1][:200] if msg else ''}"
        self.dir.cleanup()

    def report(self, table: Table) -> None:
        for world, got in self.results.items():
            what = f"{self.backend} all_reduce 4 MiB, spawned group of {world}"
            if isinstance(got, str):
                table.add(what, None, "ms", got)
            else:
                table.add(
                    what,
                    got["each"] * 1e3,
                    "ms",
                    f"result checked; joined and first all_reduce in {got['joined']:.2f} s",
                )


# ---- the run ------------------------------------------------------------------------------------


def bad(message: str):
    """Bad input: one ``error:`` line on stderr, exit status 2, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def config(args) -> Config:
    """The run's settings, or one error line for a device this machine cannot give."""
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        bad(f"unknown device {args.device!r}: use cpu, cuda or cuda:N")
    if device.type not in ("cpu", "cuda"):
        bad(f"this check runs on cpu or cuda, not {args.device!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            bad(
                f"--device {args.device} asked, but torch sees no GPU (torch.cuda.is_available() is False); "
                "on a machine without one run --device cpu --small"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            bad(f"--device {args.device} asked, but torch sees {torch.cuda.device_count()} GPU(s)")
        device = torch.device("cuda", device.index or 0)
    if not args.budget_s > 0:
        bad(f"--budget-s must be positive, got {args.budget_s}")
    for name in ("batch", "size", "steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            bad(f"--{name} must be at least 1, got {getattr(args, name)}")
    small = args.small
    return Config(
        device=device,
        small=small,
        budget=args.budget_s,
        batch=args.batch or (4 if small else 64),
        size=args.size or (64 if small else 224),
        steps=args.steps or (1 if small else 4),
        classes=10 if small else 1000,
        plain="resnet18" if small else "resnet50",
        native="seresnet18" if small else "seresnet50",
        backend="eager" if small else "inductor",
        train_rounds=(3, 3) if small else (3, 30),
        latency_rounds=(3, 5) if small else (5, 100),
    )


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        return f"CPU {names[0]}" if names else f"CPU {platform.machine()}"
    except OSError:
        return f"CPU {platform.processor() or platform.machine()}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    ap.add_argument(
        "--small",
        action="store_true",
        help="resnet18 / seresnet18, batch 4, 64x64, compile backend eager: the CPU check of this script",
    )
    ap.add_argument("--budget-s", type=float, default=420.0, help="seconds the run may take (default 420)")
    ap.add_argument("--batch", type=int, default=None, help="default 64 (--small: 4)")
    ap.add_argument("--size", type=int, default=None, help="image side, default 224 (--small: 64)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per timed round, default 4 (--small: 1)")
    args = ap.parse_args(argv)
    cfg = config(args)
    clock = Clock(cfg.budget, START)
    if cfg.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed sizes: cudnn picks its fastest kernels, as timm's train.py does
    import timm

    table, memory = Table(), Memory(cfg.device)
    # shares of the budget for the timed rounds; building, compiling and the warm-up take the rest
    trains = training(cfg, table, memory, share_s=0.2 * cfg.budget)
    gc.collect()
    if cfg.device.type == "cuda":
        torch.cuda.empty_cache()
    collectives = Collectives(cfg.device)  # they run while the latency models are built and compiled
    compare = latency(
        cfg,
        clock,
        table,
        share_s=min(0.15 * cfg.budget, max(clock.left() - 0.05 * cfg.budget, 0)),
        reserve_s=0.05 * cfg.budget,
        settle=lambda: collectives.wait(max(30.0, min(120.0, clock.left()))),
    )
    collectives.report(table)
    table.add("memory, whole run's peak", memory.finish() / MIB, "MiB", "")
    dtype = "bf16 autocast" if cfg.device.type == "cuda" else "float32"
    print(
        f"retrofit GPU check, {datetime.date.today().isoformat()}: {device_name(cfg.device)}; torch "
        f"{torch.__version__}, "
        f"timm {timm.__version__}; batch {cfg.batch}, {cfg.size}x{cfg.size}, {dtype}"
        f"{', cudnn.benchmark on' if cfg.device.type == 'cuda' else f', {torch.get_num_threads()} threads'}; "
        f"torch.compile backend {cfg.backend}{' (--small: dynamo capture only)' if cfg.small else ''}"
    )
    print(f"train: {cfg.plain}, {cfg.classes} classes, synthetic data, AdamW, the tool's epoch loop; {trains}")
    print(f"memory: {memory.what()}; latency: {compare}")
    print()
    print(table.markdown())
    print()
    failed = table.failed()
    over = "" if clock.used() <= cfg.budget else " (over the budget: the builds and compiles alone took longer)"
    print(
        f"took {clock.used():.1f} s of a {cfg.budget:.0f} s budget{over}"
        + (f"; FAILED: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed or any(v is not None and not (math.isfinite(v) and v > 0) for _, v, _, _ in table.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
