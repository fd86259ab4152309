"""The sampler and the pruner, combined as Optuna recommends, with the pitfalls of Optuna 5.1 handled.

* **Pruner** (every trial reports val top-1 after each epoch): ``hyperband`` (default,
  ``HyperbandPruner(min_resource=1, max_resource=E, reduction_factor=3)``, with ``max_resource`` the
  trial's epochs: ``"auto"`` prunes nothing until a trial completes), ``sha`` (successive halving) or
  ``none``. ``create_study`` would otherwise bring a ``MedianPruner``. Hyperband puts every trial in bracket
  0 until its first ``prune()`` call, so a fresh process (a resume, a second worker) would place its first
  trial wrongly: :func:`init_pruner` makes that first call on a dummy trial, deciding nothing.
* **Sampler**: TPE (``multivariate=True``; ``constant_liar`` is on by default in 5.1, which parallel workers
  need) or random. Hyperband runs TPE on each bracket's trials only, and its documentation asks for more
  than 10 trials per bracket before TPE adapts: with 30 trials in 3 brackets and TPE's 10 start-up trials,
  the search would be random throughout, so the start-up is ``N // (3 * brackets)``, between 2 and 10.
* **Seeded per trial** (:class:`TrialSeededSampler`): one fixed-seed sampler in each of two processes
  draws the same start-up recipes in pairs (Optuna reseeds only its own threads). Here trial k's draws
  come from a sampler seeded by (seed, k): two processes never share them, one process is reproducible.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import optuna
from optuna.trial import TrialState, create_trial

from ...errors import RetrofitError, excerpt

SAMPLERS = ("tpe", "random")
PRUNERS = ("hyperband", "sha", "none")
ETA = 3  # reduction factor of both pruners


def quiet() -> None:
    """Optuna's INFO lines off (a study created, each trial finished: the tune prints its own), its
    experimental/deprecation warnings and its warning that the RDB heartbeat is meant for ``optimize()``, by
    message: on Python < 3.12 a deprecation warning is attributed to the caller's module, so a
    ``module="optuna"`` filter lets it through. Its WARNING lines stay."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # the RDB heartbeat outside optimize(): .workers runs it for ask() and tell() on purpose
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*(deprecated|removed) in v\d")


def brackets(epochs: int, pruner: str) -> int:
    """Hyperband's brackets for trials of ``epochs`` epochs (1 for the others)."""
    if pruner != "hyperband" or epochs < 2:
        return 1
    return int(math.floor(math.log(epochs) / math.log(ETA) + 1e-9)) + 1


def make_pruner(name: str, epochs: int):
    if name not in PRUNERS:
        raise RetrofitError(f"--pruner: unknown value {excerpt(name)}; allowed: {', '.join(PRUNERS)}")
    if name == "none" or epochs < 2:  # one epoch: nothing to stop early
        return optuna.pruners.NopPruner()
    if name == "sha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=ETA)
    return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs, reduction_factor=ETA)


def init_pruner(study, pruner) -> None:
    """A fresh Hyperband places trials in bracket 0 until its first ``prune()``: make that call now."""
    if isinstance(pruner, optuna.pruners.HyperbandPruner):
        pruner.prune(study, create_trial(state=TrialState.PRUNED))


def make_sampler(name: str, seed: int, trials: int, epochs: int, pruner: str):
    if name not in SAMPLERS:
        raise RetrofitError(f"--sampler: unknown value {excerpt(name)}; allowed: {', '.join(SAMPLERS)}")
    if name == "random":
        return TrialSeededSampler(lambda s: optuna.samplers.RandomSampler(seed=s), seed)
    startup = min(10, max(2, trials // (3 * brackets(epochs, pruner))))
    return TrialSeededSampler(
        lambda s: optuna.samplers.TPESampler(seed=s, n_startup_trials=startup, multivariate=True), seed
    )


def mix(seed: int, number: int) -> int:
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """``factory(seed')`` with seed' a function of (seed, trial number), rebuilt before each trial (only the
    public ``BaseSampler`` API): trial k's draws depend on k and the finished history alone."""

    def __init__(self, factory, seed: int):
        self._factory, self._seed = factory, seed
        self._inner = factory(seed)

    def before_trial(self, study, trial):
        self._inner = self._factory(mix(self._seed, trial.number))
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, name, distribution):
        return self._inner.sample_independent(study, trial, name, distribution)

    def after_trial(self, study, trial, state, values):
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self):  # only optimize(n_jobs > 1) calls it; the seed is per trial anyway
        pass
