"""Invariance across environments, as SubpopBench runs it: IRM, VREx, MMD and CORAL.

The environments of a minibatch are its attribute values: SubpopBench splits each minibatch by
the attribute a (`Algorithm.return_attributes`), not by group, so these methods need training
attribute labels. The harness draws a uniform random minibatch (SubpopBench's default sampler,
too), so an environment's share of a batch follows its share of the training split.
"""

from __future__ import annotations

from itertools import combinations
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from optuna.distributions import FloatDistribution, IntDistribution
from torch import nn

from robustbench_mat.backbones import check_head_split, split_head
from robustbench_mat.data import BenchmarkDataset
from robustbench_mat.errors import UserError
from robustbench_mat.hparams import HParam
from robustbench_mat.method import Batch, Method
from robustbench_mat.registry import register_method

SUBPOPBENCH = "Yang et al. 2023, Change is Hard: A Closer Look at Subpopulation Shift (ICML)"
# SubpopBench's (and DomainBed's) mixture of Gaussian kernels exp(-γ |x - y|^2).
KERNEL_GAMMAS = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)


def environments(a: torch.Tensor) -> list[torch.Tensor]:
    """The indices of each attribute value present in `a`, in increasing order of the value."""
    return [torch.nonzero(a == value)[:, 0] for value in torch.unique(a)]


def irm_penalty(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """IRMv1's penalty on one environment: the product of the gradients, with respect to a dummy
    scale w = 1 of the logits, of the cross-entropy of its even-indexed and of its odd-indexed
    examples (an unbiased estimate of the squared gradient of its risk). Zero for an environment
    of fewer than two examples, where one half is empty."""
    if len(y) < 2:
        return logits.new_zeros(())
    scale = torch.ones((), device=logits.device, dtype=logits.dtype, requires_grad=True)
    halves = [F.cross_entropy(logits[start::2] * scale, y[start::2]) for start in (0, 1)]
    grads = [torch.autograd.grad(half, scale, create_graph=True)[0] for half in halves]
    return grads[0] * grads[1]


def squared_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """|x_i - y_j|^2 for every pair of rows, from the norms and the inner products, clamped
    below at 1e-30 (as SubpopBench's `my_cdist`)."""
    norms_x = x.pow(2).sum(-1, keepdim=True)
    norms_y = y.pow(2).sum(-1, keepdim=True)
    return (norms_x + norms_y.T - 2 * x @ y.T).clamp_min(1e-30)


def gaussian_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Σ_γ exp(-γ |x_i - y_j|^2) over `KERNEL_GAMMAS`."""
    distances = squared_distances(x, y)
    return sum(torch.exp(-gamma * distances) for gamma in KERNEL_GAMMAS)


def gaussian_mmd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The (biased) squared MMD of two feature sets under `gaussian_kernel`:
    mean K(x, x) + mean K(y, y) - 2 mean K(x, y)."""
    return (
        gaussian_kernel(x, x).mean()
        + gaussian_kernel(y, y).mean()
        - 2 * gaussian_kernel(x, y).mean()
    )


def covariance(x: torch.Tensor) -> torch.Tensor:
    """The unbiased covariance of the rows of `x` (zero for a single row)."""
    centred = x - x.mean(0, keepdim=True)
    return centred.T @ centred / max(len(x) - 1, 1)


def coral_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The mean squared difference of the two feature means plus that of the two covariance
    matrices (SubpopBench's `mean_cov` kernel)."""
    mean_diff = (x.mean(0) - y.mean(0)).pow(2).mean()
    cov_diff = (covariance(x) - covariance(y)).pow(2).mean()
    return mean_diff + cov_diff


def feature_split(
    model: nn.Module, dataset: BenchmarkDataset, method: str
) -> tuple[nn.Module, nn.Linear]:
    """(features, last linear layer) of `model` (`split_head`), checked on a few training
    inputs; a UserError naming the network when its logits are not a last linear layer's
    outputs."""
    try:
        features, head = split_head(model)
        check_head_split(model, features, head, dataset.split("train").probe_inputs())
    except UserError as error:
        raise UserError(
            f"method {method!r} matches the features that {dataset.name}'s network "
            f"({type(model).__name__}) feeds to its last linear layer, and this network has no "
            f"separable last layer: {error}"
        ) from None
    return features, head


class _AnnealedPenalty(Method):
    """ERM on the mean environment risk plus a penalty weighted 1 for the first `anneal_iters`
    steps and `penalty_weight` afterwards."""

    needs_train_groups = True
    stackable = False

    def __init__(self, dataset: BenchmarkDataset, hparams: dict[str, Any]) -> None:
        super().__init__(dataset, hparams)
        self.register_buffer("update_count", torch.zeros((), dtype=torch.long))

    def penalty_weight(self) -> float:
        if int(self.update_count) >= self.hp["anneal_iters"]:
            return self.hp["penalty_weight"]
        return 1.0

    def after_step(self, batch: Batch, step: int) -> None:
        self.update_count.fill_(step)


@register_method("irm")
class IRM(_AnnealedPenalty):
    """IRM (Arjovsky et al. 2019), IRMv1 as SubpopBench runs it, the environments being attributes.

    Each step splits the minibatch by attribute value and minimises
    mean_e CE_e + w * mean_e P_e, with CE_e the mean cross-entropy of environment e and P_e
    `irm_penalty`: the product of the gradients, with respect to a dummy scale 1.0 of the
    logits, of the risks of e's even- and odd-indexed examples. w is 1 for the first
    `anneal_iters` steps (steps already taken < anneal_iters) and `penalty_weight` (λ)
    afterwards.

    Defaults and search ranges are SubpopBench's `hparams_registry` (= DomainBed's): λ 100
    (log-uniform in [0.1, 1e5]), anneal_iters 500 (int(10^U(0, 4)): log-uniform in [1, 1e4]).
    Like SubpopBench, the optimiser is kept at the anneal step (DomainBed's IRM starts a fresh
    Adam there). Departures: an environment with a single example in the batch adds no penalty
    (SubpopBench's cross-entropy of its empty odd half is NaN); the minibatch is drawn by the
    harness's sampler (uniform, as SubpopBench's default), and the run's optimiser settings are
    the harness's.
    """

    paper = f"Arjovsky et al. 2019, Invariant Risk Minimization (arXiv:1907.02893); {SUBPOPBENCH}"
    hparams = {
        "penalty_weight": HParam(
            100.0,
            "λ: weight of the IRM penalty once annealed (SubpopBench's irm_lambda)",
            search=FloatDistribution(0.1, 1e5, log=True),
            ge=0,
        ),
        "anneal_iters": HParam(
            500,
            "steps with penalty weight 1 before λ applies (irm_penalty_anneal_iters)",
            search=IntDistribution(1, 10_000, log=True),
            ge=0,
        ),
    }

    def loss(self, batch: Batch) -> torch.Tensor:
        logits = self.model(batch.x).float()
        groups = environments(batch.a)
        nll = sum(F.cross_entropy(logits[idx], batch.y[idx]) for idx in groups) / len(groups)
        penalty = sum(irm_penalty(logits[idx], batch.y[idx]) for idx in groups) / len(groups)
        return nll + self.penalty_weight() * penalty


@register_method("vrex")
class VREx(_AnnealedPenalty):
    """V-REx (Krueger et al. 2021): mean environment risk plus λ times the risks' variance.

    Each step splits the minibatch by attribute value (SubpopBench's environments), takes each
    environment's mean cross-entropy R_e and minimises mean_e R_e + w * mean_e (R_e - mean R)^2
    (the population variance, as DomainBed). w is 1 for the first `anneal_iters` steps and
    `penalty_weight` (λ) afterwards.

    SubpopBench has no V-REx: the loss, defaults and search ranges are DomainBed's
    (`algorithms.VREx`, `hparams_registry`): λ 10 (log-uniform in [0.1, 1e5]), anneal_iters 500
    (log-uniform in [1, 1e4]). Departures from DomainBed: one minibatch split by attribute (theirs
    draws one minibatch per domain), and the optimiser is kept at the anneal step, as in
    SubpopBench's IRM (DomainBed starts a fresh Adam there).
    """

    paper = (
        "Krueger et al. 2021, Out-of-Distribution Generalization via Risk Extrapolation (REx) "
        f"(ICML); {SUBPOPBENCH}"
    )
    hparams = {
        "penalty_weight": HParam(
            10.0,
            "λ: weight of the variance of the environment risks once annealed (vrex_lambda)",
            search=FloatDistribution(0.1, 1e5, log=True),
            ge=0,
        ),
        "anneal_iters": HParam(
            500,
            "steps with penalty weight 1 before λ applies (vrex_penalty_anneal_iters)",
            search=IntDistribution(1, 10_000, log=True),
            ge=0,
        ),
    }

    def environment_risks(self, batch: Batch) -> torch.Tensor:
        logits = self.model(batch.x).float()
        return torch.stack(
            [F.cross_entropy(logits[idx], batch.y[idx]) for idx in environments(batch.a)]
        )

    def loss(self, batch: Batch) -> torch.Tensor:
        risks = self.environment_risks(batch)
        mean = risks.mean()
        return mean + self.penalty_weight() * (risks - mean).pow(2).mean()


class _FeatureMatching(Method):
    """ERM plus γ times a discrepancy between the features of every pair of environments."""

    needs_train_groups = True
    stackable = False
    discrepancy: ClassVar[str] = ""
    hparams = {
        "gamma": HParam(
            1.0,
            "γ: weight of the mean pairwise discrepancy between environments (mmd_gamma)",
            search=FloatDistribution(0.1, 10.0, log=True),
            ge=0,
        ),
    }

    def __init__(self, dataset: BenchmarkDataset, hparams: dict[str, Any]) -> None:
        super().__init__(dataset, hparams)
        self.features, self.head = feature_split(self.model, dataset, type(self).name)

    def penalty(self, features: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """The mean discrepancy over the pairs of environments (0 with a single one), in
        float32 even under autocast (distances from inner products lose too much in bf16)."""
        measure = gaussian_mmd if self.discrepancy == "gaussian" else coral_distance
        groups = [features[idx] for idx in environments(a)]
        pairs = list(combinations(groups, 2))
        if not pairs:
            return features.new_zeros(())
        with torch.autocast(features.device.type, enabled=False):
            return sum(measure(x.float(), y.float()) for x, y in pairs) / len(pairs)

    def loss(self, batch: Batch) -> torch.Tensor:
        features = self.features(batch.x)
        objective = self.dataset.loss(self.head(features), batch.y)
        penalty = self.penalty(features.flatten(1).float(), batch.a)
        return objective + self.hp["gamma"] * penalty


@register_method("mmd")
class MMD(_FeatureMatching):
    """MMD (Li et al. 2018), as SubpopBench: ERM plus the Gaussian MMD between attribute features.

    Minimises CE + γ * mean over pairs of attribute values (e, e') in the minibatch of
    MMD²(φ_e, φ_e'), with φ the features before the network's last linear layer (`split_head`;
    a network without one is refused, naming it), and MMD² = mean k(φ_e, φ_e) + mean k(φ_e',
    φ_e') - 2 mean k(φ_e, φ_e') for the kernel k = Σ_γ exp(-γ |u - v|²), γ in {1e-3, ..., 1e3}.
    The cross-entropy is that of the whole minibatch (SubpopBench; DomainBed averages the
    domains' risks).

    Defaults and search range: SubpopBench's `hparams_registry` (= DomainBed's), γ 1
    (log-uniform in [0.1, 10]). On a network that is a single linear layer (`synthetic`) the
    features are the inputs, so the penalty is a constant and MMD trains as ERM.
    """

    paper = (
        "Li et al. 2018, Domain Generalization with Adversarial Feature Learning (CVPR); "
        + SUBPOPBENCH
    )
    discrepancy = "gaussian"


@register_method("coral")
class CORAL(_FeatureMatching):
    """Deep CORAL (Sun & Saenko 2016), as SubpopBench: ERM plus feature mean/covariance gaps.

    Minimises CE + γ * mean over pairs of attribute values (e, e') in the minibatch of
    mean((μ_e - μ_e')²) + mean((C_e - C_e')²), with μ and C the mean and unbiased covariance of
    the features before the network's last linear layer (`split_head`; a network without one is
    refused, naming it). The cross-entropy is that of the whole minibatch (SubpopBench).

    Defaults and search range: SubpopBench's `hparams_registry`, γ (mmd_gamma) 1 (log-uniform
    in [0.1, 10]). Departure: a single-example environment has zero covariance (SubpopBench
    divides by n - 1 = 0). On a network that is a single linear layer (`synthetic`) the features
    are the inputs, so the penalty is a constant and CORAL trains as ERM.
    """

    paper = (
        "Sun & Saenko 2016, Deep CORAL: Correlation Alignment for Deep Domain Adaptation "
        f"(ECCV workshops); {SUBPOPBENCH}"
    )
    discrepancy = "mean_cov"
