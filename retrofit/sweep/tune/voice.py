"""Under torchrun: rank 0 holds the study and decides, every rank trains the same recipe.

The known pitfall is each rank asking its own sampler (two ranks drew x = 0.61 and 0.49 in the design's
test) or pruning on one rank only. Here rank 0 alone opens the store, asks, checks the limits and dedupes;
it sends each trial's recipe (one ``broadcast_object_list``), every rank builds and fine-tunes it as one
DistributedDataParallel run, rank 0 reports each epoch to the pruner and its decision reaches every rank
through the fine-tune's ``on_event`` hook (the run ends on all of them when it ends on one). The finish's
jobs go the same way, and a last message carries the result, or rank 0's error as its one line, which every
other rank raises as its own (so no rank waits for ever and every rank exits alike). A fine-tune that fails
fails on every rank alike (the gradient check is decided on all-reduced gradients): rank 0 records it and
sends the next trial, and the others go on to receive it. When a process dies, the others' collectives fail:
:class:`~retrofit.train.distributed.PeerLost`, one line.

Hand-written rather than optuna-integration's ``TorchDistributedTrial`` (experimental, a further package):
that one needs every rank to know the number of trials in advance (there is no stop message, which rules
out the claim loop, budgets and resume), broadcasts six properties per call (100 broadcasts for 6 trials
against 21 here) and leaves the ranks in mismatched collectives when rank 0 raises.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from ...errors import RetrofitError, first_line
from ...train.distributed import PeerLost


class Voice:
    """Rank 0's messages to the others (nothing at all in a single process)."""

    def __init__(self, world: int):
        self.world = world

    def send(self, message: tuple) -> None:
        if self.world > 1:
            dist.broadcast_object_list([message], src=0)

    def receive(self) -> tuple:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def lead(self, work: Callable[[], Any]) -> Any:
        """Rank 0: run ``work`` (which sends ``("trial", ...)``/``("job", ...)`` messages), then send its
        result, or its error's one line (the other ranks raise the same error: every rank of the job exits
        alike, and no rank waits for ever)."""
        try:
            result = work()
        except PeerLost:
            raise  # no one left to tell
        except BaseException as err:
            line = first_line(err) if isinstance(err, RetrofitError) else f"{type(err).__name__}: {first_line(err)}"
            try:
                self.send(("error", isinstance(err, RetrofitError), line))
            except Exception:  # noqa: BLE001 - a peer died as well: its own error says so
                pass
            raise
        self.send(("done", result))
        return result

    def follow(self, handlers: dict[str, Callable[..., None]]) -> Any:
        """The other ranks: run each message's handler until the result (returned) or rank 0's error (raised:
        a ``RetrofitError`` with the same line, or a ``RuntimeError`` naming rank 0's internal error)."""
        while True:
            kind, *args = self.receive()
            if kind == "done":
                return args[0]
            if kind == "error":
                ours, line = args
                raise RetrofitError(line) if ours else RuntimeError(f"on rank 0: {line}")
            handlers[kind](*args)
