"""Mixing methods, as SubpopBench runs them: Mixup and LISA.

Float inputs (images, feature vectors) are mixed as they are. Token ids (text datasets) cannot be
mixed, so there, as in SubpopBench, the features the network feeds to its last linear layer
(`split_head`: a text classifier's pooled, dropped-out representation) are mixed and the last
layer is applied to the mixture.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from optuna.distributions import CategoricalDistribution, FloatDistribution
from torch import nn

from robustbench_mat.backbones import check_head_split, split_head
from robustbench_mat.data import BenchmarkDataset
from robustbench_mat.errors import UserError
from robustbench_mat.hparams import HParam
from robustbench_mat.method import Batch, Method
from robustbench_mat.registry import register_method

SUBPOPBENCH = "Yang et al. 2023, Change is Hard: A Closer Look at Subpopulation Shift (ICML)"
MIX_METHODS = ("mixup", "cutmix")


def beta(alpha: float, n: int | None = None, device: torch.device | None = None) -> torch.Tensor:
    """Draws from Beta(α, α) on the global torch generator: one (0-d) or `n`."""
    concentration = torch.tensor(float(alpha))
    # validate_args=False: checking the parameters reads them on the host at every draw
    draw = torch.distributions.Beta(concentration, concentration, validate_args=False)
    return draw.sample(() if n is None else (n,)).to(device)


def mix_pairs(
    alpha: float, x1: torch.Tensor, x2: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """SubpopBench's `_mix_up`: the first k = min(len(x1), len(x2)) rows of each mixed pairwise
    with one ratio l_i ~ Beta(α, α) per pair, l_i x1_i + (1 - l_i) x2_i, and the same for the
    (one-hot or soft) targets."""
    k = min(len(x1), len(x2))
    ratio = beta(alpha, k, x1.device)
    ratio_x = ratio.view(k, *([1] * (x1.dim() - 1))).to(x1.dtype)
    ratio_t = ratio[:, None].to(t1.dtype)
    mixed_x = ratio_x * x1[:k] + (1 - ratio_x) * x2[:k]
    return mixed_x, ratio_t * t1[:k] + (1 - ratio_t) * t2[:k]


def cut_pairs(
    alpha: float, x1: torch.Tensor, x2: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """SubpopBench's `_cut_mix_up` on images [n, c, h, w]: the first k rows of each, stacked
    (x1 then x2); a box of area ≈ (1 - l) of the image, l ~ Beta(α, α), centred uniformly (and
    clipped to the image), is pasted from each row's partner (x1_i <-> x2_i). The targets are
    l' t + (1 - l') t_partner with l' the exact share of pixels kept."""
    k = min(len(x1), len(x2))
    inputs = torch.cat([x1[:k], x2[:k]]).clone()
    targets = torch.cat([t1[:k], t2[:k]])
    partner = torch.cat([torch.arange(k) + k, torch.arange(k)]).to(inputs.device)
    ratio = float(beta(alpha))
    size_h, size_w = inputs.shape[2], inputs.shape[3]
    cut = (1.0 - ratio) ** 0.5
    cut_h, cut_w = int(size_h * cut), int(size_w * cut)
    centre_h, centre_w = int(torch.randint(size_h, ())), int(torch.randint(size_w, ()))
    top, bottom = max(centre_h - cut_h // 2, 0), min(centre_h + cut_h // 2, size_h)
    left, right = max(centre_w - cut_w // 2, 0), min(centre_w + cut_w // 2, size_w)
    inputs[:, :, top:bottom, left:right] = inputs[partner, :, top:bottom, left:right]
    kept = 1.0 - (bottom - top) * (right - left) / (size_h * size_w)
    return inputs, kept * targets + (1.0 - kept) * targets[partner]


def selective_mix(
    values: torch.Tensor,
    y: torch.Tensor,
    a: torch.Tensor,
    n_classes: int,
    same_label: bool,
    alpha: float,
    pair_fn: Callable[..., tuple[torch.Tensor, torch.Tensor]] = mix_pairs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LISA's selective augmentation of one minibatch (SubpopBench's `_lisa_mixup_data`).

    Intra-label (`same_label`): within each class, two of the attribute values present are
    drawn at random and the class's examples of the one are mixed with those of the other, in
    batch order. Intra-domain: within each attribute value, two of its labels, likewise. Rounds
    repeat, with fresh draws, until at least len(values) mixtures exist; they are shuffled and
    the first len(values) returned, with soft targets. The batch comes back unmixed (one-hot
    targets) when the varying variable has a single value in it, or when a round mixes nothing.
    """
    targets = F.one_hot(y, n_classes).float()
    within, varying = (y, a) if same_label else (a, y)
    if len(torch.unique(varying)) < 2:
        return values, targets
    mixed_values, mixed_targets, total = [], [], 0
    while total < len(values):
        before = total
        for key in torch.unique(within):
            members = torch.nonzero(within == key)[:, 0]
            options = torch.unique(varying[members])
            if len(options) < 2:
                continue
            first, second = options[torch.randperm(len(options)).to(options.device)[:2]]
            side1 = members[varying[members] == first]
            side2 = members[varying[members] == second]
            mixed, soft = pair_fn(
                alpha, values[side1], values[side2], targets[side1], targets[side2]
            )
            mixed_values.append(mixed)
            mixed_targets.append(soft)
            total += len(mixed)
        if total == before:
            return values, targets
    order = torch.randperm(total).to(values.device)[: len(values)]
    return torch.cat(mixed_values)[order], torch.cat(mixed_targets)[order]


class _Mixing(Method):
    """A method that trains on mixtures of inputs, or of features for token-id inputs."""

    stackable = False

    def __init__(self, dataset: BenchmarkDataset, hparams: dict[str, Any]) -> None:
        super().__init__(dataset, hparams)
        self._split: tuple[nn.Module, nn.Linear] | None = None

    def feature_split(self, x: torch.Tensor) -> tuple[nn.Module, nn.Linear]:
        """(features, last linear layer) of the network, checked on `x` once."""
        if self._split is None:
            try:
                features, head = split_head(self.model)
                check_head_split(self.model, features, head, x[:2])
            except UserError as error:
                raise UserError(
                    f"method {type(self).name!r} mixes the features of token inputs before the "
                    f"network's last linear layer, and {self.dataset.name}'s network "
                    f"({type(self.model).__name__}) has none that can be split off: {error}"
                ) from None
            self._split = (features, head)
        return self._split

    def mixed_logits(
        self, x: torch.Tensor, mix: Callable[[torch.Tensor], tuple[torch.Tensor, Any]]
    ) -> tuple[torch.Tensor, Any]:
        """Logits of `mix`'s mixture of the inputs (float inputs) or of the features (token ids),
        and what `mix` returns beside the mixture."""
        if torch.is_floating_point(x):
            mixed, extra = mix(x)
            return self.model(mixed), extra
        features, head = self.feature_split(x)
        mixed, extra = mix(features(x))
        return head(mixed), extra


@register_method("mixup")
class Mixup(_Mixing):
    """Mixup (Zhang et al. 2018), as SubpopBench: each minibatch mixed with a permutation of itself.

    One ratio λ ~ Beta(α, α) per step (λ = 1 for α = 0) and a random permutation π of the
    minibatch; the network sees λ x + (1 - λ) x_π and the loss is
    λ L(f, y) + (1 - λ) L(f, y_π). Float inputs are mixed; for token ids (text) the features
    before the last linear layer are (SubpopBench's text branch), and a network whose last
    linear layer cannot be split off is refused, naming it. Uses no group label.

    Default and search range: SubpopBench's `hparams_registry` (= DomainBed's), α 0.2
    (log-uniform in [0.1, 10]). Departure: DomainBed's Mixup mixes minibatches of different
    domains; SubpopBench, and this, mix within one random minibatch.
    """

    paper = f"Zhang et al. 2018, mixup: Beyond Empirical Risk Minimization (ICLR); {SUBPOPBENCH}"
    hparams = {
        "alpha": HParam(
            0.2,
            "α of the Beta(α, α) mixing ratio (mixup_alpha; 0 turns mixing off)",
            search=FloatDistribution(0.1, 10.0, log=True),
            ge=0,
        ),
    }

    def draw(self, n: int, device: torch.device) -> tuple[torch.Tensor | float, torch.Tensor]:
        """λ (a 0-d tensor on `device`, or 1.0 for α = 0) and the permutation of one step."""
        ratio = beta(self.hp["alpha"], device=device) if self.hp["alpha"] > 0 else 1.0
        return ratio, torch.randperm(n).to(device)

    def loss(self, batch: Batch) -> torch.Tensor:
        ratio, order = self.draw(len(batch.y), batch.y.device)

        def mix(values: torch.Tensor) -> tuple[torch.Tensor, None]:
            return ratio * values + (1 - ratio) * values[order], None

        logits, _ = self.mixed_logits(batch.x, mix)
        return ratio * self.dataset.loss(logits, batch.y) + (1 - ratio) * self.dataset.loss(
            logits, batch.y[order]
        )


@register_method("lisa")
class LISA(_Mixing):
    """LISA (Yao et al. 2022), as SubpopBench: mixup only across attributes or across labels.

    Each step, with probability p_sel, mixes intra-label (pairs of the same class and different
    attributes), otherwise intra-domain (the same attribute and different classes), per
    `selective_mix`: per pair a ratio l ~ Beta(α, α), inputs and one-hot targets mixed with it,
    and the loss is the cross-entropy with the soft targets. With `mix_method` cutmix, image
    inputs are cut-and-pasted instead (one ratio per mixed group); other inputs always use mixup.
    Token ids (text) are not mixed: the features before the last linear layer are (SubpopBench's
    text branch), and a network whose last linear layer cannot be split off is refused, naming
    it. Needs training attribute labels.

    Defaults and search ranges: SubpopBench's `hparams_registry`, α 2 (log-uniform in [0.1,
    10]), p_sel 0.5 (uniform in [0, 1]), mix_method mixup (searched over mixup and cutmix).
    Departures: random draws come from torch's generator (theirs mix numpy's and torch's);
    the minibatch is the harness's uniform draw, as in SubpopBench (the LISA authors' own code
    samples groups).
    """

    paper = (
        "Yao et al. 2022, Improving Out-of-Distribution Robustness via Selective Augmentation "
        f"(ICML); {SUBPOPBENCH}"
    )
    needs_train_groups = True
    hparams = {
        "alpha": HParam(
            2.0,
            "α of the Beta(α, α) mixing ratios (LISA_alpha)",
            search=FloatDistribution(0.1, 10.0, log=True),
            gt=0,
        ),
        "p_sel": HParam(
            0.5,
            "probability of an intra-label step (same class, different attribute); otherwise "
            "intra-domain (same attribute, different class) (LISA_p_sel)",
            search=FloatDistribution(0.0, 1.0),
            ge=0,
            le=1,
        ),
        "mix_method": HParam(
            "mixup",
            "how image inputs are mixed: mixup or cutmix; other inputs always use mixup "
            "(LISA_mixup_method)",
            search=CategoricalDistribution(list(MIX_METHODS)),
            choices=MIX_METHODS,
        ),
    }

    def loss(self, batch: Batch) -> torch.Tensor:
        same_label = bool(torch.rand(()) <= self.hp["p_sel"])

        def mix(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            cut = self.hp["mix_method"] == "cutmix" and values.dim() == 4
            return selective_mix(
                values,
                batch.y,
                batch.a,
                self.dataset.n_classes,
                same_label,
                self.hp["alpha"],
                cut_pairs if cut else mix_pairs,
            )

        logits, targets = self.mixed_logits(batch.x, mix)
        return F.cross_entropy(logits.float(), targets.to(logits.device))
