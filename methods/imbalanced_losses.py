"""SubpopBench's losses from class-imbalanced learning: Focal, LDAM and BSoftmax.

Focal needs no labels beyond y; LDAM and BSoftmax need the class sizes n_c of the training
split, which the class labels give (SubpopBench sums its group sizes over the attributes), so
none of them needs group labels. Minibatches are the harness's uniform draws, as SubpopBench's
default sampler.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from optuna.distributions import CategoricalDistribution, FloatDistribution

from robustbench_mat.data import BenchmarkDataset
from robustbench_mat.hparams import HParam
from robustbench_mat.method import Batch, Method
from robustbench_mat.methods.invariance import SUBPOPBENCH
from robustbench_mat.methods.reweighting import class_balanced_weights
from robustbench_mat.registry import register_method

if TYPE_CHECKING:
    from robustbench_mat.runner import RunContext


def class_sizes(method: Method) -> torch.Tensor:
    """n_c: how many examples of each class the method's training split has."""
    return torch.bincount(method.train_split().y, minlength=method.dataset.n_classes)


def focal_loss(losses: torch.Tensor, gamma: float | torch.Tensor) -> torch.Tensor:
    """Lin et al.'s (1 - p)^γ * CE of every example, from its cross-entropy CE = -log p.

    1 - p is taken as -expm1(-CE), and kept at least the smallest normal float, so that an
    example fitted to CE = 0 has a finite gradient for every γ."""
    complement = -torch.expm1(-losses)
    return complement.clamp_min(torch.finfo(losses.dtype).tiny).pow(gamma) * losses


def ldam_margins(sizes: torch.Tensor, max_margin: float) -> torch.Tensor:
    """Cao et al.'s margins n_c^(-1/4), scaled so that the largest is `max_margin`; 0 for an
    empty class (float64)."""
    counts = sizes.double()
    raw = torch.where(counts > 0, counts.clamp(min=1).pow(-0.25), torch.zeros_like(counts))
    return raw * (max_margin / raw.max())


@register_method("focal")
class Focal(Method):
    """Focal loss (Lin et al. 2017), as SubpopBench: the batch mean of (1 - p_y)^γ * CE.

    p_y = exp(-CE) is the softmax probability of the true class, so confidently fitted
    examples weigh less; γ = 0 is ERM. No class weights (SubpopBench's `Focal` has no α).

    Default and search range from SubpopBench's `hparams_registry`: γ = 1, searched as
    0.5 * 10^U(0, 1), i.e. log-uniform in [0.5, 5]. Departure: 1 - p_y is computed as
    -expm1(-CE) and clamped at the smallest normal float (theirs 1 - exp(-CE): the same up to
    rounding; theirs has a NaN gradient at CE = 0 for γ < 1).
    """

    paper = f"Lin et al. 2017, Focal Loss for Dense Object Detection (ICCV); {SUBPOPBENCH}"
    stack_varying = ("gamma",)
    hparams = {
        "gamma": HParam(
            1.0,
            "γ: the exponent of (1 - p_y) that scales each example's cross-entropy",
            search=FloatDistribution(0.5, 5.0, log=True),
            ge=0,
        ),
    }

    def loss(self, batch: Batch) -> torch.Tensor:
        losses = F.cross_entropy(self.model(batch.x).float(), batch.y, reduction="none")
        return focal_loss(losses, self.hp["gamma"]).mean()


@register_method("ldam")
class LDAM(Method):
    """LDAM (Cao et al. 2019), as SubpopBench: cross-entropy of s * (logits - margin of y on y).

    Each class c gets a margin m_c ∝ n_c^(-1/4) (n_c its training size), scaled so that the
    largest is `max_m`; an example of class y has m_y subtracted from its true-class logit,
    and the loss is the cross-entropy of the logits so shifted, times `scale` (s). Prediction
    uses the plain logits. Needs class sizes only.

    With `drw` (Cao et al.'s deferred re-weighting, not in SubpopBench) the loss is, from
    `drw_start` x the run's steps on, the class-weighted cross-entropy with Cui et al.'s weights
    w_c ∝ (1 - β) / (1 - β^n_c), β = `drw_beta`, normalised to sum to the number of classes,
    averaged as PyTorch's weighted mean Σ w_y CE / Σ w_y (their LDAMLoss with
    `--train_rule DRW`: β = 0.9999 from epoch 160 of 200, so `drw_start` 0.8); before that,
    unweighted.

    Defaults and search ranges from SubpopBench's `hparams_registry`: max_m = 0.5 (searched
    10^U(-1, -0.1): log-uniform in [0.1, 0.794]), scale = 30 (one of 10, 30); `drw` off, as
    SubpopBench.
    """

    paper = (
        "Cao et al. 2019, Learning Imbalanced Datasets with Label-Distribution-Aware Margin "
        f"Loss (NeurIPS); {SUBPOPBENCH}"
    )
    stack_varying = ("max_m", "scale")  # max_m enters only through each model's own margins
    hparams = {
        "max_m": HParam(
            0.5,
            "the largest class margin (that of the smallest class)",
            search=FloatDistribution(0.1, 10**-0.1, log=True),
            gt=0,
        ),
        "scale": HParam(
            30.0,
            "s: the factor of the shifted logits in the cross-entropy",
            search=CategoricalDistribution([10.0, 30.0]),
            gt=0,
        ),
        "drw": HParam(
            False,
            "deferred re-weighting: class-balanced weights from drw_start on (Cao et al.'s DRW; "
            "off in SubpopBench)",
        ),
        "drw_start": HParam(
            0.8,
            "fraction of the run after which DRW weights apply (Cao et al.: 160 / 200)",
            ge=0,
            le=1,
        ),
        "drw_beta": HParam(0.9999, "β of DRW's class-balanced weights (Cao et al.)", ge=0, lt=1),
    }

    def __init__(self, dataset: BenchmarkDataset, hparams: dict[str, Any]) -> None:
        super().__init__(dataset, hparams)
        sizes = class_sizes(self)
        margins = ldam_margins(sizes, hparams["max_m"]).float()
        self.register_buffer("margins", margins, persistent=False)
        drw_weights = class_balanced_weights(sizes, hparams["drw_beta"]).float()
        self.register_buffer("drw_weights", drw_weights, persistent=False)
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self.drw_from: int | None = None

    def prepare(self, context: RunContext) -> None:
        self.drw_from = int(self.hp["drw_start"] * context.settings.steps)

    def loss(self, batch: Batch) -> torch.Tensor:
        logits = self.model(batch.x).float()
        target = F.one_hot(batch.y, logits.shape[-1]).to(logits.dtype)
        scaled = self.hp["scale"] * (logits - target * self.margins)
        if not self.hp["drw"]:
            return F.cross_entropy(scaled, batch.y)
        if self.drw_from is None:
            raise RuntimeError("LDAM's deferred re-weighting needs the run's length: call prepare")
        losses = F.cross_entropy(scaled, batch.y, reduction="none")
        deferred = self.steps_done >= self.drw_from
        weights = torch.where(deferred, self.drw_weights[batch.y], torch.ones_like(losses))
        with torch.no_grad():
            self.steps_done += 1
        return (weights * losses).sum() / weights.sum()


@register_method("bsoftmax")
class BSoftmax(Method):
    """Balanced softmax (Ren et al. 2020), as SubpopBench: training logits + log(class size).

    Training minimises the cross-entropy of logits + log n_c, n_c the class sizes of the
    training split, so a rare class must win by a wider margin; prediction uses the plain
    logits. Needs class sizes only; no settings of its own (as SubpopBench's `BSoftmax`).
    """

    paper = (
        "Ren et al. 2020, Balanced Meta-Softmax for Long-Tailed Visual Recognition (NeurIPS); "
        + SUBPOPBENCH
    )

    def __init__(self, dataset: BenchmarkDataset, hparams: dict[str, Any]) -> None:
        super().__init__(dataset, hparams)
        log_sizes = class_sizes(self).float().log()
        self.register_buffer("log_class_sizes", log_sizes, persistent=False)

    def training_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The logits the loss sees: the network's plus log n_c."""
        return self.model(x).float() + self.log_class_sizes

    def loss(self, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(self.training_logits(batch.x), batch.y)
