"""LC: logit correction by a jointly trained biased model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from optuna.distributions import CategoricalDistribution, FloatDistribution
from torch import nn

from robustbench_mat.backbones import check_head_split, split_head
from robustbench_mat.data import BenchmarkDataset
from robustbench_mat.hparams import HParam
from robustbench_mat.method import Batch, Method
from robustbench_mat.methods.lff import generalized_cross_entropy
from robustbench_mat.registry import register_method

if TYPE_CHECKING:
    from collections.abc import Callable

    from robustbench_mat.runner import RunContext

PRIOR_EPSILON = 1e-4
ETA = 1.0  # the exponent of the prior in the correction; 1 in the paper
COUNT_EPSILON = 1e-4  # added to the cell counts by the batch estimators (mv_batch, batch)
ESTIMATORS = ("mv", "mv_batch", "batch")


def conditional_prior(matrix: torch.Tensor, pseudo_attribute: torch.Tensor) -> torch.Tensor:
    """p̂(y | â) for every example: column â of the (y, â) matrix, normalised to sum to one.
    Returns one row per example, one column per class."""
    columns = matrix[:, pseudo_attribute].T
    return columns / columns.sum(dim=1, keepdim=True).clamp(min=1e-12)


def logit_correction(prior: torch.Tensor, eta: float = ETA) -> torch.Tensor:
    """The term LC adds to the logits: log(p̂^η + 1e-4)."""
    return torch.log(prior.pow(eta) + PRIOR_EPSILON)


def sigmoid_rampup(progress: torch.Tensor) -> torch.Tensor:
    """exp(-5 (1 - t)^2) for t = `progress` clipped to [0, 1]: 0.007 at 0, 1 at 1."""
    return torch.exp(-5.0 * (1.0 - progress.clamp(0.0, 1.0)) ** 2)


def estimate_matrix(
    matrix: torch.Tensor,
    seen: torch.Tensor,
    cells: torch.Tensor,
    values: torch.Tensor,
    estimator: str,
    alpha: float,
) -> torch.Tensor:
    """The (y, â) matrix after one batch; `cells` are the examples' flat indices y * K + â and
    `values` their biased probabilities of the true label, in batch order.

    mv: every example in turn moves its cell by an EMA step, M ← α M + (1 - α) p, except that a
    cell's first example ever sets it (cells absent from the batch keep their value).
    mv_batch: every cell moves by one EMA step towards the batch mean of its cell,
    M ← α M + (1 - α) S / (n + 1e-4), so that cells absent from the batch decay towards 0.
    batch: M = S / (n + 1e-4), the batch means alone (absent cells are 0).
    """
    flat, flat_seen = matrix.reshape(-1).double(), seen.reshape(-1)
    values = values.double()
    counts = torch.bincount(cells, minlength=flat.numel())
    if estimator != "mv":
        sums = torch.zeros_like(flat).index_add_(0, cells, values)
        means = sums / (counts + COUNT_EPSILON)
        new = means if estimator == "batch" else alpha * flat + (1 - alpha) * means
        return new.to(matrix.dtype).view_as(matrix)
    # The sequential EMA in closed form: the j-th of a cell's n examples (0-based) is later
    # discounted n - 1 - j times; the old value n times.
    sorted_cells, order = torch.sort(cells, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(cells), device=cells.device) - starts[sorted_cells]
    later = (counts[sorted_cells] - 1 - rank).double()
    weights = (1 - alpha) * alpha**later
    opens = (rank == 0) & ~flat_seen[sorted_cells]  # a cell's first example ever sets it
    weights = torch.where(opens, alpha**later, weights)
    new = torch.zeros_like(flat).index_add_(0, sorted_cells, weights * values[order])
    new = new + torch.where(flat_seen, alpha ** counts.double() * flat, 0.0)
    return torch.where(counts > 0, new, flat).to(matrix.dtype).view_as(matrix)


# Per-dataset defaults, chosen by validation worst-group accuracy (see the LC docstring).
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {"synthetic": {"group_mixup": False}}


@register_method("lc")
class LC(Method):
    """LC (Liu et al. 2023): target logits shifted by log p̂(y | â) from a jointly trained GCE model.

    A biased network trains with the generalised cross-entropy (q), at `biased_lr_scale` (0.1)
    times the learning rate, alongside the target network. Each step takes the biased softmax
    at temperature τ of the batch's examples (with `attribute_ema` > 0, a per-example moving
    average of it); its argmax is the example's pseudo-attribute â. A K x K matrix M[y, â]
    collects the biased probability of the true label, p_y, of the examples in cell (y, â), by
    `estimator` (see `estimate_matrix`; mv and mv_batch average with α = `ema`); its column â,
    normalised, estimates p̂(y | â). The target network minimises
    CE(f(x) + log(p̂(. | â)^η + 1e-4), y) with η = 1, plus `gce_weight` x the biased network's
    GCE; the correction is detached and used in training only. With `group_mixup` (on), every
    example is mixed with a random pseudo-minority example (â != y) of its class (a random
    permutation of its class when the class has none in the batch), with ratio
    λ ~ U(1 - 2t, 1 - t), t = 0.5 x a sigmoid ramp over `mixup_rampup` of the run (0: t = 0.5
    from the start); the corrections are mixed with the same λ. Float inputs are mixed as they
    are; token ids (text datasets) cannot be, so there the target network's features before its
    last linear layer are mixed instead, as the authors do on CivilComments. Evaluation uses
    the target network.

    Defaults are those of the authors' train.py (shengliu66/LC): q 0.7, τ 1, λ_dis 1, the mv
    estimator with α 0.995, â from the current softmax (their per-example EMA has α 0),
    GroupMixUp on without a ramp, the biased network at 0.1 x lr. Their README commands change
    them per dataset (Waterbirds: q 0.8, τ 0.1, λ_dis 2, batch, a ramp over 50 of 300 epochs;
    CivilComments: mv_batch with α 0.9, λ_dis 0.1, a ramp over 400 steps).

    Differences from their code: one optimiser with the run's settings for both networks (they
    use Adam on CMNIST and CIFAR-10-C, plain SGD without weight decay for the biased network on
    Waterbirds, and a fixed lr 2e-5 SGD biased BERT on CivilComments); the column of M is
    normalised on every dataset (their CMNIST branch uses the unnormalised column); the ramp is
    a fraction of the run (theirs counts epochs on Waterbirds); on text the features are mixed
    after the classifier's dropout (theirs before it); no learning-rate decay of their own.

    GroupMixUp, as theirs, mixes every example with a pseudo-minority partner at λ ≤ 0.5 once
    ramped up, so every mixed input is mostly minority. Where the spurious feature is linear in
    the inputs this reverses the spurious correlation, and a linear target network learns it
    reversed: on `synthetic` the final model misclassifies the majority (train accuracy 0.10,
    test WGA 0) and only early stopping on val WGA keeps a good model (test WGA 0.85 at step
    100). `synthetic` therefore defaults to `group_mixup=false` (`DATASET_DEFAULTS`), the choice
    with the better validation worst-group accuracy on each of seeds 0-3 (0.90 / 0.91 / 0.95 /
    0.94 against 0.84 / 0.86 / 0.85 / 0.87 with GroupMixUp), as their README commands set
    GroupMixUp's ramp per dataset; it trains stably to step 1000 (test WGA 0.90 / 0.92 / 0.94 /
    0.93).
    """

    paper = "Liu et al. 2023, Avoiding Spurious Correlations via Logit Correction (ICLR)"
    dataset_defaults = DATASET_DEFAULTS
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
            search=CategoricalDistribution([0.1, 0.5, 1.0, 2.0]),
            gt=0,
        ),
        "attribute_ema": HParam(
            0.0,
            "α of a per-example moving average of the biased softmax behind â (0, the "
            "authors': the current softmax)",
            ge=0,
            lt=1,
        ),
        "estimator": HParam(
            "mv",
            "the (y, â) matrix: mv (a moving average over examples), mv_batch (over batch "
            "means) or batch (the batch means alone)",
            choices=ESTIMATORS,
        ),
        "ema": HParam(
            0.995,
            "α of the (y, â) matrix's moving average (estimator mv or mv_batch)",
            search=FloatDistribution(0.5, 0.999),
            ge=0,
            lt=1,
        ),
        "gce_weight": HParam(
            1.0,
            "λ_dis: weight of the biased network's GCE in the total loss",
            search=FloatDistribution(0.1, 10.0, log=True),
            ge=0,
        ),
        "biased_lr_scale": HParam(
            0.1, "the biased network's learning rate as a multiple of lr", gt=0
        ),
        "group_mixup": HParam(True, "mix examples with same-class pseudo-minority ones"),
        "mixup_rampup": HParam(
            0.0,
            "fraction of the run over which the mixup strength ramps up (0: full from the start)",
            ge=0,
            le=1,
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
        self._target_split: tuple[nn.Module, nn.Linear] | None = None

    def build_model(self) -> nn.Module:
        return nn.ModuleDict(
            {"biased": self.dataset.build_model(), "target": self.dataset.build_model()}
        )

    def prepare(self, context: RunContext) -> None:
        self.total_steps = context.settings.steps

    def configure_optimizer(self) -> torch.optim.Optimizer:
        """The run's optimiser, each of its parameter groups split by network, the biased
        network's at `biased_lr_scale` x the group's learning rate."""
        optimizer = super().configure_optimizer()
        biased = {id(p) for p in self.model["biased"].parameters()}
        groups = optimizer.param_groups
        optimizer.param_groups = []
        for group in groups:
            for in_biased in (False, True):
                params = [p for p in group["params"] if (id(p) in biased) == in_biased]
                if params:
                    settings = {k: v for k, v in group.items() if k != "params"}
                    if in_biased:
                        settings["lr"] = group["lr"] * self.hp["biased_lr_scale"]
                    optimizer.add_param_group({**settings, "params": params})
        return optimizer

    @torch.no_grad()
    def pseudo_attributes(self, indices: torch.Tensor, biased_logits: torch.Tensor) -> torch.Tensor:
        """Store the examples' biased softmax at temperature τ (moved towards it by
        `attribute_ema` when > 0) and return its argmax, â."""
        probs = F.softmax(biased_logits.float() / self.hp["temperature"], dim=1)
        alpha, seen = self.hp["attribute_ema"], self.softmax_seen[indices][:, None]
        old = self.biased_softmax[indices]
        self.biased_softmax[indices] = torch.where(seen, alpha * old + (1 - alpha) * probs, probs)
        self.softmax_seen[indices] = True
        return self.biased_softmax[indices].argmax(1)

    @torch.no_grad()
    def update_prior(self, indices: torch.Tensor, y: torch.Tensor, attr: torch.Tensor) -> None:
        """Update M[y, â] with the examples' biased probabilities of their true label."""
        cells = y * self.dataset.n_classes + attr
        p_true = self.biased_softmax[indices].gather(1, y[:, None])[:, 0]
        self.prior_matrix.copy_(
            estimate_matrix(
                self.prior_matrix,
                self.prior_seen,
                cells,
                p_true,
                self.hp["estimator"],
                self.hp["ema"],
            )
        )
        self.prior_seen.view(-1)[cells] = True

    def correction(self, batch: Batch, biased_logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(correction, â) of the batch's examples, after updating the running estimates."""
        attr = self.pseudo_attributes(batch.indices, biased_logits)
        self.update_prior(batch.indices, batch.y, attr)
        return logit_correction(conditional_prior(self.prior_matrix, attr)), attr

    def mixup_strength(self) -> torch.Tensor | float:
        """t: 0.5 x the sigmoid ramp over `mixup_rampup` of the run (0.5 without a ramp); a
        tensor during the ramp, so that the step count is never read on the host."""
        length = self.hp["mixup_rampup"] * self.total_steps
        if length <= 0:
            return 0.5
        return 0.5 * sigmoid_rampup(self.steps_done.float() / length)

    def mixup_partners(self, y: torch.Tensor, attr: torch.Tensor) -> torch.Tensor:
        """For each example, a random pseudo-minority example (â != y) of its class, drawn with
        replacement; where its class has none, its image under a random permutation of the
        class. Drawn with tensor operations only (random scores, argmax and sorts), so that the
        step never waits for the GPU."""
        n = len(y)
        candidates = (y[:, None] == y[None, :]) & (attr != y)[None, :]
        scores = torch.rand(n, n, device=y.device).masked_fill(~candidates, -1.0)
        drawn = scores.argmax(1)
        by_index = torch.argsort(y, stable=True)
        by_random_key = torch.argsort(y + torch.rand(n, device=y.device) * 0.5)
        permuted = torch.empty_like(y)
        permuted[by_index] = by_random_key
        return torch.where(candidates.any(1), drawn, permuted)

    def target_logits(
        self, x: torch.Tensor, mix: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The target network's logits; `mix` applied to its float inputs, or, for token ids,
        to its features before the last linear layer."""
        target = self.model["target"]
        if mix is None:
            return target(x)
        if torch.is_floating_point(x):
            return target(mix(x))
        if self._target_split is None:
            features, head = split_head(target)
            check_head_split(target, features, head, x[:2])
            self._target_split = (features, head)
        features, head = self._target_split
        return head(mix(features(x)))

    def loss(self, batch: Batch) -> torch.Tensor:
        biased_logits = self.model["biased"](batch.x)
        shift, attr = self.correction(batch, biased_logits.detach())
        mix = None
        if self.hp["group_mixup"]:
            strength = self.mixup_strength()
            lam = 1 - 2 * strength + strength * torch.rand((), device=batch.y.device)
            partner = self.mixup_partners(batch.y, attr)

            def mix(values: torch.Tensor) -> torch.Tensor:
                return lam * values + (1 - lam) * values[partner]

            shift = mix(shift)
        logits = self.target_logits(batch.x, mix)
        target = F.cross_entropy(logits.float() + shift, batch.y)
        gce = generalized_cross_entropy(biased_logits, batch.y, self.hp["q"]).mean()
        return target + self.hp["gce_weight"] * gce

    def after_step(self, batch: Batch, step: int) -> None:
        self.steps_done.fill_(step)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.model["target"](x)
