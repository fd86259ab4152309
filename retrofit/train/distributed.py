"""Running under ``torchrun``: one process per device, DistributedDataParallel, rank 0 writes.

``torchrun --nproc_per_node N -m retrofit finetune ...`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``;
:func:`setup` then joins the process group (nccl on GPUs, gloo on CPU). Without those variables every
helper here is a no-op for a single process, so the same code path serves both.

When one process of the job dies (killed, out of memory), the others fail in their next collective with the
backend's own words (gloo: ``RuntimeError: [.../pair.cc:561] Connection closed by peer``), which read like a
bug of ours. :func:`watch_peers` turns those into one :class:`PeerLost` error that says what happened and what
the caller's files allow (a fine-tune's run folder holds its last committed epoch: ``--resume`` continues).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import RetrofitError, excerpt, first_line

# what gloo, NCCL and the TCP store say when the process at the other end is gone
PEER_GONE = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "remote worker crashing",
    "remote process exited",
    "communicator was aborted",
)


class PeerLost(RetrofitError):
    """Another process of the torchrun job died, so this one cannot go on: one line with what to do."""

    def __init__(self, detail: str, then: str):
        self.detail, self.then = detail, then
        super().__init__(f"another process of this torchrun job died ({detail}); {then}")


def peer_gone(err: BaseException) -> bool:
    """Whether ``err`` is a collective's failure because a process at the other end is gone."""
    return isinstance(err, (RuntimeError, ConnectionError)) and any(s in str(err) for s in PEER_GONE)


@contextmanager
def watch_peers(world: int, then: str):
    """Under torchrun (``world`` > 1), a collective that failed because a peer died becomes :class:`PeerLost`
    with ``then`` (what the files allow now); anything else passes through."""
    try:
        yield
    except PeerLost:
        raise
    except Exception as err:
        if world <= 1 or not peer_gone(err):
            raise
        line = first_line(err)
        detail = next((s for s in PEER_GONE if s in line), line)
        raise PeerLost(f"{type(err).__name__}: {detail}", then) from None


@dataclass(frozen=True)
class Dist:
    """This process's place in the job."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    started_here: bool = False  # this module created the process group (and tears it down)

    @property
    def main(self) -> bool:
        """Rank 0: the only process that logs, prints and writes files."""
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """Sum ``values`` over all processes (float64, so counts stay exact)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def any(self, flag: bool) -> bool:
        """True on every process when it is true on one (to stop all of them together)."""
        return self.sum([float(flag)])[0] > 0 if self.world > 1 else flag

    def autocast(self):
        """bf16 autocast on CUDA; a no-op context on CPU (fp32 there)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def close(self) -> None:
        if self.started_here and dist.is_initialized():
            dist.destroy_process_group()


def setup(device: str | None) -> Dist:
    """Join the torchrun job if there is one; pick this process's device.

    Args:
        device: ``"cpu"``, ``"cuda"``... (default: CUDA when available). Under torchrun each process
            takes GPU ``LOCAL_RANK``.

    Raises:
        RetrofitError: ``device`` is no device name, or this machine does not have it (before any folder
            is made or model moved).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device is not None:
        check_device(device)
    want_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if world <= 1:
        return Dist(device=torch.device(device or ("cuda" if want_cuda else "cpu")))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local) if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(dev)
    started = not dist.is_initialized()
    if started:
        dist.init_process_group(backend="nccl" if want_cuda else "gloo")
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), device=dev, started_here=started)


def check_device(device: str) -> torch.device:
    """``device`` as a torch device, or one error that says what this machine has. Unchecked, a missing
    GPU surfaced from deep inside ``model.to`` as torch's "Found no NVIDIA driver", after the run folder
    was made and locked."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise RetrofitError(f"device {excerpt(device)} is not a device name; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count()  # 0, no exception, without a driver or on a CPU-only build of torch
        if count == 0:
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise RetrofitError(
                f"device {device}: no CUDA GPU found (torch {torch.__version__}, {build}); use "
                f"--device cpu, or leave --device out to take a GPU when there is one"
            )
        if dev.index is not None and dev.index >= count:
            raise RetrofitError(f"device {device}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise RetrofitError(f"device {device}: MPS is not available here; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise RetrofitError(f"device {device}: not supported; use cpu or cuda")
    return dev
