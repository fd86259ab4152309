"""retrofit: add Squeeze-and-Excitation blocks to a trained network by torch.fx surgery.

Method: Hu et al., "Squeeze-and-Excitation Networks" (CVPR 2018), https://arxiv.org/abs/1709.01507.

Example::

    >>> import timm, torch, retrofit
    >>> model = timm.create_model("resnet50")
    >>> sites = retrofit.find_sites(model)
    >>> se_model = retrofit.add_se(model, position="standard", r=16)
    >>> report = retrofit.measure_overhead(model, se_model, input_size=(3, 224, 224))
    >>> len(retrofit.get_info(se_model).blocks), retrofit.get_info(model)   # what was inserted (None: untouched)
    (16, None)
    >>> plain = retrofit.strip(se_model)          # the blocks removed again
    >>> with retrofit.bypass(se_model):           # the original network, blocks switched off
    ...     logits = se_model(torch.randn(1, 3, 224, 224))
    >>> print(retrofit.trainable_parameters(se_model))   # what fine-tuning's phase 1 trains
    trainable parameters: 2,530,992 || all: 28,088,024 || 9.01%
    >>> folder = retrofit.save_pretrained(se_model, "se/")   # config.json, model.safetensors, README.md
    >>> again = retrofit.from_pretrained("se/")               # the same model again
    >>> path = retrofit.save(se_model, "se.safetensors", adapter=True)   # one file: only the blocks (and what changed)

After a fine-tune on your data, ``retrofit.inspect(tuned, "data/")`` says what each gate does there and
``retrofit.fold(tuned, "data/", tolerance=0.5).model`` folds the gates that learnt a constant.

The package reads as its layers, lowest first; a module imports only from its own layer and those
below (``lint-imports`` checks it; docs/contributing/architecture.md draws it):

* :mod:`retrofit.errors`: the error users see;
* :mod:`retrofit.blocks`: what is inserted (SE, timm's other attention blocks, their configuration);
* :mod:`retrofit.graph`: torch.fx machinery (trace, shapes, rebuilt and installed forwards);
* :mod:`retrofit.surgery`: where and how (recipe, sites, positions, plan, insertion, strip, bypass);
* :mod:`retrofit.measure`: overhead, latency, report tables;
* :mod:`retrofit.files`: save, load, adapters, model cards, weight files;
* :mod:`retrofit.train`: the fine-tune;
* :mod:`retrofit.sweep`: the cost grid, the accuracy arms, the recipe search (``tune``), the coverage check;
* :mod:`retrofit.cli`: the ``retrofit`` command.

The names below are the public API. Each is imported on first use (PEP 562's module ``__getattr__``),
so ``import retrofit`` and ``retrofit --help`` import neither torch nor timm (nor Optuna, which
``retrofit.tune`` needs: the optional ``tune`` extra).
"""

from __future__ import annotations

import importlib
from importlib.metadata import version
from typing import TYPE_CHECKING, Any

# `retrofit.sweep` is the sweep function. Its layer package (which imports nothing) is imported first
# and the attribute the import system binds to it is taken off again, so a later `import
# retrofit.sweep.grid` cannot bind the package over the function: like every public name, `sweep` is
# looked up in _API on first use.
importlib.import_module(".sweep", __name__)
globals().pop("sweep")

# public name -> the module (under retrofit) that defines it
_API: dict[str, str] = {
    "add_se": "surgery.insert",
    "find_sites": "surgery.sites",
    "Site": "surgery.sites",
    "Recipe": "surgery.recipe",
    "builtin_recipes": "surgery.recipe",
    "POSITIONS": "surgery.positions",
    "register_position": "surgery.positions",
    "strip": "surgery.strip",
    "bypass": "surgery.bypass",
    "trainable_parameters": "surgery.trainable",
    "Trainable": "surgery.trainable",
    "get_info": "surgery.info",
    "RetrofitInfo": "surgery.info",
    "BlockInfo": "surgery.info",
    "SqueezeExcite": "blocks.se",
    "ATTENTIONS": "blocks.attention",
    "register_attention": "blocks.attention",
    "measure_overhead": "measure.overhead",
    "Overhead": "measure.overhead",
    "measure_latency": "measure.latency",
    "save": "files.checkpoint",
    "load": "files.checkpoint",
    "save_pretrained": "files.pretrained",
    "from_pretrained": "files.pretrained",
    "create": "files.create",
    "create_model": "files.create",
    "Retrofitted": "files.create",
    "finetune": "train.finetune",
    "FinetuneResult": "train.result",
    "FinetuneConfig": "train.config",
    "Event": "events",
    "inspect": "train.inspect",
    "Inspection": "train.inspect",
    "fold": "sweep.fold",
    "FoldResult": "sweep.fold",
    "sweep": "sweep.grid",
    "sweep_model": "sweep.by_name",
    "SweepReport": "sweep.by_name",
    "tune": "sweep.tune.api",
    "tune_model": "sweep.tune.by_name",
    "check_models": "sweep.check",
    "TuneResult": "sweep.tune.api",
    "RetrofitError": "errors",
    "RecipeError": "errors",
    "RetrofitWarning": "errors",
}

if TYPE_CHECKING:  # what type checkers and IDEs see; tests/test_layers.py keeps it equal to _API
    from .blocks.attention import ATTENTIONS, register_attention
    from .blocks.se import SqueezeExcite
    from .errors import RecipeError, RetrofitError, RetrofitWarning
    from .events import Event
    from .files.checkpoint import load, save
    from .files.create import Retrofitted, create, create_model
    from .files.pretrained import from_pretrained, save_pretrained
    from .measure.latency import measure_latency
    from .measure.overhead import Overhead, measure_overhead
    from .surgery.bypass import bypass
    from .surgery.info import BlockInfo, RetrofitInfo, get_info
    from .surgery.insert import add_se
    from .surgery.positions import POSITIONS, register_position
    from .surgery.recipe import Recipe, builtin_recipes
    from .surgery.sites import Site, find_sites
    from .surgery.strip import strip
    from .surgery.trainable import Trainable, trainable_parameters
    from .sweep.by_name import SweepReport, sweep_model
    from .sweep.check import check_models
    from .sweep.fold import FoldResult, fold
    from .sweep.grid import sweep
    from .sweep.tune.api import TuneResult, tune
    from .sweep.tune.by_name import tune_model
    from .train.config import FinetuneConfig
    from .train.finetune import finetune
    from .train.inspect import Inspection, inspect
    from .train.result import FinetuneResult

__all__ = list(_API)
__version__ = version("retrofit")


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'retrofit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # found by plain lookup from now on
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
