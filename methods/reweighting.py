"""SubpopBench's loss re-weighting baselines: ReWeight, SqrtReWeight and CBLoss.

Each scales every example's cross-entropy by a weight of its group (y, a), fixed before training
from the group sizes n_g of the training split, and minimises the batch mean of the weighted
losses (not divided by the weights' sum). The weights are normalised so that they sum to the
number of groups, empty groups counted, with weight 0 for an empty group (SubpopBench's
`algorithms.ReWeight`). The minibatches are the harness's uniform draws, as SubpopBench's
default sampler. All three need training group labels.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from optuna.distributions import CategoricalDistribution

from robustbench_mat.data import BenchmarkDataset
from robustbench_mat.evaluation import metric_key
from robustbench_mat.hparams import HParam
from robustbench_mat.method import Batch, Method
from robustbench_mat.methods.invariance import SUBPOPBENCH
from robustbench_mat.registry import register_method


def normalised(raw: torch.Tensor) -> torch.Tensor:
    """`raw` scaled to sum to its length (SubpopBench's normalisation of group weights)."""
    return raw / raw.sum() * len(raw)


def inverse_size_weights(counts: torch.Tensor, power: float) -> torch.Tensor:
    """n_g^(-power) for every non-empty group, 0 for an empty one, normalised (float64)."""
    sizes = counts.double()
    raw = torch.where(sizes > 0, sizes.clamp(min=1).pow(-power), torch.zeros_like(sizes))
    return normalised(raw)


def class_balanced_weights(counts: torch.Tensor, beta: float) -> torch.Tensor:
    """Cui et al.'s (1 - β) / (1 - β^n) for every non-empty entry of `counts`, 0 for an empty
    one, normalised to sum to the number of entries (float64)."""
    sizes = counts.double()
    effective = 1.0 - torch.pow(torch.full_like(sizes, beta), sizes.clamp(min=1))
    raw = torch.where(sizes > 0, (1.0 - beta) / effective, torch.zeros_like(sizes))
    return normalised(raw)


class _GroupReweighting(Method):
    """ERM with every example's cross-entropy scaled by a fixed weight of its group."""

    paper = SUBPOPBENCH
    needs_train_groups = True

    def __init__(self, dataset: BenchmarkDataset, hparams: dict[str, Any]) -> None:
        super().__init__(dataset, hparams)
        counts = torch.bincount(self.train_split().g, minlength=dataset.n_groups)
        self.register_buffer("group_weights", self.weights_of(counts).float(), persistent=False)

    def weights_of(self, counts: torch.Tensor) -> torch.Tensor:
        """The normalised weight of every group, from the training split's group sizes."""
        raise NotImplementedError

    def loss(self, batch: Batch) -> torch.Tensor:
        losses = F.cross_entropy(self.model(batch.x).float(), batch.y, reduction="none")
        return (self.group_weights[batch.g] * losses).mean()

    def logged_state(self) -> dict[str, float]:
        return {
            f"{type(self).name}_weight.{metric_key(name)}": weight
            for name, weight in zip(
                self.dataset.group_names(), self.group_weights.tolist(), strict=True
            )
        }


@register_method("reweight")
class ReWeight(_GroupReweighting):
    """ReWeight (Yang et al. 2023, SubpopBench): cross-entropy weighted by 1 / (group size).

    Each example's loss is scaled by w_g ∝ 1 / n_g, n_g its group's size in the training split,
    normalised to Σ_g w_g = number of groups; the objective is the batch mean of w_g * CE.
    Follows SubpopBench's `ReWeight`; no settings of its own.
    """

    def weights_of(self, counts: torch.Tensor) -> torch.Tensor:
        return inverse_size_weights(counts, 1.0)


@register_method("sqrtreweight")
class SqrtReWeight(_GroupReweighting):
    """SqrtReWeight (Yang et al. 2023, SubpopBench): cross-entropy weighted by 1 / √(group size).

    As `reweight`, with w_g ∝ 1 / sqrt(n_g), normalised to sum to the number of groups
    (SubpopBench's `SqrtReWeight`); no settings of its own.
    """

    def weights_of(self, counts: torch.Tensor) -> torch.Tensor:
        return inverse_size_weights(counts, 0.5)


@register_method("cbloss")
class CBLoss(_GroupReweighting):
    """CBLoss (Cui et al. 2019), as SubpopBench: cross-entropy weighted by (1 - β) / (1 - β^n_g).

    The class-balanced weight of Cui et al., computed as SubpopBench does from the sizes n_g of
    the groups (y, a), not of the classes: w_g ∝ (1 - β) / (1 - β^n_g), normalised to sum to
    the number of groups, and the objective is the batch mean of w_g * CE. So, like SubpopBench's
    `CBLoss`, it needs training group labels.

    Default and search range from SubpopBench's `hparams_registry`: β = 0.9999; they draw
    1 - β log-uniformly in [1e-5, 1e-2], which a distribution over β itself cannot express, so
    the search picks among the decades β in {0.99, 0.999, 0.9999, 0.99999}. Departure: a group
    is given weight 0 only when it is empty; SubpopBench also zeroes every group whose
    1 - β^n_g rounds to 1 in float64 (e.g. n_g > ~3,650 at β = 0.99), a side effect of how it
    marks empty groups.
    """

    paper = (
        "Cui et al. 2019, Class-Balanced Loss Based on Effective Number of Samples (CVPR); "
        + SUBPOPBENCH
    )
    stack_varying = ("beta",)  # it enters only through each model's own group weights
    hparams = {
        "beta": HParam(
            0.9999,
            "β of the effective number of samples (1 - β^n) / (1 - β) of each group",
            search=CategoricalDistribution([0.99, 0.999, 0.9999, 0.99999]),
            ge=0,
            lt=1,
        ),
    }

    def weights_of(self, counts: torch.Tensor) -> torch.Tensor:
        return class_balanced_weights(counts, self.hp["beta"])
