"""XRM: group inference by cross-risk minimisation, and GroupDRO on the groups it infers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from robustbench_mat.data import BenchmarkDataset
from robustbench_mat.evaluation import predict
from robustbench_mat.group_inference import InferredGroups, write_inferred_groups
from robustbench_mat.hparams import HParam
from robustbench_mat.method import Batch, Method
from robustbench_mat.methods.groupdro import GroupDRO
from robustbench_mat.registry import register_method

if TYPE_CHECKING:
    from robustbench_mat.runner import RunContext
    from robustbench_mat.training import LoopResult

XRM_PAPER = "Pezeshki et al. 2024, Discovering Environments with XRM (ICML)"


def flip_probability(confidence: torch.Tensor, n_classes: int) -> torch.Tensor:
    """XRM's label-flip probability from the held-out twin's top softmax probability:
    (p - 1/K) * K / (K - 1), which is 0 at chance (p = 1/K) and 1 at certainty (p = 1)."""
    return ((confidence - 1.0 / n_classes) * n_classes / (n_classes - 1)).clamp(0.0, 1.0)


def cross_mistakes(logits_a: torch.Tensor, logits_b: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """1 where either twin misclassifies the example (with its true label), else 0."""
    return ((logits_a.argmax(1) != y) | (logits_b.argmax(1) != y)).long()


@register_method("xrm-infer")
class XRMGroupInference(Method):
    """XRM group inference (Pezeshki et al. 2024): twins imitating each other's held-out mistakes.

    Each training example belongs to one of two networks (a fixed random half each). The held-in
    network trains on it with its current label; after each step the label is replaced by the
    held-out network's prediction with probability (p_ho - 1/K) * K / (K - 1). At the end,
    `finish` writes the held-out logits of every training example (in dataset order) and the
    inferred attribute of every train and val example: 1 where either twin misclassifies it.
    No group label is used anywhere; the final flip rate ranks XRM configurations.
    """

    paper = XRM_PAPER
    infers_groups = True
    hparams = {
        "held_in_loss": HParam(
            "class-balanced",
            "class-balanced: the XRM paper's sum over classes of the per-class mean "
            "cross-entropy; mean: the plain mean (the MAT paper's synthetic script)",
            choices=("class-balanced", "mean"),
        ),
    }

    def __init__(self, dataset: BenchmarkDataset, hparams: dict[str, Any]) -> None:
        super().__init__(dataset, hparams)
        y = dataset.split("train").y
        self.register_buffer("assignment", torch.rand(len(y)) < 0.5)  # True: twin 0's half
        self.register_buffer("true_labels", y.clone(), persistent=False)
        self.register_buffer("labels", y.clone())
        self._held_out: torch.Tensor | None = None

    def build_model(self) -> nn.Module:
        return nn.ModuleList([self.dataset.build_model(), self.dataset.build_model()])

    def _held_in_and_out(
        self, x: torch.Tensor, indices: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits_a, logits_b = self.model[0](x), self.model[1](x)
        mine = self.assignment[indices][:, None]
        return torch.where(mine, logits_a, logits_b), torch.where(mine, logits_b, logits_a)

    def loss(self, batch: Batch) -> torch.Tensor:
        held_in, held_out = self._held_in_and_out(batch.x, batch.indices)
        self._held_out = held_out.detach()
        labels = self.labels[batch.indices]
        if self.hp["held_in_loss"] == "mean":
            return F.cross_entropy(held_in, labels)
        losses = F.cross_entropy(held_in, labels, reduction="none").float()
        n_classes = self.dataset.n_classes
        counts = torch.bincount(labels, minlength=n_classes)
        sums = torch.zeros(n_classes, device=losses.device).index_add_(0, labels, losses)
        return torch.where(counts > 0, sums / counts.clamp(min=1), 0.0).sum()

    def after_step(self, batch: Batch, step: int) -> None:
        confidence, prediction = F.softmax(self._held_out.float(), dim=1).max(1)
        flip = torch.bernoulli(flip_probability(confidence, self.dataset.n_classes)).bool()
        # Without boolean indexing, which waits for the GPU: a flipped example's new label, -1
        # for the others; a duplicate of the batch is flipped if any of its copies is.
        proposed = torch.full_like(self.labels, -1)
        proposed.scatter_reduce_(0, batch.indices, torch.where(flip, prediction, -1), "amax")
        self.labels.copy_(torch.where(proposed >= 0, proposed, self.labels))

    def flip_rate(self) -> float:
        """Fraction of training labels that currently differ from the true ones."""
        return (self.labels != self.true_labels).float().mean().item()

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return (self.model[0](x) + self.model[1](x)) / 2

    def _twin_logits(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, 2, classes]: each twin's logits."""
        return torch.stack([self.model[0](x), self.model[1](x)], dim=1)

    def logged_state(self) -> dict[str, float]:
        return {"flip_rate": self.flip_rate()}

    def finish(self, context: RunContext, outcome: LoopResult) -> None:
        device = context.plan.device
        self.eval()
        logits = {}
        for split in ("train", "val"):
            # Both twins in one pass: each image is decoded once.
            both = predict(
                self._twin_logits, self.dataset.split(split), device, self.dataset.eval_batch_size
            )
            logits[split] = both.unbind(1)
        assignment = self.assignment.cpu()[:, None]
        train_a, train_b = logits["train"]
        attributes = {
            split: cross_mistakes(*logits[split], self.dataset.split(split).y)
            for split in ("train", "val")
        }
        n_groups = 2 * self.dataset.n_classes
        degenerate = any(
            len(torch.unique(self.dataset.split(s).y * 2 + attributes[s])) != n_groups
            for s in attributes
        )
        write_inferred_groups(
            self,
            context,
            train_heldout_logits=torch.where(assignment, train_b, train_a),
            train_attribute=attributes["train"],
            val_attribute=attributes["val"],
            degenerate=degenerate,
            score=0.0 if degenerate else self.flip_rate(),
            stats={
                "flip_rate": self.flip_rate(),
                "train_inferred_minority": attributes["train"].float().mean().item(),
                "val_inferred_minority": attributes["val"].float().mean().item(),
                "degenerate": float(degenerate),
            },
        )


@register_method("xrm")
class XRM(GroupDRO):
    """XRM + GroupDRO (Pezeshki et al. 2024): GroupDRO on groups that XRM infers, no group labels.

    The training groups are (y, XRM's inferred attribute); with no validation group labels the
    model is selected on the worst-group accuracy of XRM's inferred validation groups.
    """

    paper = XRM_PAPER
    needs_train_groups = False
    inferred_groups_variant = None
    group_inference = "xrm-infer"

    def train_group_names(self) -> list[str]:
        return [f"{c}/inferred{a}" for c in self.dataset.class_names for a in range(2)]

    def prepare(self, context: RunContext) -> None:
        inferred: InferredGroups = context.inferred
        y = self.dataset.split("train").y
        self.register_buffer("inferred_groups", inferred.group_ids("train", y), persistent=False)

    def train_group_ids(self, batch: Batch) -> torch.Tensor:
        return self.inferred_groups[batch.indices]
