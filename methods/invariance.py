"""Invariance across environments, as SubpopBench runs it: IRM, VREx, MMD and CORAL.

The environments of a minibatch are its attribute values: SubpopBench splits each minibatch by
the attribute a (`Algorithm.return_attributes`), not by group, so these methods need training
attribute labels. The harness draws a uniform random minibatch (SubpopBench's default sampler,
too), so an environment's share of a batch follows its share of the training split.
"""

from __future__ import annotations

import functools
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


def environment_masks(a: torch.Tensor, n_attributes: int) -> torch.Tensor:
    """One row per attribute value 0..n_attributes-1, marking the examples that have it (float;
    a value absent from the minibatch gives a row of zeros). Masks, not index lists: splitting a
    minibatch by value with `unique`/`nonzero` would wait for the GPU at every step."""
    values = torch.arange(n_attributes, device=a.device)
    return (a[None, :] == values[:, None]).float()


def present_mean(values: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The mean of per-environment `values` over the environments present in the minibatch."""
    present = (masks.sum(1) > 0).to(values.dtype)
    return (values * present).sum() / present.sum().clamp(min=1)


def environment_risks(losses: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The mean loss of each environment (0 for an absent one)."""
    return (masks @ losses) / masks.sum(1).clamp(min=1)


def irm_penalties(logits: torch.Tensor, y: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """IRMv1's penalty of each environment: the product of the gradients, with respect to a
    dummy scale w = 1 of the logits, of the cross-entropy of its even-positioned and of its
    odd-positioned examples (in minibatch order; an unbiased estimate of the squared gradient
    of its risk). The gradient of CE(w z, y) at w = 1 is (softmax(z) - e_y) . z, per example.
    Zero for an environment of fewer than two examples, where one half is empty."""
    one_hot = (y[:, None] == torch.arange(logits.shape[1], device=y.device)).to(logits.dtype)
    slopes = ((torch.softmax(logits, dim=1) - one_hot) * logits).sum(1)
    position = masks.cumsum(1) - 1
    even = masks * (position.remainder(2) == 0)
    odd = masks * (position.remainder(2) == 1)
    gradient_even = (even @ slopes) / even.sum(1).clamp(min=1)
    gradient_odd = (odd @ slopes) / odd.sum(1).clamp(min=1)
    return torch.where(masks.sum(1) >= 2, gradient_even * gradient_odd, 0.0)


def pairs_of_present(masks: torch.Tensor) -> list[tuple[int, int, torch.Tensor]]:
    """(e, f, weight) for every pair e < f of attribute values: 1 / (number of pairs of values
    present in the minibatch) when both e and f are present, else 0."""
    present = (masks.sum(1) > 0).to(masks.dtype)
    count = present.sum()
    n_pairs = (count * (count - 1) / 2).clamp(min=1)
    return [
        (e, f, present[e] * present[f] / n_pairs) for e, f in combinations(range(len(masks)), 2)
    ]


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


def gaussian_mmd(kernel: torch.Tensor, masks: torch.Tensor, e: int, f: int) -> torch.Tensor:
    """The (biased) squared MMD between environments e and f, from the minibatch's kernel
    matrix (`gaussian_kernel`): mean K(x_e, x_e) + mean K(x_f, x_f) - 2 mean K(x_e, x_f)."""
    sizes = masks.sum(1).clamp(min=1)

    def mean_kernel(i: int, j: int) -> torch.Tensor:
        return masks[i] @ kernel @ masks[j] / (sizes[i] * sizes[j])

    return mean_kernel(e, e) + mean_kernel(f, f) - 2 * mean_kernel(e, f)


def moments(features: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each environment's feature mean and unbiased covariance (zero for a single example)."""
    sizes = masks.sum(1)
    means = (masks @ features) / sizes.clamp(min=1)[:, None]
    centred = (features[None] - means[:, None]) * masks[:, :, None]
    covariances = torch.einsum("ebi,ebj->eij", centred, centred)
    return means, covariances / (sizes - 1).clamp(min=1)[:, None, None]


def coral_distance(
    environment_moments: tuple[torch.Tensor, torch.Tensor], e: int, f: int
) -> torch.Tensor:
    """The mean squared difference of the feature means of environments e and f plus that of
    their covariance matrices (SubpopBench's `mean_cov` kernel)."""
    means, covariances = environment_moments
    mean_diff = (means[e] - means[f]).pow(2).mean()
    cov_diff = (covariances[e] - covariances[f]).pow(2).mean()
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

    def penalty_weight(self) -> torch.Tensor:
        """1 before `anneal_iters` steps, λ after (a tensor: no read of the count on the host)."""
        annealed = self.update_count >= self.hp["anneal_iters"]
        return torch.where(annealed, float(self.hp["penalty_weight"]), 1.0)

    def after_step(self, batch: Batch, step: int) -> None:
        self.update_count.fill_(step)


@register_method("irm")
class IRM(_AnnealedPenalty):
    """IRM (Arjovsky et al. 2019), IRMv1 as SubpopBench runs it, the environments being attributes.

    Each step splits the minibatch by attribute value and minimises
    mean_e CE_e + w * mean_e P_e, with CE_e the mean cross-entropy of environment e and P_e
    `irm_penalties`: the product of the gradients, with respect to a dummy scale 1.0 of the
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
        masks = environment_masks(batch.a, batch.n_attributes)
        losses = F.cross_entropy(logits, batch.y, reduction="none")
        nll = present_mean(environment_risks(losses, masks), masks)
        penalty = present_mean(irm_penalties(logits, batch.y, masks), masks)
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

    def loss(self, batch: Batch) -> torch.Tensor:
        logits = self.model(batch.x).float()
        masks = environment_masks(batch.a, batch.n_attributes)
        losses = F.cross_entropy(logits, batch.y, reduction="none")
        risks = environment_risks(losses, masks)
        mean = present_mean(risks, masks)
        variance = present_mean((risks - mean).pow(2), masks)
        return mean + self.penalty_weight() * variance


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
        masks = environment_masks(a, self.dataset.n_attributes)
        with torch.autocast(features.device.type, enabled=False):
            features = features.float()
            if self.discrepancy == "gaussian":
                kernel = gaussian_kernel(features, features)
                measure = functools.partial(gaussian_mmd, kernel, masks)
            else:
                measure = functools.partial(coral_distance, moments(features, masks))
            terms = [weight * measure(e, f) for e, f, weight in pairs_of_present(masks)]
            return sum(terms, features.new_zeros(()))

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
