"""An example third-party method plugin for robustbench-mat."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from optuna.distributions import FloatDistribution

from robustbench_mat import Batch, HParam, Method


class LabelSmoothingERM(Method):
    """ERM with label smoothing (Szegedy et al. 2016), an example of a third-party plugin."""

    paper = "Szegedy et al. 2016, Rethinking the Inception Architecture for Computer Vision"
    hparams = {
        "smoothing": HParam(
            0.1,
            "weight of the uniform distribution mixed into the targets",
            search=FloatDistribution(0.0, 0.3),
        ),
    }

    def loss(self, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(self.model(batch.x), batch.y, label_smoothing=self.hp["smoothing"])
