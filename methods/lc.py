"""LC: logit correction by a jointly trained biased model."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from optuna.distributions import CategoricalDistribution, FloatDistribution
from torch import nn

from robustbench_mat.data import BenchmarkDataset
from robustbench_mat.hparams import HParam
from robustbench_mat.method import Batch, Method
from robustbench_mat.methods.lff import generalized_cross_entropy
from robustbench_mat.registry import register_method

if TYPE_CHECKING:
    from robustbench_mat.runner import RunContext

PRIOR_EPSILON = 1e-4
ETA = 1.0  # the exponent of the prior in the correction; 1 in the paper


def conditional_prior(matrix: torch.Tensor, pseudo_attribute: torch.Tensor) -> torch.Tensor:
    """p̂(y | â) for every example: column â of the (y, â) matrix, normalised to sum to one.
    Returns one row per example, one column per class."""
    columns = matrix[:, pseudo_attribute].T
    return columns / columns.sum(dim=1, keepdim=True).clamp(min=1e-12)


def logit_correction(prior: torch.Tensor, eta: float = ETA) -> torch.Tensor:
    """The term LC adds to the logits: log(p̂^η + 1e-4)."""
    return torch.log(prior.pow(eta) + PRIOR_EPSILON)


def sigmoid_rampup(progress: float) -> float:
    """exp(-5 (1 - t)^2) for t = `progress` clipped to [0, 1]: 0.007 at 0, 1 at 1."""
    t = min(max(progress, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


@register_method("lc")
class LC(Method):
    """LC (Liu et al. 2023): target logits shifted by log p̂(y | â) from a jointly trained GCE model.

    A biased network trains with the generalised cross-entropy (q) alongside the target
    network. Each step updates a per-example moving average (α = `ema`) of the biased softmax at
    temperature τ; its argmax is the example's pseudo-attribute â. A K x K matrix M[y, â] holds a
    moving average (α = `ema`, per cell) of the mean averaged biased probability of the true
    label over the batch's examples in cell (y, â); its column â, normalised, estimates
    p̂(y | â). The target network minimises CE(f(x) + log(p̂(. | â)^η + 1e-4), y) with η = 1,
    plus `gce_weight` x the biased network's GCE; the correction is detached and used in
    training only. With `group_mixup`, every example is mixed (inputs and corrections, ratio
    λ ~ U(1 - 2t, 1 - t), t = 0.5 x a sigmoid ramp over `mixup_rampup` of the run) with a random
    pseudo-minority example (â != y) of its class. Evaluation uses the target network.
    """

    paper = "Liu et al. 2023, Avoiding Spurious Correlations via Logit Correction (ICLR)"
    hparams = {
        "q": HParam(
            0.7,
            "GCE exponent q of the biased network",
            search=FloatDistribution(0.05, 0.95),
            gt=0,
            le=1,
        ),
        "temperature": HParam(
            1.0,
            "τ: temperature of the biased softmax behind the pseudo-attribute",
            search=CategoricalDistribution([0.5, 1.0, 2.0]),
            gt=0,
        ),
        "ema": HParam(
            0.7,
            "α of the moving averages (per-example biased softmax, and the (y, â) matrix)",
            search=FloatDistribution(0.0, 0.99),
            ge=0,
            lt=1,
        ),
        "gce_weight": HParam(
            1.0,
            "λ_dis: weight of the biased network's GCE in the total loss",
            search=FloatDistribution(0.1, 10.0, log=True),
            ge=0,
        ),
        "group_mixup": HParam(False, "mix examples with same-class pseudo-minority ones"),
        "mixup_rampup": HParam(
            0.5, "fraction of the run over which the mixup strength ramps up", ge=0, le=1
        ),
    }

    def __init__(self, dataset: BenchmarkDataset, hparams: dict[str, Any]) -> None:
        super().__init__(dataset, hparams)
        n, k = len(self.train_split()), self.dataset.n_classes
        self.register_buffer("biased_softmax", torch.zeros(n, k))
        self.register_buffer("softmax_seen", torch.zeros(n, dtype=torch.bool))
        self.register_buffer("prior_matrix", torch.zeros(k, k))
        self.register_buffer("prior_seen", torch.zeros(k, k, dtype=torch.bool))
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self.total_steps = 1

    def build_model(self) -> nn.Module:
        return nn.ModuleDict(
            {"biased": self.dataset.build_model(), "target": self.dataset.build_model()}
        )

    def prepare(self, context: RunContext) -> None:
        self.total_steps = context.settings.steps

    @torch.no_grad()
    def pseudo_attributes(self, indices: torch.Tensor, biased_logits: torch.Tensor) -> torch.Tensor:
        """Update the examples' averaged biased softmax and return its argmax, â."""
        probs = F.softmax(biased_logits.float() / self.hp["temperature"], dim=1)
        alpha, seen = self.hp["ema"], self.softmax_seen[indices][:, None]
        old = self.biased_softmax[indices]
        self.biased_softmax[indices] = torch.where(seen, alpha * old + (1 - alpha) * probs, probs)
        self.softmax_seen[indices] = True
        return self.biased_softmax[indices].argmax(1)

    @torch.no_grad()
    def update_prior(self, indices: torch.Tensor, y: torch.Tensor, attr: torch.Tensor) -> None:
        """Move each (y, â) cell present in the batch towards the batch's mean averaged biased
        probability of the true label in that cell (set on first sight)."""
        k = self.dataset.n_classes
        cells = y * k + attr
        p_true = self.biased_softmax[indices].gather(1, y[:, None])[:, 0]
        counts = torch.bincount(cells, minlength=k * k).view(k, k)
        sums = torch.zeros(k * k, device=y.device).index_add_(0, cells, p_true).view(k, k)
        present = counts > 0
        means = sums / counts.clamp(min=1)
        alpha = self.hp["ema"]
        moved = torch.where(self.prior_seen, alpha * self.prior_matrix + (1 - alpha) * means, means)
        self.prior_matrix.copy_(torch.where(present, moved, self.prior_matrix))
        self.prior_seen |= present

    def correction(self, batch: Batch, biased_logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(correction, â) of the batch's examples, after updating the running estimates."""
        attr = self.pseudo_attributes(batch.indices, biased_logits)
        self.update_prior(batch.indices, batch.y, attr)
        return logit_correction(conditional_prior(self.prior_matrix, attr)), attr

    def group_mixup(
        self, x: torch.Tensor, shift: torch.Tensor, y: torch.Tensor, attr: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and corrections mixed with a random same-class pseudo-minority partner (any
        same-class example when the class has none in the batch)."""
        strength = 0.5 * sigmoid_rampup(
            int(self.steps_done) / max(1.0, self.hp["mixup_rampup"] * self.total_steps)
        )
        lam = 1 - 2 * strength + strength * torch.rand(()).item()
        partner = torch.arange(len(y), device=y.device)
        minority = attr != y
        for c in torch.unique(y).tolist():
            members = torch.nonzero(y == c)[:, 0]
            pool = members[minority[members]]
            pool = pool if len(pool) > 0 else members
            draws = torch.randint(len(pool), (len(members),)).to(y.device)
            partner[members] = pool[draws]
        mixed_x = lam * x + (1 - lam) * x[partner]
        return mixed_x, lam * shift + (1 - lam) * shift[partner]

    def loss(self, batch: Batch) -> torch.Tensor:
        biased_logits = self.model["biased"](batch.x)
        shift, attr = self.correction(batch, biased_logits.detach())
        x = batch.x
        if self.hp["group_mixup"]:
            x, shift = self.group_mixup(x, shift, batch.y, attr)
        target = F.cross_entropy(self.model["target"](x).float() + shift, batch.y)
        gce = generalized_cross_entropy(biased_logits, batch.y, self.hp["q"]).mean()
        return target + self.hp["gce_weight"] * gce

    def after_step(self, batch: Batch, step: int) -> None:
        self.steps_done.fill_(step)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.model["target"](x)
