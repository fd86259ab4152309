"""Coverage check: does the pass work on a model? Build it, find its sites, insert SE, verify.

For each model :func:`check_model` builds it (small ``num_classes``), randomises its weights and norm
statistics (fresh timm weights zero the last norm of many residual branches, which would make a
broken insertion look function-preserving), picks a small input size, and then, for the ``standard``
position and, where the model has 3x3 convolutions in residual branches, the ``inside`` position:

1. inserts blocks with the default recipe (r 16, divisor 1, min width 1, biases, preserving init),
   or another r: a number, or per stage (``r={2: 8, 5: 32}``, ``--r 2:8,5:32``);
2. runs forward and backward (every inserted block must receive gradients);
3. checks the output shape is unchanged and the output equal to the original's
   (``max |a - b| / max(1, max |b|) <= 1e-5``, the core issue's tolerance);
4. checks the added parameters against the paper's count, computed here and not by the code under
   test: a block on C channels has ``2 C w + w + C`` parameters with ``w = max(1, floor(C / r + 1/2))``
   (r of the block's stage when r is given per stage), and the blocks' channels must be channels of
   the sites the analysis reported.

:func:`check_models` runs many models, catching everything per model (and with a per-model time
limit), so a model the pass cannot handle is a row with a reason, never the end of a sweep.
:func:`smallest_per_family` picks the smallest model of each timm architecture family.

Example::

    >>> from retrofit.sweep.check import check_model
    >>> r = check_model("resnet18")
    >>> r.status, r.sites, r.params_added["standard"]
    ('ok', {'residual': 8, 'inception': 0, 'conv3x3': 16, 'pyramid': 0}, 89080)
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import re
import signal
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models._registry import _model_to_module
from torch import nn

from ..errors import RetrofitError, first_line
from ..events import Event, OnEvent, emit, legacy
from ..files.atomic import WriteError, atomic_write
from ..files.models import create_model
from ..graph.model import resolve_input_size
from ..surgery.info import get_info
from ..surgery.insert import add_se
from ..surgery.recipe import Recipe
from ..surgery.recipe_fields import StageMap
from ..surgery.sites import KINDS, scan

TOLERANCE = 1e-5
R = 16  # the recipe the check uses: timm-free defaults, see se_params
POSITIONS = ("standard", "inside")
_KINDS = {"standard": ("residual", "inception"), "inside": ("conv3x3",)}
NUM_CLASSES = 10  # a small head: the classifier is not what is checked
SMALL_SIDE = 64  # the input side tried first (the model's own size when it refuses it)

# Statuses: ``ok`` every check passed; ``no sites``: the model has no residual or Inception merge
# (nothing to retrofit, e.g. VGG); ``unsupported``: it has candidate merges but the pass skipped
# them all (the reason says why); ``fail``: a check failed or something raised.
STATUSES = ("ok", "no sites", "unsupported", "fail")


@dataclass
class CheckResult:
    """The outcome of :func:`check_model` for one model."""

    model: str
    family: str | None = None
    status: str = "fail"
    reason: str = ""  # one line; empty when ok
    input_size: tuple[int, ...] | None = None
    sites: dict[str, int] = field(default_factory=dict)  # kind -> count
    skipped: int = 0  # candidates (and sites) the pass skipped
    blocks: dict[str, int] = field(default_factory=dict)  # position -> blocks inserted
    params_added: dict[str, int] = field(default_factory=dict)  # position -> parameters added
    max_diff: dict[str, float] = field(default_factory=dict)  # position -> preservation error
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict:
        return asdict(self)


def se_params(channels: int, r: float = R) -> int:
    """Parameters of one SE block with biases, by the paper's formula (not by the code under test)."""
    width = max(1, int(channels / r + 0.5))
    return 2 * channels * width + width + channels


def parse_ratio(r: Any) -> Any:
    """The check's r: a number, or a per-stage map (``{2: 8, 5: 32}``, ``"2:8,5:32"``) as the
    recipe reads it (so it is refused the same way; stages not named get r 16)."""
    return Recipe(r=r).r


def ratio_at(r: Any, stage: int) -> float:
    """The r of a block in ``stage``: a plain lookup in the map the user gave, not the recipe's."""
    return dict(r.values).get(stage, r.base) if isinstance(r, StageMap) else r


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights, biases, norm affines and norm statistics (in place); returns it in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.is_floating_point():
                continue
            fan_in = p[0].numel() if p.dim() > 1 else 1
            scale = (1.0 / fan_in) ** 0.5 if p.dim() > 1 else 0.5
            one = 1.0 if name.endswith("weight") and p.dim() == 1 else 0.0
            p.normal_(one, scale, generator=g)  # in place: no temporary the size of the model
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b| / max(1, max |b|)``: the preservation criterion."""
    return ((a - b).abs().max() / max(1.0, b.abs().max().item())).item()


class TimeLimit(Exception):
    """A model took longer than the per-model limit."""


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Raise :class:`TimeLimit` in this thread after ``seconds`` (SIGALRM: main thread, Unix only;
    elsewhere no limit). A long C++ call finishes before the signal is handled."""
    usable = seconds and hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def expire(signum, frame):
        raise TimeLimit(f"took longer than the {seconds:g} s limit")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _input_sizes(model: nn.Module) -> list[tuple[int, ...]]:
    """Sizes to try, smallest first: squares from ``SMALL_SIDE`` up (Inception nets need 75x75),
    the model's minimum size, its own size; never above its own size."""
    own = resolve_input_size(model)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    sizes = [(own[0], side, side) for side in (SMALL_SIDE, 75, 96, 128)]
    if isinstance(cfg, dict) and cfg.get("min_input_size"):
        sizes.append(tuple(cfg["min_input_size"]))
    sizes = sorted(s for s in sizes if s[1] < own[1] and s[2] < own[2]) + [own]
    return list(dict.fromkeys(sizes))


def _build(name: str) -> nn.Module:
    try:
        return create_model(name, num_classes=NUM_CLASSES)
    except RetrofitError:
        raise
    except Exception:  # a model that fixes its head size: build it as it is
        return create_model(name)


def check_model(
    model: str | nn.Module,
    *,
    input_size: Sequence[int] | None = None,
    family: str | None = None,
    time_limit_s: float | None = None,
    name: str | None = None,
    inplace: bool = False,
    r: Any = R,
) -> CheckResult:
    """Check that the pass handles ``model``; never raises for a model it cannot handle.

    Args:
        model: a timm model name, or a module (used as is, weights randomised on a copy).
        input_size: ``(C, H, W)``; default: the first of 64x64, the model's minimum size and its own
            size at which it traces and runs.
        family: the architecture family, for the report.
        time_limit_s: give up on the model after this many seconds (main thread only).
        name: the name to report (default: the model name or class).
        inplace: a module given is randomised and retrofitted itself, not a copy (saves memory
            and time when the caller does not need it afterwards).
        r: the blocks' reduction ratio, or a per-stage map of them (``{2: 8, 5: 32}``); a stage
            the map names that the model does not have fails the model.

    Returns:
        A :class:`CheckResult`; ``status`` is one of ``STATUSES`` and ``reason`` says why when not ok.

    Raises:
        RecipeError: a bad ``r`` (before any model is built).

    Example::

        >>> r = check_model("vgg11")
        >>> r.status, r.reason
        ('no sites', 'no residual or Inception merge in vgg11')
    """
    r = parse_ratio(r)
    label = name or (model if isinstance(model, str) else type(model).__name__)
    result = CheckResult(label, family)
    start = time.perf_counter()
    try:
        with time_limit(time_limit_s), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _check(model, label, input_size, result, inplace, r)
    except TimeLimit as err:
        result.status, result.reason = "fail", str(err)
    except RetrofitError as err:
        result.status, result.reason = "fail", first_line(err)
    except Exception as err:  # the point of the sweep: any failure is a row, not a crash
        result.status, result.reason = "fail", f"{type(err).__name__}: {first_line(err)}"
    finally:
        result.seconds = round(time.perf_counter() - start, 2)
        gc.collect()
    return result


def _check(model, label: str, input_size, result: CheckResult, inplace: bool, r: Any = R) -> None:
    net = _build(model) if isinstance(model, str) else model if inplace else copy.deepcopy(model)
    randomize(net)
    sizes = [tuple(input_size)] if input_size is not None else _input_sizes(net)
    problems = []
    for i, size in enumerate(sizes):  # the smallest size the model both traces and runs at
        try:
            found = scan(net, size)
            x = torch.randn((1, *size), generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                reference = net(x)
        except Exception as err:
            problems.append(f"at {'x'.join(map(str, size))}: {first_line(err)}")
            continue
        # a model that resizes its input itself (CrossViT) runs at any size, but its token sums fit
        # no patch grid of a foreign one: try the next size, down to the model's own
        if i + 1 < len(sizes) and any("match no patch grid" in s.reason for s in found.skipped):
            continue
        break
    else:
        raise RetrofitError(problems[-1] if len(problems) == 1 else "; ".join(problems[-2:]))
    result.input_size = size
    result.sites = {k: found.count(k) for k in KINDS}
    result.skipped = len(found.skipped)
    if not isinstance(reference, torch.Tensor):
        raise RetrofitError(f"its output is a {type(reference).__name__}, not a tensor")
    if not found.sites:
        reasons = Counter(s.reason for s in found.skipped)
        unsupported = Counter({r: n for r, n in reasons.items() if _unsupported(r)})
        if unsupported:
            reason, n = unsupported.most_common(1)[0]
            result.status, result.reason = "unsupported", f"{n} candidate(s) skipped: {reason}"
        else:
            result.status = "no sites"
            result.reason = f"no residual or Inception merge in {label}"
            if reasons:
                reason, n = reasons.most_common(1)[0]
                result.reason += f" ({n} candidate(s) are not: {reason})"
        return
    base_params = sum(p.numel() for p in net.parameters())
    todo = [p for p in POSITIONS if any(s.kind in _KINDS[p] for s in found.sites)]
    for position in todo:
        candidates = [s for s in found.sites if s.kind in _KINDS[position]]
        try:  # the last position may change the model itself: the reference output is already kept
            se = add_se(net, position=position, r=r, input_size=size, inplace=position == todo[-1])
        except RetrofitError:
            if position == "inside":  # e.g. every 3x3 conv already ends its branch: nothing to check
                continue
            raise
        info = get_info(se)
        result.skipped += len(info.skipped) - len(found.skipped)
        _verify(base_params, se, info, candidates, x, reference, position, result, r)
    result.status = "ok"


def _unsupported(reason: str) -> bool:
    """A skip that is a merge the pass cannot handle (not a sum or concatenation that is no merge)."""
    return any(k in reason for k in ("not supported", "cannot trace", "called", "cannot be", "unknown"))


def _verify(base_params, se, info, candidates, x, reference, position, result, r=R) -> None:
    where = f"{position} position"
    se.eval()
    out = se(x)
    if out.shape != reference.shape:
        raise RetrofitError(f"{where}: output shape {tuple(out.shape)} != original {tuple(reference.shape)}")
    diff = max_rel_diff(out.detach(), reference)
    if not diff <= TOLERANCE:
        raise RetrofitError(f"{where}: outputs differ by {diff:.2e} (> {TOLERANCE:g}) with the preserving init")
    blocks = [se.get_submodule(b.path) for b in info.blocks]
    params = [list(m.parameters()) for m in blocks]
    # backward to the blocks' parameters: through every layer after them, without the weight
    # gradients of the original layers (half the cost; their backward is the original model's)
    grads = torch.autograd.grad(out.float().square().mean(), [p for ps in params for p in ps], allow_unused=True)
    it = iter(grads)
    dead = [b.path for b, ps in zip(info.blocks, params) if any(g is None for g in [next(it) for _ in ps])]
    if dead:
        raise RetrofitError(f"{where}: {len(dead)} block(s) get no gradient (e.g. {dead[0]}): not on the output's path")
    site_channels = Counter(s.channels for s in candidates)
    block_channels = Counter(b.channels for b in info.blocks)
    if block_channels - site_channels:
        extra = next(iter(block_channels - site_channels))
        raise RetrofitError(f"{where}: a block on {extra} channels matches no site's channels")
    expected = sum(se_params(b.channels, ratio_at(r, b.stage)) for b in info.blocks)
    added = sum(p.numel() for p in se.parameters()) - base_params
    if added != expected:
        raise RetrofitError(f"{where}: {added} parameters added, the formula gives {expected}")
    result.blocks[position] = len(info.blocks)
    result.params_added[position] = added
    result.max_diff[position] = diff


def check_models(
    models: Iterable[str | tuple[str, str]],
    *,
    time_limit_s: float | None = None,
    on_event: OnEvent | None = None,
    r: Any = R,
    on_result: Callable[[CheckResult], None] | None = None,
) -> list[CheckResult]:
    """:func:`check_model` for each model (a name, or ``(family, name)``), one result each, in order.

    ``on_event`` is called with a ``model`` :class:`retrofit.Event` after each model (``data["result"]``: its
    result; progress output); ``r`` as for :func:`check_model`; ``on_result``: deprecated, ``on_event``."""
    on_event = legacy(on_event, "check_models", on_result=on_result)
    r = parse_ratio(r)
    results = []
    for item in models:
        family, name = item if isinstance(item, tuple) else (family_of(item), item)
        result = check_model(name, family=family, time_limit_s=time_limit_s, r=r)
        results.append(result)
        emit(
            on_event,
            Event("check", "model", f"{result.family or ''} {result.model}: {result.status}", {"result": result}),
        )
    return results


def summarize(results: Sequence[CheckResult]) -> dict:
    """Counts by status and the success rate over the models that have merges (all but ``no sites``)."""
    counts = Counter(r.status for r in results)
    with_merges = len(results) - counts["no sites"]
    return {
        "models": len(results),
        **{s: counts[s] for s in STATUSES},
        "success_rate": counts["ok"] / with_merges if with_merges else 1.0,
    }


# -- families --------------------------------------------------------------------------------------
def family_of(name: str) -> str | None:
    """The timm family (the defining module, as :func:`families` has it) of a model name, a pretrained
    tag (``resnet18.a1_in1k``) allowed; None for a name timm does not know."""
    return _model_to_module.get(timm.models.get_arch_name(name))


def families() -> dict[str, list[str]]:
    """timm's architecture families: the module that defines each model (``resnet``, ``byobnet``,
    ``vision_transformer``...), as timm's registry records it; model names in registry order."""

    found: dict[str, list[str]] = {}
    for name in timm.list_models(exclude_filters=["test_*"]):  # timm's tiny unit-test models
        found.setdefault(_model_to_module.get(name, "?"), []).append(name)
    return found


def param_count(name: str) -> int | None:
    """Parameters of a timm model, counted on a model built on the meta device: no memory, no init
    cost, exact (unlike names or pretrained configs, which say nothing reliable about size)."""
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            net = timm.create_model(name)
        return sum(p.numel() for p in net.parameters())
    except Exception:
        return None


# Size words that mark the big members of a family (timm's naming); they are not counted when the
# family has other models. A shortcut only: building every one of timm's ~1,300 models on meta takes
# 5-20 minutes on a small shared CPU, longer than the checks themselves.
_BIG = re.compile(r"(^|_)(base|large|huge|giant\w*|gigantic|enormous|x*large|x*l|medium|\d+b)(_|$)")
# ...and of the names that differ only by their input size (``_224``, ``_384``), the first is counted.
_RESOLUTION = re.compile(r"_\d{3,4}$")


def smallest_per_family(only: Iterable[str] | None = None, cache: bool = True) -> list[tuple[str, str]]:
    """``(family, model)`` for the smallest model (fewest parameters) of each timm family.

    The models of a family are built on the meta device to count their parameters (see
    :func:`param_count`), except those whose name marks them big (``_base``, ``_large``...) when
    others remain; a family none of whose models builds gets its first model. With ``cache``, the
    picks are kept in ``~/.cache/retrofit/smallest-<timm version>.json`` for the next run."""
    path = Path.home() / ".cache" / "retrofit" / f"smallest-{timm.__version__}.json"
    known: dict[str, str] = {}
    if cache and path.is_file():
        with contextlib.suppress(Exception):
            known = json.loads(path.read_text())
    wanted = None if only is None else set(only)
    picked = []
    for family, names in sorted(families().items()):
        if wanted is not None and family not in wanted:
            continue
        if family not in known:
            small = [n for n in names if not _BIG.search(n)] or names
            small = list({_RESOLUTION.sub("", n): n for n in reversed(small)}.values())
            sized = [(c, n) for n in small if (c := param_count(n)) is not None]
            known[family] = min(sized)[1] if sized else names[0]
        picked.append((family, known[family]))
    if cache:
        with contextlib.suppress(OSError, WriteError):  # a cache: not being able to write it is harmless
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(path) as tmp:
                tmp.write_text(json.dumps(known, indent=1, sort_keys=True))
    return picked
