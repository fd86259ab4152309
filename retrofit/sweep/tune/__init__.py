"""`retrofit tune`: a budgeted search for the recipe that pays, on Optuna, ending with the sweep's controls.

One concept per module:

* :mod:`.space`: the search space (flags in the sweep's syntax, or a YAML file), checked on the scan, and
  one trial's recipe from the sampler's draws;
* :mod:`.limits`: ``--max-params``/``--max-macs``/``--max-latency``, known before training;
* :mod:`.storage`: the study's store (a journal file, or an RDB URL), opened with one error line;
* :mod:`.workers`: which process runs which trial, and the trials of dead processes failed and retried;
* :mod:`.claim`: the loops that run exactly N trials, or every finish job once, over any number of processes;
* :mod:`.sampling`: the sampler (seeded per trial) and the pruner, as Optuna recommends combining them;
* :mod:`.study`: the study opened or resumed, with its identity (model, data, space, settings) checked;
* :mod:`.voice`: under torchrun, rank 0 decides and every rank trains the same recipe;
* :mod:`.objective`: one trial: dedupe, limits, build, fine-tune with a pruning hook;
* :mod:`.finish`: the finalists re-run over seeds next to the control arms, the verdict, the best recipe;
* :mod:`.report`: the trials' rows, progress lines and the summary;
* :mod:`.api`: :func:`retrofit.tune`.

Optuna is an optional extra: importing any of these modules without it is one error that says what to
install.
"""

from __future__ import annotations

from ...errors import RetrofitError

NEEDS_OPTUNA = (
    "retrofit tune needs Optuna, which is not installed; install the extra: pip install -e '.[tune]' "
    "(from a checkout; or pip install -c constraints.txt 'retrofit[tune]')"
)

try:
    import optuna  # the tune extra: every module of this package uses it
except ImportError:
    raise RetrofitError(NEEDS_OPTUNA) from None

OPTUNA_VERSION = optuna.__version__
