"""The paper's figure of the "Role of Excitation" for one's own model and data (the optional ``plot`` extra).

Hu et al. (https://arxiv.org/abs/1709.01507, Fig. 6) plot, for blocks at several depths, the mean excitation
of each channel over the images of a few classes: one line per class, channel index on the x axis. Lines
that lie on each other mean the block excites channels alike whatever the class; lines that separate
mean it is class-specific; lines near the top mean it saturates.

    >>> report = retrofit.inspect(model, "data/")
    >>> fig = excitation_figure(report.blocks, report.classes)
    >>> fig.savefig("excitations.png")
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..errors import RetrofitError

PLOT_MISSING = (
    "--plot needs matplotlib, which is not installed; install the extra: "
    "pip install -c constraints.txt 'retrofit[plot]' (or drop --plot)"
)
MAX_CLASSES = 20  # lines per panel: the first classes beyond this are left out (said in the title)


def default_blocks(blocks: Sequence) -> list:
    """The first gate of each stage and the last gate of the model (the paper shows SE_2_3 ... SE_5_3)."""
    chosen, stages = [], set()
    for b in blocks:
        if b.stage not in stages:
            stages.add(b.stage)
            chosen.append(b)
    if blocks and blocks[-1] not in chosen:
        chosen.append(blocks[-1])
    return chosen


def excitation_figure(blocks: Sequence, classes: Sequence[str], chosen: Sequence | None = None):
    """A matplotlib ``Figure``: for each block of ``chosen`` (default :func:`default_blocks`) the mean raw
    gate per channel, one line per class (at most ``MAX_CLASSES``) and a black line for all images.

    Raises:
        RetrofitError: matplotlib is not installed (the ``plot`` extra).
    """
    try:  # deferred: matplotlib is optional (the plot extra); Figure needs no pyplot and no backend state
        from matplotlib.figure import Figure
    except ImportError:
        raise RetrofitError(PLOT_MISSING) from None
    shown = list(chosen) if chosen is not None else default_blocks(blocks)
    cols = min(3, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig = Figure(figsize=(4.6 * cols, 3.2 * rows + 0.6))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    lines = list(enumerate(classes))[:MAX_CLASSES]
    for ax, b in zip(axes, shown):
        for k, name in lines:
            if k < len(b.class_means) and b.class_means[k]:
                ax.plot(range(b.channels), b.class_means[k], linewidth=0.8, alpha=0.8, label=name)
        ax.plot(range(b.channels), b.channel_means, color="black", linewidth=1.4, label="all")
        ax.set_title(f"{b.path} (stage {b.stage}, {b.position})", fontsize=9)
        ax.set_xlabel("channel index", fontsize=8)
        ax.set_ylabel("mean excitation", fontsize=8)
        ax.grid(True, alpha=0.3)
    for ax in axes[len(shown) :]:
        ax.set_visible(False)
    axes[0].legend(fontsize=6, ncol=2)
    more = f" (first {MAX_CLASSES} of {len(classes)} classes)" if len(classes) > MAX_CLASSES else ""
    fig.suptitle(f"Mean excitation per channel, one line per class{more}")
    fig.tight_layout()
    return fig
