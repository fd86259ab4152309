"""retrofit: add Squeeze-and-Excitation blocks to a trained network by torch.fx surgery.

The steps, one module each: :mod:`~retrofit.trace` (fx, timm-aware) -> :mod:`~retrofit.shapes` (meta
tensors) -> :mod:`~retrofit.sites` (residual/Inception merges, 3x3 convs) -> :mod:`~retrofit.insert`
(by :mod:`~retrofit.recipe` and :mod:`~retrofit.positions`) -> :mod:`~retrofit.measure` (overhead); then
:mod:`~retrofit.finetune` trains the new blocks briefly (data: :mod:`~retrofit.data`, checkpoints:
:mod:`~retrofit.train_state`, torchrun: :mod:`~retrofit.distributed`).
:func:`~retrofit.sweep.sweep` tabulates many recipes from one scan, :mod:`~retrofit.latency` times them,
and with ``data=`` :mod:`~retrofit.ablation` fine-tunes each over seeds next to control arms.

Example::

    >>> import timm, retrofit
    >>> model = timm.create_model("resnet50")
    >>> sites = retrofit.find_sites(model)
    >>> se_model = retrofit.add_se(model, position="standard", r=16)
    >>> report = retrofit.measure_overhead(model, se_model, input_size=(3, 224, 224))
    >>> plain = retrofit.strip(se_model)          # the blocks removed again
    >>> with retrofit.bypass(se_model): ...       # the original network, blocks switched off
    >>> print(retrofit.trainable_parameters(se_model))   # what fine-tuning's phase 1 trains
    >>> retrofit.save(se_model, "se.safetensors", adapter=True)   # only the blocks (and what changed)

Other blocks than SE come from :mod:`~retrofit.attention` (``module="eca"``...); :mod:`~retrofit.strip`
undoes a retrofit. :mod:`~retrofit.checkpoint` saves and loads models (and, with
:mod:`~retrofit.adapter`, adapters on a base model), :mod:`~retrofit.card` writes their model cards. Modules fx cannot trace (a detector, a Hugging Face model) keep their forward and
the parts they call are retrofitted (:mod:`~retrofit.opaque`); a recipe's ``at`` puts blocks on the
outputs of modules you name (:mod:`~retrofit.named`).
"""
from .attention import ATTENTIONS, register_attention
from .bypass import bypass
from .checkpoint import load, save
from .errors import RecipeError, RetrofitError, RetrofitWarning
from .finetune import FinetuneResult, finetune
from .insert import add_se
from .latency import measure_latency
from .measure import Overhead, measure_overhead
from .positions import POSITIONS, register_position
from .recipe import Recipe, builtin_recipes
from .se import SqueezeExcite
from .sites import Site, find_sites
from .strip import strip
from .sweep import sweep
from .trainable import Trainable, trainable_parameters

__all__ = [
    "add_se", "find_sites", "measure_overhead", "Overhead", "save", "load", "Recipe", "builtin_recipes", "Site", "SqueezeExcite", "POSITIONS",
    "register_position", "RetrofitError", "RecipeError", "RetrofitWarning", "strip", "ATTENTIONS",
    "register_attention", "finetune", "FinetuneResult",
    "sweep", "measure_latency", "bypass", "trainable_parameters", "Trainable",
]
__version__ = "0.1.0"
