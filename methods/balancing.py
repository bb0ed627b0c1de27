"""The data-balancing baselines of Idrissi et al. 2022: SUBG, SUBY, RWG and RWY.

One implementation, four registered classes: each balances either the groups (y, a) or the
classes y, either by subsampling every group (class) once to the size of the smallest one, or by
drawing minibatches with replacement with weights inversely proportional to group (class) size.
Both act only through the shared loop's sampler hooks (`train_subset`, `train_weights`); the
loss is ERM's.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from robustbench_mat.data import BenchmarkDataset, GroupedSplit, balanced_weights
from robustbench_mat.method import Method
from robustbench_mat.registry import register_method

BALANCING_PAPER = (
    "Idrissi et al. 2022, Simple data balancing achieves competitive worst-group-accuracy (CLeaR)"
)


def balanced_subset(
    labels: torch.Tensor, n_values: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Sorted positions of a random subset holding, for every label value present, exactly as
    many examples as the rarest present value has (drawn without replacement)."""
    counts = torch.bincount(labels, minlength=n_values)
    smallest = int(counts[counts > 0].min())
    chosen = []
    for value in range(n_values):
        members = torch.nonzero(labels == value)[:, 0]
        if len(members) > 0:
            order = torch.randperm(len(members), generator=generator)
            chosen.append(members[order[:smallest]])
    return torch.sort(torch.cat(chosen)).values


class Balancing(Method):
    """ERM on group- or class-balanced data (the base of subg, suby, rwg and rwy)."""

    paper = BALANCING_PAPER
    balance: ClassVar[str]  # "group" (y, a) or "class" (y)
    sampling: ClassVar[str]  # "subsample" or "reweight"

    def __init__(self, dataset: BenchmarkDataset, hparams: dict[str, Any]) -> None:
        super().__init__(dataset, hparams)
        if self.sampling == "subsample":
            # Drawn once with the global RNG, which the runner seeds before building the method;
            # stored (and checkpointed) so that a resumed run trains on the same subset.
            labels, n_values = self.balanced_labels(self.train_split())
            self.register_buffer("subset", balanced_subset(labels, n_values))

    def balanced_labels(self, train: GroupedSplit) -> tuple[torch.Tensor, int]:
        """The labels to balance and their number of values."""
        if self.balance == "group":
            return train.g, self.dataset.n_groups
        return train.y, self.dataset.n_classes

    def train_subset(self, train: GroupedSplit) -> torch.Tensor | None:
        return self.subset.cpu() if self.sampling == "subsample" else None

    def train_weights(self, train: GroupedSplit) -> torch.Tensor | None:
        if self.sampling == "reweight":
            return balanced_weights(self.balanced_labels(train)[0])
        return None


@register_method("subg")
class SUBG(Balancing):
    """SUBG (Idrissi et al. 2022): ERM on a random subset with every group cut to the smallest.

    The subset is drawn once per run (seeded) and never changes; needs training group labels.
    """

    needs_train_groups = True
    balance, sampling = "group", "subsample"


@register_method("suby")
class SUBY(Balancing):
    """SUBY (Idrissi et al. 2022): ERM on a random subset with every class cut to the smallest."""

    balance, sampling = "class", "subsample"


@register_method("rwg")
class RWG(Balancing):
    """RWG (Idrissi et al. 2022): ERM on minibatches drawn with weights 1 / (group size).

    Examples are drawn with replacement, so every group is equally frequent in expectation;
    needs training group labels.
    """

    needs_train_groups = True
    balance, sampling = "group", "reweight"


@register_method("rwy")
class RWY(Balancing):
    """RWY (Idrissi et al. 2022): ERM on minibatches drawn with weights 1 / (class size)."""

    balance, sampling = "class", "reweight"
