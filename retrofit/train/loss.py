"""The training objective: the label loss (with label smoothing and mixup / cutmix from timm) plus,
optionally, distillation from the original network.

* **label smoothing** (Szegedy et al., "Rethinking the Inception Architecture", CVPR 2016,
  https://arxiv.org/abs/1512.00567): timm's ``LabelSmoothingCrossEntropy``;
* **mixup** (Zhang et al., ICLR 2018, https://arxiv.org/abs/1710.09412) and **cutmix** (Yun et al.,
  ICCV 2019, https://arxiv.org/abs/1905.04899): :class:`timm.data.Mixup` (one mixing factor per batch,
  cutmix or mixup chosen with probability 0.5 when both are on; the soft targets carry the smoothing)
  and timm's ``SoftTargetCrossEntropy``. timm's Mixup needs an even batch; an odd micro-batch (the
  last one of an epoch, or one that lost an undecodable image) mixes its first ``n - 1`` images and
  keeps the last one as it is, with its own (smoothed) label;
* **distillation** (Hinton et al., "Distilling the Knowledge in a Neural Network", 2015,
  https://arxiv.org/abs/1503.02531): the teacher is the network the user brought. In phase 1 that is
  the model itself with its blocks bypassed (:func:`retrofit.bypass`: the backbone
  is frozen), so it costs no weights, only one more forward pass per step, in eval mode (running
  statistics, no dropout) and without gradients; when the head is new, the teacher uses the head
  being trained. In phase 2 the backbone moves, so the bypassed model would no longer be the original:
  the teacher is then a frozen copy taken when phase 2 starts (:meth:`Objective.freeze_teacher`: the
  original backbone, the blocks bypassed, the head as phase 1 left it), one more copy of the weights
  in memory and in ``train_state.pt``.
  The loss is ``label loss + weight * T^2 * KL(teacher_T || student_T)`` on the logits softened by the
  temperature ``T``: the formula of timm's ``LogitDistillationTask`` (task weight 1, independent distill
  weight). That class is not used as such because it wraps a separate teacher model built apart from
  the student; here the teacher is the student, bypassed.

The random draws (mixup's factor and box) come from NumPy's global generator, which the run seeds at
every epoch from ``(seed, epoch)``: a resumed run draws the same ones.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.data.mixup import mixup_target
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from ..errors import RetrofitError
from ..files.tensors import with_metadata
from ..surgery.bypass import blocks_off


@dataclass
class Objective:
    """What one training step minimises; built once per run from its settings.

    Args:
        classes: number of classes of the data (mixup's targets have this width).
        smoothing: label smoothing (0: plain cross-entropy).
        mixup, cutmix: Beta(alpha, alpha) parameters of timm's Mixup (0: off).
        distill: weight of the distillation term (0: off).
        temperature: distillation temperature ``T``.
    """

    classes: int
    smoothing: float
    mixup: float
    cutmix: float
    distill: float
    temperature: float

    def __post_init__(self) -> None:
        self.frozen: nn.Module | None = None  # phase 2's teacher (see freeze_teacher)
        self.mixer = None
        if self.mixup > 0 or self.cutmix > 0:
            self.mixer = Mixup(
                mixup_alpha=self.mixup,
                cutmix_alpha=self.cutmix,
                label_smoothing=self.smoothing,
                num_classes=self.classes,
            )
            self.label_loss = SoftTargetCrossEntropy()
        elif self.smoothing > 0:
            self.label_loss = LabelSmoothingCrossEntropy(self.smoothing)
        else:
            self.label_loss = F.cross_entropy  # timm's train.py uses plain cross-entropy here too

    def mix(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch and its targets after mixup / cutmix (``x`` is mixed in place); without them,
        ``(x, y)`` unchanged."""
        if self.mixer is None:
            return x, y

        target = mixup_target(y, self.classes, 1.0, self.smoothing)  # each image its own (smoothed) label
        even = len(x) - len(x) % 2
        if even:
            _, target[:even] = self.mixer(x[:even], y[:even])
        return x, target

    def __call__(self, logits: torch.Tensor, target: torch.Tensor, teacher: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of one micro-batch: the label loss plus, when a teacher's logits are given, the
        weighted distillation term."""
        if target.dim() == 2 and logits.shape[1] != target.shape[1]:
            raise RetrofitError(
                f"mixup needs a model with one output per class: it gives {logits.shape[1]} "
                f"outputs for {target.shape[1]} classes"
            )
        loss = self.label_loss(logits, target)
        if teacher is not None:
            loss = loss + self.distill * kd_loss(logits, teacher, self.temperature)
        return loss

    def teacher_logits(self, model: nn.Module, x: torch.Tensor, autocast) -> torch.Tensor | None:
        """The original network's logits on ``x`` (None when not distilling): ``model`` with its blocks
        bypassed, or the frozen copy of phase 2."""
        if not self.distill:
            return None
        teacher = self.frozen if self.frozen is not None else model
        with torch.no_grad(), eval_mode(teacher), blocks_off(teacher), autocast():
            return teacher(x).float()

    def freeze_teacher(self, model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> None:
        """From now on the teacher is a frozen copy of ``model`` (its weights now, or ``state``: a
        resumed phase 2 gets back the copy it started with). Nothing to do when not distilling."""
        if not self.distill:
            return

        self.frozen = copy.deepcopy(model).eval().requires_grad_(False)
        if state is not None:
            self.frozen.load_state_dict(with_metadata(state, self.frozen), strict=True)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch (timm's
    ``LogitDistillationTask`` formula)."""
    log_s = F.log_softmax(student / temperature, dim=-1)
    log_t = F.log_softmax(teacher / temperature, dim=-1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * temperature**2


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every module in eval mode for the block, then each back in its own mode (phase 1 keeps the norm
    layers in eval mode inside a training model; ``model.train()`` would lose that)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
