"""CVaR DRO: the mean of the worst α-fraction of a minibatch's losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from optuna.distributions import FloatDistribution

from robustbench_mat.hparams import HParam
from robustbench_mat.method import Batch, Method
from robustbench_mat.methods.invariance import SUBPOPBENCH
from robustbench_mat.registry import register_method


def cvar(losses: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """CVaR at level α of the m losses: the worst-case mean over the distributions whose
    density w.r.t. uniform is at most 1 / α. The k = floor(α m) largest losses weigh 1 / (α m)
    each, the next largest the remaining 1 - k / (α m), the others 0 (Levy et al.'s best
    response, as SubpopBench's `RobustLoss` without regulariser). Tensor ops only."""
    m = losses.shape[-1]
    ranked = torch.sort(losses, descending=True).values
    if isinstance(alpha, torch.Tensor):
        level = alpha.double()
    else:
        level = torch.tensor(alpha, dtype=torch.float64, device=losses.device)
    mass = level * m
    cutoff = torch.floor(mass)
    ranks = torch.arange(m, device=losses.device, dtype=torch.float64)
    full = torch.where(ranks < cutoff, 1.0 / mass, torch.zeros_like(ranks))
    weights = torch.where(ranks == cutoff, 1.0 - cutoff / mass, full)
    return (weights.to(ranked.dtype) * ranked).sum()


@register_method("cvardro")
class CVaRDRO(Method):
    """CVaR DRO (Levy et al. 2020), as SubpopBench: the mean of the worst α-fraction of losses.

    Each step takes the minibatch's per-example cross-entropies and minimises their CVaR at
    level α (`cvar`): with m examples, the floor(α m) largest losses weigh 1 / (α m) each and
    the next one takes the remaining mass, as the best response of SubpopBench's `RobustLoss`
    (the `fast-dro` code of Levy et al. vendored in `learning/joint_dro.py`) with the
    regulariser 0 it uses. The weights are constants of the losses' ranks, so the gradient flows
    through the selected losses only. Needs no group labels.

    Default and search range from SubpopBench's `hparams_registry`: α (their joint_dro_alpha)
    = 0.1, searched 10^U(-2, 0), i.e. log-uniform in [0.01, 1]. Departure: α must be > 0
    (theirs treats α = 0 as ERM, which α = 1 already is).
    """

    paper = (
        "Levy et al. 2020, Large-Scale Methods for Distributionally Robust Optimization "
        f"(NeurIPS); {SUBPOPBENCH}"
    )
    stack_varying = ("alpha",)
    hparams = {
        "alpha": HParam(
            0.1,
            "α: the fraction of the minibatch, worst losses first, whose mean is minimised",
            search=FloatDistribution(0.01, 1.0, log=True),
            gt=0,
            le=1,
        ),
    }

    def loss(self, batch: Batch) -> torch.Tensor:
        losses = F.cross_entropy(self.model(batch.x).float(), batch.y, reduction="none")
        return cvar(losses, self.hp["alpha"])
