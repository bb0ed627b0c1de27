"""MAT: Memorization-Aware Training, the method this benchmark is built around."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from optuna.distributions import CategoricalDistribution

from robustbench_mat.errors import RunFailed
from robustbench_mat.group_inference import InferredGroups
from robustbench_mat.hparams import HParam
from robustbench_mat.method import Batch, Method
from robustbench_mat.registry import register_method

if TYPE_CHECKING:
    from robustbench_mat.runner import RunContext

LOG_EPSILON = 1e-6


def calibrated_log_prior(
    heldout_logits: torch.Tensor, y: torch.Tensor, n_classes: int, temperature: float
) -> torch.Tensor:
    """MAT's logit shift: log p̂(y | x_i) for every example i and class y.

    With P = softmax(H / temperature) the held-out model's (soft) predictions, the joint of
    (held-out prediction, true label) over these examples is J[y_ho, y] = sum_{i: y_i = y}
    P[i, y_ho] / n; p(y | y_ho) normalises each row of J; and the calibrated held-out posterior
    is p̂(y | x_i) = sum_{y_ho} P[i, y_ho] p(y | y_ho). J always has `n_classes` columns, so a
    class absent from `y` gets p̂ = 0 (shift log 1e-6) instead of changing the shape.
    Computed in float32 without gradient.
    """
    with torch.no_grad(), torch.autocast(heldout_logits.device.type, enabled=False):
        p_heldout = F.softmax(heldout_logits.float() / temperature, dim=1)
        # The one-hot labels as a comparison (F.one_hot checks its input with .item(), which
        # vectorised training over stacked models cannot run).
        labels = (y[:, None] == torch.arange(n_classes, device=y.device)).float()
        joint = p_heldout.T @ labels / len(y)
        row_mass = joint.sum(dim=1, keepdim=True)
        conditional = torch.where(row_mass > 0, joint / row_mass.clamp(min=1e-30), 0.0)
        return torch.log(p_heldout @ conditional + LOG_EPSILON)


@register_method("mat")
class MAT(Method):
    """MAT (Bayat, Pezeshki et al. 2024): ERM on logits shifted by held-out log-probabilities.

    The shift discounts what a model predicts without memorising, so the minority examples must
    be fitted through the invariant feature.

    Training minimises CE(f(x_i) + log p̂(. | x_i), y_i), where p̂ comes from the held-out logits
    of XRM's twins (`xrm-infer`, run first when no cached result exists) calibrated by
    `calibrated_log_prior`, either per minibatch (`batch`, as the paper's code) or once over the
    training set (`global`, as the paper's synthetic experiment). The shift is detached and is
    never applied at evaluation. No group label is used in training; without validation group
    labels the model is selected on XRM's inferred validation groups.
    """

    paper = (
        "Bayat, Pezeshki et al. 2024, The Pitfalls of Memorization: When Memorization Hurts "
        "Generalization (arXiv 2412.07684)"
    )
    group_inference = "xrm-infer"
    stack_varying = ("temperature",)
    pure_loss = True
    hparams = {
        "temperature": HParam(
            0.1,
            "temperature of the held-out softmax",
            search=CategoricalDistribution([0.001, 0.01, 0.1]),
            gt=0,
        ),
        "calibration": HParam(
            "batch",
            "estimate p(y | y_ho) per minibatch (batch) or once over the training set (global)",
            choices=("batch", "global"),
        ),
    }

    def prepare(self, context: RunContext) -> None:
        inferred: InferredGroups = context.inferred
        y = self.dataset.split("train").y
        heldout = inferred.train_heldout_logits
        if heldout.shape != (len(y), self.dataset.n_classes):
            raise RunFailed(
                f"held-out logits of shape {tuple(heldout.shape)} do not match the "
                f"{len(y)} x {self.dataset.n_classes} training set of {self.dataset.name}"
            )
        self.register_buffer("heldout_logits", heldout.float(), persistent=False)
        if self.hp["calibration"] == "global":
            shift = calibrated_log_prior(heldout, y, self.dataset.n_classes, self.hp["temperature"])
            self.register_buffer("global_shift", shift, persistent=False)

    def shift(self, batch: Batch) -> torch.Tensor:
        """The logit shift of the batch's examples."""
        if self.hp["calibration"] == "global":
            return self.global_shift[batch.indices]
        return calibrated_log_prior(
            self.heldout_logits[batch.indices],
            batch.y,
            self.dataset.n_classes,
            self.hp["temperature"],
        )

    def loss(self, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(self.model(batch.x) + self.shift(batch), batch.y)
