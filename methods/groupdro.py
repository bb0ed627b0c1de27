"""Group distributionally robust optimisation."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from optuna.distributions import FloatDistribution

from robustbench_mat.data import BenchmarkDataset
from robustbench_mat.evaluation import metric_key
from robustbench_mat.hparams import HParam
from robustbench_mat.method import Batch, Method
from robustbench_mat.registry import register_method


@register_method("groupdro")
class GroupDRO(Method):
    """GroupDRO (Sagawa et al. 2020): online exponentiated-gradient weights on group losses.

    Each step computes the mean loss L_g of every group g in the batch, updates the group weights
    q_g <- q_g * exp(eta * L_g) and renormalises them, and minimises sum_g q_g * L_g. Groups
    absent from the batch keep their weight and contribute no loss. The generalisation
    adjustment C / sqrt(n_g) of the paper is not implemented.
    """

    paper = "Sagawa et al. 2020, Distributionally Robust Neural Networks for Group Shifts (ICLR)"
    needs_train_groups = True
    inferred_groups_variant = "xrm"  # GroupDRO on XRM-inferred groups
    hparams = {
        "eta": HParam(
            1e-2,
            "step size of the group weights",
            search=FloatDistribution(1e-3, 1e-1, log=True),
            gt=0,
        ),
    }

    def __init__(self, dataset: BenchmarkDataset, hparams: dict[str, Any]) -> None:
        super().__init__(dataset, hparams)
        n_groups = len(self.train_group_names())
        self.register_buffer("group_weights", torch.full((n_groups,), 1.0 / n_groups))

    def train_group_names(self) -> list[str]:
        """Names of the groups the weights are over (the dataset's training groups)."""
        return self.dataset.group_names()

    def train_group_ids(self, batch: Batch) -> torch.Tensor:
        return batch.g

    def loss(self, batch: Batch) -> torch.Tensor:
        losses = F.cross_entropy(self.model(batch.x), batch.y, reduction="none").float()
        groups = self.train_group_ids(batch)
        n_groups = self.group_weights.numel()
        counts = torch.bincount(groups, minlength=n_groups)
        group_loss = torch.zeros(n_groups, device=losses.device).index_add_(0, groups, losses)
        group_loss = group_loss / counts.clamp(min=1)
        with torch.no_grad():
            self.group_weights *= torch.exp(self.hp["eta"] * group_loss * (counts > 0))
            self.group_weights /= self.group_weights.sum()
        return (self.group_weights * group_loss).sum()

    def logged_state(self) -> dict[str, float]:
        return {
            f"groupdro_weight.{metric_key(name)}": weight
            for name, weight in zip(
                self.train_group_names(), self.group_weights.tolist(), strict=True
            )
        }
