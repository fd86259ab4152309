"""Many retrofits at once: the cost grid, the accuracy arms with their controls, the recipe search, the coverage check.

* :mod:`.grid`: :func:`~retrofit.sweep.grid.sweep`, every combination of r, position and stages from one scan;
* :mod:`.rows`: one row of a sweep;
* :mod:`.ablation`: with data, each combination fine-tuned over seeds next to the control arms;
* :mod:`.tune`: ``retrofit tune``, a budgeted recipe search (Optuna) that ends with the same control arms;
* :mod:`.check`: ``retrofit check``, the pass run over timm's model families;
* :mod:`.fold`: :func:`~retrofit.sweep.fold.fold`, the gates that learnt a constant folded (a search over
  folded copies).

This package imports nothing when it is imported itself: ``retrofit.sweep`` is also the public
function (see :mod:`retrofit`).
"""
