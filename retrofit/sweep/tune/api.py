""":func:`retrofit.tune`: a budgeted recipe search with an honest finish, in Python (the CLI's ``retrofit tune``).

    >>> result = retrofit.tune(model, data="data/", space={"position": ["standard", "identity"],
    ...                        "r": {2: ["off", 4, 16], 5: ["off", 4, 16]}}, trials=8, epochs=1)
    >>> line, verdict, best = result.summary["line"], result.verdict, result.best

The flow, on one scan and one data pipeline: the space is checked on the model (and the limits against its
cheapest recipe), the study is opened or resumed (its identity checked), trials run until the budget says
stop (:mod:`.claim`, each one :func:`.objective.objective`), then the finalists and the control arms run over
the seeds (:mod:`.finish`) and the files are written (:mod:`.outputs`). Under torchrun rank 0 leads and every
rank trains (:mod:`.voice`); every rank gets the same result.
"""

from __future__ import annotations

import functools
import random
import re
import warnings
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from torch import nn

from ...errors import RetrofitError, excerpt
from ...events import Event, OnEvent, emit, legacy
from ...files.provenance import random_weights
from ...graph.model import model_name, resolve_input_size
from ...measure.overhead import traced_cost
from ...surgery.insert import paused_gc
from ...surgery.recipe import Recipe, resolve_recipe
from ...surgery.sites import Scan, scan
from ...train.config import FinetuneConfig
from ...train.data import ImageFolderData
from ...train.distributed import PeerLost, setup, watch_peers
from ..ablation import check_accuracy_run, verdict
from ..grid import finetune_config
from ..rows import SweepRow
from .claim import Budget, run_trials
from .finish import final_study, finalists, finish, follow_job, model_of, winner
from .limits import Limits, check_meetable, parse_latency, parse_limit
from .objective import Search, follow_trial, objective
from .outputs import place_winner, write_best_recipe, write_trials, write_tune_json
from .report import summary, trial_line, trial_row, trial_rows
from .sampling import make_pruner, make_sampler, quiet
from .space import Space, load_space, parse_space
from .storage import CONTINUES, JOURNAL, open_storage, shown, store_errors
from .study import data_identity, identity, model_identity, open_study
from .voice import Voice
from .workers import GRACE, INTERVAL, Requeue, Worker

SEARCH_SEED = 100  # the seed of every trial and of the sampler, unless given


@dataclass
class TuneResult:
    """What a tune found: every trial's row, the finish (control rows, then the finalists'), the summary,
    the verdict line, the winner's recipe and searched settings, and this process's own runs."""

    trials: list[dict[str, Any]]
    rows: list[SweepRow]
    summary: dict[str, Any]
    verdict: str | None
    best: Recipe | None
    best_train: dict[str, Any]
    output_dir: Path
    best_model: str | None = None
    trained: list[dict[str, Any]] = field(default_factory=list)


def tune(
    model: nn.Module,
    data: str | Path,
    space: Space | Mapping | str | Path | None = None,
    *,
    trials: int | None = None,
    budget: int | str | None = None,
    recipe: Recipe | str | dict | None = None,
    input_size: tuple[int, ...] | None = None,
    max_params: str | float | None = None,
    max_macs: str | float | None = None,
    max_latency: float | None = None,
    sampler: str = "tpe",
    pruner: str = "hyperband",
    finalists: int = 3,
    seeds: int = 3,
    search_seed: int = SEARCH_SEED,
    storage: str | None = None,
    study: str = "tune",
    output_dir: str | Path | None = None,
    config: FinetuneConfig | None = None,
    adapter: bool = False,
    found: Scan | None = None,
    on_event: OnEvent | None = None,
    train: dict[str, Any] | None = None,
    on_line: Callable[[str], None] | None = None,
    **options: Any,
) -> TuneResult:
    """Search ``space`` for the recipe that pays on ``model`` and ``data``, then re-run the best over seeds
    next to the sweep's control arms.

    Args:
        model: the original network with real weights (never modified).
        data: an ImageFolder (``train/<class>/*``, ``val/<class>/*``).
        space: a :class:`~retrofit.sweep.tune.space.Space`, a mapping of its axes (the YAML keys:
            ``position``, ``r`` (a list, or per stage ``{2: ["off", 4, 8], ...}``), ``stages``, ``per_stage``,
            ``module``, ``gate``, ``squeeze``, ``lr`` (``{"low": .., "high": ..}``: searched log-uniform),
            ``phase2_epochs``), or a YAML file of them; None: the base recipe alone.
        trials: how many trials count (complete or pruned; those over a limit or repeating a recipe do not).
        budget: training epochs of the whole study (``60``), or this process's wall time (``"2h"``,
            ``"30m"``, ``"90s"``); with ``trials``, whichever comes first.
        recipe: the other recipe fields; input_size: ``(C, H, W)`` (default: timm's ``pretrained_cfg``).
        max_params, max_macs: a count or a share (``"2%"``) of the model's; max_latency: a ratio to the
            original's forward time. A recipe over one is never trained.
        sampler: ``tpe`` or ``random``; pruner: ``hyperband``, ``sha`` or ``none``.
        finalists, seeds: the finish re-runs the best ``finalists`` recipes over seeds ``0..seeds-1`` with
            the control arms (``finalists=0``: no finish).
        search_seed: the seed of every trial (data order, augmentation, blocks) and of the sampler.
        storage: an RDB URL or a journal file shared by several processes (default: ``OUT/study.journal``);
            study: the study's name in it.
        output_dir: the tune's folder (default: ``MODEL-tune/``).
        config: the fine-tune of every run (:class:`retrofit.FinetuneConfig`): ``epochs`` are the phase-1
            epochs of every trial (its searched phase-2 epochs come on top), ``lr`` its rate unless the space
            searches it, ``phase2_lr`` the ``full`` control's; the tune sets the seed and what trains.
        **options: fields of :class:`retrofit.FinetuneConfig` overriding ``config``'s (``epochs=3``,
            ``batch_size=16``...), checked as :func:`retrofit.finetune` checks them.
        adapter: save the winner as an adapter (``adapter.safetensors``) instead of a full model.
        found: a scan of ``model`` at ``input_size`` with ``macs=True``, if you have one.
        on_event: called with each :class:`retrofit.Event` of the tune (rank 0): a ``line`` per trial and
            per progress message.
        train, on_line: deprecated: ``config``/``**options`` and ``on_event``.
    """
    config = finetune_config(config, train, options, "retrofit.tune")
    on_event = legacy(on_event, "retrofit.tune", on_line=on_line)
    seeds_ = check_accuracy_run(model, seeds, config)
    check_counts(trials, budget, finalists)
    base_recipe = resolve_recipe(recipe)
    size = resolve_input_size(model, input_size)
    with paused_gc():
        found = found if found is not None else scan(model, size, macs=True)
    chosen_space = as_space(space, base_recipe).on_model(found)
    limits = Limits(
        parse_limit("--max-params", max_params), parse_limit("--max-macs", max_macs), parse_latency(max_latency)
    )
    base_cost = traced_cost(found.traced, found.macs)
    check_meetable(chosen_space, limits, found, base_cost)
    out = Path(output_dir if output_dir is not None else f"{model_name(model)}-tune").expanduser()
    env = setup(config.device)  # held for the whole tune: every run joins the same process group
    verbosity = optuna.logging.get_verbosity()
    try:
        with warnings.catch_warnings():
            quiet()
            say = (lambda line: emit(on_event, Event("tune", "line", line))) if env.main else None
            search = _state(model, data, found, base_cost, chosen_space, limits, config, size, search_seed, env, say)
            settings = dict(
                trials=trials,
                budget=budget,
                sampler=sampler,
                pruner=pruner,
                finalists=finalists,
                seeds=seeds_,
                storage=storage,
                study=study,
                out=out,
                adapter=adapter,
            )
            with tune_peers(env.world):
                payload = _run(search, settings, env.main)
        return TuneResult(**payload, trained=search.trained)
    finally:
        optuna.logging.set_verbosity(verbosity)
        env.close()


def _state(model, data, found, base_cost, space, limits, config, size, search_seed, env, say) -> Search:
    """The search's state: the data pipeline, the fine-tune without distillation (the search's runs distil or
    not by ``distill``), the voice that carries the work to the other ranks."""
    distill, config = config.distill, config.replace(distill=False)
    pipeline = ImageFolderData.open(data, model, size, augment=config.augment)
    return Search(
        model,
        found,
        base_cost,
        pipeline,
        space,
        limits,
        config.epochs,
        search_seed,
        config,
        distill,
        size,
        Voice(env.world),
        say,
    )


def _run(search: Search, settings: dict[str, Any], main: bool) -> dict[str, Any]:
    """Rank 0 leads the study; the other ranks run the trials and jobs it sends them."""
    if main:
        return search.voice.lead(lambda: _lead(search, settings))
    return search.voice.follow(
        {"trial": functools.partial(follow_trial, search), "job": functools.partial(follow_job, search)}
    )


def _lead(search: Search, s: dict[str, Any]) -> dict[str, Any]:
    """Rank 0: the study, the trials, the finish, the files; returns the result (sent to every rank)."""
    out: Path = s["out"]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RetrofitError(f"cannot create the output folder {excerpt(out)}: {err.strerror}") from None
    where = s["storage"] or str(out / JOURNAL)
    requeue = Requeue()
    storage = open_storage(where, shared=s["storage"] is not None, heartbeat=(INTERVAL, GRACE), on_stale=requeue)
    with store_errors(where):
        budget = parse_budget(s["budget"], s["trials"], search.max_epochs())
        planned = budget.trials or max(1, (budget.epochs or 10 * search.max_epochs()) // search.max_epochs())
        pruner = make_pruner(s["pruner"], search.max_epochs())
        sampler = make_sampler(s["sampler"], search.seed, planned, search.max_epochs(), s["pruner"])
        study = open_study(storage, s["study"], shown(where), sampler, pruner, _identity(search, s), _hints(search))
        _grid(search, study, budget)
        search.worker = worker = Worker(out / "workers", storage, requeue)
        try:
            rows, summ, finish_rows = _search(search, s, study, storage, budget, worker)
        finally:
            worker.close()
        return _results(search, s, rows, summ, finish_rows, storage)


def _search(search: Search, s: dict[str, Any], study, storage, budget: Budget, worker: Worker):
    """The trials until the budget says stop, the summary, then the finish's rows."""
    out: Path = s["out"]
    say = search.say or (lambda line: None)

    def progress(number: int) -> None:
        trials = study.get_trials(deepcopy=False)
        say(trial_line(trial_row(trials[number], search.epochs)))
        write_trials(out, trial_rows(trials, search.epochs))

    try:
        why = run_trials(study, functools.partial(objective, search), budget, worker, say=search.say, after=progress)
    finally:  # the trials so far, also when the search stops with an error
        write_trials(out, trial_rows(study.get_trials(deepcopy=False), search.epochs))
    rows = trial_rows(study.get_trials(deepcopy=False), search.epochs)
    summ = {**summary(rows), "stopped": why}
    say(
        summ["line"]
        + (
            ""
            if why != "stalled"
            else "; stopped: the sampler keeps proposing recipes already tried, over the limits, or failing"
        )
    )
    chosen = finalists(study.get_trials(deepcopy=False), s["finalists"])
    finish_rows = (
        finish(search, final_study(storage, s["study"]), chosen, s["seeds"], worker, out, s["adapter"], study)
        if chosen
        else []
    )
    return rows, summ, finish_rows


@contextmanager
def tune_peers(world: int):
    """Another process of the torchrun job died: one line, which says that the study goes on (a fine-tune
    inside the tune says what its own files allow, which is nothing here)."""
    try:
        with watch_peers(world, CONTINUES):
            yield
    except PeerLost as err:
        if err.then == CONTINUES:
            raise
        raise PeerLost(err.detail, CONTINUES) from None


def _hints(search: Search) -> dict[str, str]:
    """What to say when a resumed study's part differs: a model with random weights differs in every process
    that builds it without a seed."""
    why = random_weights(search.model)
    return {"model": f"its weights look random ({why}): build it from the same seed in every process"} if why else {}


def _results(search: Search, s: dict, rows, summ, finish_rows, storage) -> dict[str, Any]:
    out = s["out"]
    line = (
        verdict(finish_rows) if finish_rows else ("no trial completed; nothing to compare" if s["finalists"] else None)
    )
    best = winner(finish_rows)
    best_model = None
    if best is not None:
        write_best_recipe(out, best, summ["trials"])
        placed = place_winner(out, best.trial, s["adapter"])
        if placed is not None:
            best_model = str(placed)
        else:
            path, host = model_of(final_study(storage, s["study"]), best.trial, s["seeds"][0])
            best_model = f"{path} on {host}" if path else None
    payload = dict(
        trials=rows,
        rows=finish_rows,
        summary=summ,
        verdict=line,
        best=best.recipe if best else None,
        best_train=(best.train or {}) if best else {},
        output_dir=out,
        best_model=best_model,
    )
    write_tune_json(
        out,
        {
            **{k: v for k, v in payload.items() if k not in ("rows", "best", "output_dir")},
            "rows": [r.to_dict() for r in finish_rows],
            "best": best.recipe.to_dict() if best else None,
            "seeds": s["seeds"],
            "space": search.space.to_dict(),
            "limits": search.limits.to_dict(),
        },
    )
    return payload


def _identity(search: Search, s: dict) -> dict[str, Any]:
    # every setting that decides a number (so the CLI's and a Python call's compare equal); the data loaders'
    # process count decides none; distill is recorded apart (the runs' config has it off)
    settings = {
        k: v
        for k, v in search.config.decisive().items()
        if k not in ("epochs", "phase2_epochs", "seed", "train_head", "train_norms")
    }
    settings["device"] = search.config.device
    return identity(
        model=model_identity(search.model, search.input_size),
        data=data_identity(search.pipeline),
        space=search.space.to_dict(),
        settings={
            "epochs": search.epochs,
            "search_seed": search.seed,
            "train": settings,
            "distill": search.distill,
            "limits": search.limits.to_dict(),
            "pruner": s["pruner"],
        },
    )


def _grid(search: Search, study, budget: Budget) -> None:
    """A space no larger than the trials asked is a grid: every recipe queued once, in a seeded order (when
    the study starts), and the search ends once each has had its turn (:attr:`.claim.Budget.grid`)."""
    size = search.space.size()
    if budget.trials is None or size > budget.trials:
        return
    budget.trials, budget.grid = size, True
    if study.get_trials(deepcopy=False):
        return  # resumed: queued when it started
    draws = search.space.grid()
    random.Random(search.seed).shuffle(draws)
    for params in draws:
        study.enqueue_trial(params)
    if search.say is not None:
        search.say(f"the space has {len(draws)} recipes, no more than --trials: each is tried once (a grid)")


def as_space(space: Any, base: Recipe) -> Space:
    if space is None:
        return parse_space(base)
    if isinstance(space, Space):
        return space
    if isinstance(space, Mapping):
        unknown = [
            k
            for k in space
            if k not in ("position", "r", "stages", "per_stage", "module", "gate", "squeeze", "lr", "phase2_epochs")
        ]
        if unknown:
            raise RetrofitError(f"space: unknown key {excerpt(unknown[0])}")
        return parse_space(base, **space)
    return load_space(Path(space), base)[0]


def check_counts(trials: int | None, budget: Any, finalists: int) -> None:
    if trials is None and budget is None:
        raise RetrofitError("give --trials N or --budget (training epochs, e.g. 60, or wall time, e.g. 2h)")
    if trials is not None and trials < 1:
        raise RetrofitError(f"--trials must be at least 1, got {trials}")
    if finalists < 0:
        raise RetrofitError(f"--finalists must be 0 or more, got {finalists}")


def parse_budget(value: Any, trials: int | None, trial_epochs: int) -> Budget:
    """``--budget 60`` (training epochs of the study) or ``2h``/``30m``/``90s`` (this process's wall time)."""
    if value is None:
        return Budget(trials=trials, trial_epochs=trial_epochs)
    text = str(value).strip().lower()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([hms]?)", text)
    if match is None or float(match.group(1)) <= 0:
        raise RetrofitError(f"--budget: give training epochs (60) or wall time (2h, 30m, 90s), got {excerpt(value)}")
    number, unit = float(match.group(1)), match.group(2)
    if unit:
        return Budget(trials=trials, seconds=number * {"h": 3600, "m": 60, "s": 1}[unit], trial_epochs=trial_epochs)
    if not number.is_integer() or number < trial_epochs:
        raise RetrofitError(
            f"--budget {excerpt(value, bare=True)}: training epochs are a whole number, at least one "
            "trial's "
            f"{trial_epochs}"
        )
    return Budget(trials=trials, epochs=int(number), trial_epochs=trial_epochs)
