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


def selective_mix(
    values: torch.Tensor,
    y: torch.Tensor,
    a: torch.Tensor,
    n_classes: int,
    n_attributes: int,
    same_label: bool | torch.Tensor,
    alpha: float,
    cut: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LISA's selective augmentation of one minibatch (SubpopBench's `_lisa_mixup_data`).

    Intra-label (`same_label`): within each class, two of the attribute values present are
    drawn at random and the class's examples of the first are mixed with those of the second,
    the k-th with the k-th in batch order, with a ratio l ~ Beta(α, α) per pair. Intra-domain:
    within each attribute value, two of its labels, likewise. Rounds repeat, with fresh draws,
    until at least len(values) mixtures exist; they are shuffled and the first len(values)
    returned, with soft targets. With `cut` (images [n, c, h, w]: SubpopBench's
    `_cut_mix_up`), both members of a pair become a mixture: a box of area about (1 - l) of
    the image, one l and one uniformly drawn centre per class (or attribute value) and round,
    is pasted from the partner, and the targets are mixed by the exact share of pixels kept.
    The batch comes back unmixed (one-hot targets) when no class (attribute value) has two
    values of the other variable in it.

    Computed without reading anything back from the device: the pair choices of every round a
    batch could need (at most len(values), as each round mixes at least one pair) are drawn at
    once, the rounds after the one that reaches len(values) mixtures are dropped, the mixtures
    of the others are numbered (fewer than 2 len(values)), and random keys pick len(values) of
    the numbers in random order, which are then traced back to their round, cell and rank.
    `benchmarks/bench_lisa_mix.py` compares the distribution with the loop's.
    """
    n, device = len(values), values.device
    targets = F.one_hot(y, n_classes).float()
    same_label = torch.as_tensor(same_label, device=device)
    within, varying = torch.where(same_label, y, a), torch.where(same_label, a, y)
    c = max(n_classes, n_attributes)
    cell = F.one_hot(within * c + varying, c * c)  # [n, c²]
    rank = (cell.cumsum(0) * cell).sum(1) - 1  # how many earlier examples share the cell
    counts = cell.sum(0).view(c, c)  # [within value, varying value]
    example = torch.zeros(c * c * n, dtype=torch.long, device=device)
    example[(within * c + varying) * n + rank] = torch.arange(n, device=device)
    mixable = (counts > 0).sum(1) >= 2  # values of `within` with two values of `varying`

    rounds = n  # each round mixes at least one pair: never more are needed
    scores = torch.rand(rounds, c, c, device=device).masked_fill(counts == 0, -1.0)
    first, second = scores.topk(2, dim=2).indices.unbind(2)  # [rounds, c] each
    per_round = counts.expand(rounds, c, c)
    k = torch.minimum(
        per_round.gather(2, first[..., None]), per_round.gather(2, second[..., None])
    )[..., 0]
    made = k * mixable * (2 if cut else 1)  # mixtures of each (round, value of `within`)
    in_round = made.sum(1)
    made = made * (in_round.cumsum(0) - in_round < n)[:, None]  # the rounds the loop runs
    # Every mixture made is numbered, group after group (a group: one value of `within` in one
    # round); fewer than 2n exist, as the last round run makes at most n. A random key per
    # number below their count picks n of them, in random order.
    ends = made.view(-1).cumsum(0)
    keys = torch.rand(2 * n, device=device)
    keys = torch.where(torch.arange(2 * n, device=device) < ends[-1], keys, 2.0)
    chosen = keys.topk(n, largest=False).indices
    group = torch.searchsorted(ends, chosen, right=True).clamp(max=rounds * c - 1)
    slot = chosen - (ends - made.view(-1))[group]
    key, first, second, k = group % c, first.view(-1)[group], second.view(-1)[group], k.view(-1)
    k = k[group]
    # Slot s < k mixes the s-th example of the first side with the s-th of the second; with
    # `cut`, slot k + s mixes them the other way round.
    flipped = slot >= k
    rank_in_cell = slot - flipped * k
    own, other = torch.where(flipped, second, first), torch.where(flipped, first, second)
    # (Clamped: when nothing can be mixed the numbers are meaningless and the batch is kept.)
    i = example[((key * c + own) * n + rank_in_cell).clamp(0, len(example) - 1)]
    j = example[((key * c + other) * n + rank_in_cell).clamp(0, len(example) - 1)]
    if cut:
        mixed, kept = _paste_boxes(values[i], values[j], group, rounds * c, alpha)
    else:
        kept = beta(alpha, n, device)
        mixed = _blend(values[i], values[j], kept)
    soft = _blend(targets[i], targets[j], kept)
    any_pair = mixable.any()
    return torch.where(any_pair, mixed, values), torch.where(any_pair, soft, targets)


def _blend(x1: torch.Tensor, x2: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """ratio_i x1_i + (1 - ratio_i) x2_i, one ratio per row."""
    ratio = ratio.view(len(x1), *([1] * (x1.dim() - 1))).to(x1.dtype)
    return ratio * x1 + (1 - ratio) * x2


def _paste_boxes(
    x1: torch.Tensor, x2: torch.Tensor, group: torch.Tensor, n_groups: int, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row i of x1 [n, c, h, w] with a box pasted from row i of x2, and the share of pixels it
    keeps. Rows of one group share the box: area about (1 - l), l ~ Beta(α, α), centred
    uniformly and clipped to the image."""
    size_h, size_w = x1.shape[2], x1.shape[3]
    ratio = beta(alpha, n_groups, x1.device)[group]
    centre_h = torch.randint(size_h, (n_groups,), device=x1.device)[group]
    centre_w = torch.randint(size_w, (n_groups,), device=x1.device)[group]
    cut = (1.0 - ratio).sqrt()
    half_h = (size_h * cut).long() // 2
    half_w = (size_w * cut).long() // 2
    top, bottom = (centre_h - half_h).clamp(min=0), (centre_h + half_h).clamp(max=size_h)
    left, right = (centre_w - half_w).clamp(min=0), (centre_w + half_w).clamp(max=size_w)
    rows = torch.arange(size_h, device=x1.device)
    cols = torch.arange(size_w, device=x1.device)
    inside_rows = (rows >= top[:, None]) & (rows < bottom[:, None])
    inside_cols = (cols >= left[:, None]) & (cols < right[:, None])
    box = (inside_rows[:, :, None] & inside_cols[:, None, :])[:, None]  # [n, 1, h, w]
    kept = 1.0 - (bottom - top) * (right - left) / (size_h * size_w)
    return torch.where(box, x2, x1), kept


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
    Departures: random draws come from torch's generator (theirs mix numpy's and torch's), and
    all of a step's rounds are drawn at once on the device (`selective_mix`: the same
    distribution of mixtures without host reads); the minibatch is the harness's uniform draw,
    as in SubpopBench (the LISA authors' own code samples groups).
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
        same_label = torch.rand(()) <= self.hp["p_sel"]

        def mix(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return selective_mix(
                values,
                batch.y,
                batch.a,
                self.dataset.n_classes,
                self.dataset.n_attributes,
                same_label,
                self.hp["alpha"],
                cut=self.hp["mix_method"] == "cutmix" and values.dim() == 4,
            )

        logits, targets = self.mixed_logits(batch.x, mix)
        return F.cross_entropy(logits.float(), targets.to(logits.device))
