"""One trial: the draw, a duplicate of a finished recipe, the limits, then the fine-tune with a pruning hook.

A trial trains exactly what the sweep trains for that recipe and seed: ``torch.manual_seed(seed);
retrofit.add_se(model, recipe)`` (:func:`retrofit.sweep.ablation.build_retrofitted`), fine-tuned by
:func:`retrofit.sweep.ablation.run_arm` with the search seed; the pruner sees val top-1 after each epoch
through the fine-tune's ``on_event`` hook (its ``epoch`` events), which draws no random number. So a
complete trial's rows are bitwise those of ``retrofit finetune`` of that recipe with ``--seed`` the search
seed (on CPU), and a pruned trial's are the first rows of that run (the schedule is that of all its epochs).
The trial's value is its last epoch's val top-1; its rows, costs and reason live in the store (user attrs),
the one source of truth across kills and machines.

Before anything trains: a draw that makes no recipe, a recipe with no site, one over ``--max-params`` /
``--max-macs`` / ``--max-latency`` is pruned with its reason and does not count; a recipe a finished trial
already ran is that trial's result again (a CPU fine-tune of a recipe and seed is deterministic), and one
another process is running is waited for. A trial whose fine-tune raises failed for a reason of its own: it
is pruned the same way (its reason kept, a violated constraint ``failed``, so that the sampler learns from
it as from a recipe over a limit; Optuna's samplers do not see FAIL trials at all), marked
``retrofit:failed``, and a later draw of its recipe is skipped, never trained again.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState
from torch import nn

from ...measure.overhead import ModelCost
from ...surgery.recipe import Recipe
from ...surgery.sites import Scan
from ...train.config import FinetuneConfig
from ...train.data import ImageFolderData
from ...train.distributed import PeerLost
from ..ablation import build_retrofitted, failure, run_arm
from .claim import POLL, failed
from .limits import Limits, latency_ratio, recipe_cost
from .space import Candidate, Infeasible, Space
from .voice import Voice
from .workers import FAILED, UNCOUNTED, Worker

REASON = 1000  # characters of a failed fine-tune's reason kept (the gradient check says what to do at its end)


@dataclass
class Search:
    """What every trial and finish job of one tune shares (on every rank)."""

    model: nn.Module
    found: Scan
    base: ModelCost
    pipeline: ImageFolderData
    space: Space
    limits: Limits
    epochs: int  # phase-1 epochs of every run
    seed: int  # the search seed
    config: FinetuneConfig  # the fine-tune options of every run (lr, batch_size...; distill off: see distill)
    distill: bool
    input_size: tuple[int, ...]
    voice: Voice
    say: Callable[[str], None] | None = None
    trained: list[dict[str, Any]] = field(default_factory=list)  # this process's own runs
    worker: Worker | None = None  # rank 0's place in the study (set once the study is open)

    def run(
        self,
        what: str,
        recipe: Recipe | None,
        searched: dict[str, Any],
        seed: int,
        *,
        model: nn.Module | None = None,
        on_event=None,
        **options,
    ) -> dict[str, Any]:
        """One fine-tune (a trial or a finish job; ``recipe`` None: a control arm of the original network),
        logged in :attr:`trained`."""
        if model is None:
            model = (
                copy.deepcopy(self.model) if recipe is None else build_retrofitted(self.model, self.found, recipe, seed)
            )
        config = self.config.replace(
            epochs=options.pop("epochs", self.epochs), **({"lr": searched["lr"]} if "lr" in searched else {})
        )
        if recipe is not None and self.distill:
            options = {**options, "distill": True}
        phase1 = options.pop("phase1", True)
        result = run_arm(
            self.pipeline,
            model,
            config,
            seed,
            input_size=self.input_size,
            phase1=phase1,
            phase2_epochs=searched.get("phase2_epochs", 0) if phase1 else 0,
            on_event=on_event,
            **options,
        )
        result["model"] = model
        self.trained.append(
            {
                "what": what,
                "seed": seed,
                "epochs": result["last"]["epoch"],
                "top1": result["last"]["top1"],
                "val_loss": result["last"]["val_loss"],
            }
        )
        return result

    def total_epochs(self, searched: dict[str, Any]) -> int:
        return self.epochs + searched.get("phase2_epochs", 0)

    def max_epochs(self) -> int:
        return self.epochs + max(self.space.phase2_epochs)


class Reporter:
    """The ``on_event`` hook of a trial on rank 0 (its ``epoch`` events): report val top-1, ask the pruner
    before the last epoch (a rung at the last epoch would throw a finished run away). A store error stops the
    run, to be raised after it (so every rank leaves the fine-tune together)."""

    def __init__(self, trial, total: int):
        self.trial, self.total = trial, total
        self.pruned, self.error = False, None

    def __call__(self, event) -> bool:
        row = event.data
        try:
            self.trial.report(row["top1"], row["epoch"])
            self.pruned = row["epoch"] < self.total and self.trial.should_prune()
            return self.pruned
        except Exception as err:  # noqa: BLE001 - raised once the run has stopped on every rank
            self.error = err
            return True


def objective(search: Search, trial) -> float:
    """One trial on rank 0 (the others train what it sends: :func:`follow_trial`)."""
    try:
        cand = search.space.suggest(trial)
    except Infeasible as err:
        skip(search, trial, str(err), None)
    trial.set_user_attr("recipe", cand.key)
    trial.set_user_attr("label", cand.label)
    trial.set_user_attr("train", cand.train)
    reuse = duplicate(search, trial, cand)
    if reuse is not None:
        return reuse
    try:
        cost = recipe_cost(search.found, search.base, cand.recipe)
    except Infeasible as err:
        skip(search, trial, str(err), cand)
    for name, value in (
        ("added_params", cost.added_params),
        ("params_percent", cost.params_percent()),
        ("added_macs", cost.added_macs),
        ("macs_percent", cost.macs_percent()),
        ("blocks", len(cost.blocks)),
    ):
        trial.set_user_attr(name, value)
    if search.limits.over(cost):
        skip(search, trial, search.limits.over(cost), cand)
    model = build_retrofitted(search.model, search.found, cand.recipe, search.seed)
    if search.limits.latency is not None:
        ratio = latency_ratio(search.model, model, search.input_size)
        trial.set_user_attr("latency", ratio)
        if search.limits.over_latency(ratio):
            skip(search, trial, search.limits.over_latency(ratio), cand)
    return train_trial(search, trial, cand, model)


def train_trial(search: Search, trial, cand: Candidate, model: nn.Module) -> float:
    search.voice.send(("trial", trial.number, cand.recipe, cand.train))
    hook = Reporter(trial, search.total_epochs(cand.train))
    try:
        result = search.run(f"trial {trial.number}", cand.recipe, cand.train, search.seed, model=model, on_event=hook)
    except PeerLost:
        raise  # not the recipe's fault: the trial stays RUNNING, and is retried once this process is gone
    except Exception as err:  # noqa: BLE001 - a failed fine-tune is a failed trial with its reason
        trial.set_user_attr(FAILED, True)
        skip(search, trial, failure(err, REASON), cand, "failed")
    if hook.error is not None:
        raise hook.error
    trial.set_user_attr("rows", result["rows"])
    value = result["last"]["top1"]
    if hook.pruned:
        raise optuna.TrialPruned(f"pruned at epoch {result['last']['epoch']}")
    return value


def follow_trial(search: Search, number: int, recipe: Recipe, searched: dict[str, Any]) -> None:
    """A rank other than 0: train the trial rank 0 sent; its pruning decisions arrive through the fine-tune
    (the hook is rank 0's alone). A failed fine-tune fails on every rank alike (the gradient check is
    decided on all-reduced gradients): rank 0 records it and goes on, so this rank goes on too."""
    try:
        search.run(f"trial {number}", recipe, searched, search.seed, on_event=_listen)
    except PeerLost:
        raise
    except Exception:  # noqa: BLE001 - rank 0 has the same failure, and says it
        pass


def _listen(event) -> bool:
    """A follower's hook: it decides nothing, but joins the per-epoch vote in which rank 0's stop arrives."""
    return False


def skip(search: Search, trial, reason: str, cand: Candidate | None, why: str = "limits"):
    """Prune a trial that trains no further, for ``reason`` (over a limit, no recipe, its fine-tune failed);
    it does not count towards ``--trials``, and the sampler learns that this region is infeasible (the
    constraint ``why`` above 0: TPE ranks such trials last; a FAIL trial it would not see at all)."""
    trial.set_user_attr("reason", reason)
    trial.set_user_attr(UNCOUNTED, True)
    trial.set_constraint(why, 1.0)
    if cand is None:
        trial.set_user_attr("label", "(no recipe)")
    raise optuna.TrialPruned(reason)


def duplicate(search: Search, trial, cand: Candidate) -> float | None:
    """A recipe a trained trial already ran: its value (COMPLETE) or pruned "as trial k", training nothing
    and not counted; one that failed there is skipped (never trained again, the sampler taught again); one
    another process is running now is waited for. None: a new recipe."""
    study = trial.study
    while True:
        same = [
            t
            for t in study.get_trials(deepcopy=False)
            if t.number != trial.number
            and t.user_attrs.get("recipe") == cand.key
            and "duplicate_of" not in t.user_attrs
            and (not t.user_attrs.get(UNCOUNTED) or failed(t))
        ]
        done = [
            t
            for t in same
            if failed(t) or (t.state in (TrialState.COMPLETE, TrialState.PRUNED) and "rows" in t.user_attrs)
        ]
        if done:
            first = min(done, key=lambda t: t.number)
            trial.set_user_attr("duplicate_of", first.number)
            trial.set_user_attr(UNCOUNTED, True)
            for name in ("added_params", "params_percent", "added_macs", "macs_percent", "blocks"):
                trial.set_user_attr(name, first.user_attrs.get(name))
            if failed(first):
                skip(search, trial, f"the same recipe failed in trial {first.number}", cand, "failed")
            if first.state == TrialState.PRUNED:
                raise optuna.TrialPruned(f"as trial {first.number}")
            return first.value
        if not any(t.state == TrialState.RUNNING and t.number < trial.number for t in same):
            return None
        time.sleep(POLL)  # the same recipe is training in another process: its result, once it has one
        if search.worker is not None:
            search.worker.fail_stale(study, say=search.say)
