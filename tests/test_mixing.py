"""Mixup and LISA: their mixtures on hand-made batches, and short runs."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from helpers import run_tiny
from torch import nn

from robustbench_mat.data import BenchmarkDataset, SplitArrays
from robustbench_mat.errors import UserError
from robustbench_mat.method import Batch
from robustbench_mat.methods.mixing import selective_mix
from robustbench_mat.registry import DATASETS, METHODS


def _method(name: str, dataset=None, **overrides):
    dataset = dataset or DATASETS.get("synthetic")(n=40, dim=4)
    cls = METHODS.get(name)
    hparams = {k: spec.default for k, spec in cls.hparam_specs(dataset).items()}
    hparams.update(overrides)
    torch.manual_seed(0)
    return cls(dataset, hparams)


class _Recorder(nn.Module):
    """Returns its inputs as the logits and keeps what it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return x * self.scale


def test_mixup_mixes_inputs_and_losses_with_one_ratio() -> None:
    method = _method("mixup")
    method.model = _Recorder()
    method.draw = lambda n, device: (0.25, torch.tensor([1, 0]))
    x = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    batch = Batch(torch.arange(2), x, torch.tensor([0, 1]), None, 2)
    loss = method.loss(batch)
    # Row 0: .25 (2, 0) + .75 (0, 2) = (.5, 1.5); row 1: (1.5, .5). Each row's logit gap is 1 in
    # favour of its partner's label: CE = ln(1 + e) for its own label, ln(1 + e^-1) for the
    # partner's, so the loss is .25 ln(1 + e) + .75 ln(1 + e^-1) = ln(1 + e^-1) + .25.
    torch.testing.assert_close(method.model.seen[0], torch.tensor([[0.5, 1.5], [1.5, 0.5]]))
    torch.testing.assert_close(loss, torch.tensor(math.log1p(math.exp(-1)) + 0.25))


def test_mixup_with_alpha_zero_is_erm() -> None:
    method = _method("mixup", alpha=0.0)
    train = method.dataset.split("train")
    batch = Batch(torch.arange(len(train)), train.inputs, train.y, None, 2)
    with torch.no_grad():
        expected = F.cross_entropy(method.model(train.inputs), train.y)
    torch.testing.assert_close(method.loss(batch), expected)


def test_mixup_defaults_and_ranges_are_subpopbenchs() -> None:
    dataset = DATASETS.get("synthetic")(n=40, dim=4)
    space = METHODS.get("mixup").search_space(dataset)
    assert _method("mixup").hp["alpha"] == 0.2
    assert (space["alpha"].low, space["alpha"].high, space["alpha"].log) == (0.1, 10.0, True)
    space = METHODS.get("lisa").search_space(dataset)
    hp = _method("lisa").hp
    assert (hp["alpha"], hp["p_sel"], hp["mix_method"]) == (2.0, 0.5, "mixup")
    assert (space["p_sel"].low, space["p_sel"].high) == (0.0, 1.0)
    assert space["mix_method"].choices == ("mixup", "cutmix")
    assert not METHODS.get("mixup").needs_train_groups
    assert METHODS.get("lisa").needs_train_groups


# Twelve examples in four groups of unequal sizes: (y, a) = (0, 0) x4, (0, 1) x2, (1, 0) x2,
# (1, 1) x4, in a scrambled order.
Y = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1, 1, 0, 1, 0])
A = torch.tensor([0, 1, 1, 0, 0, 1, 0, 1, 0, 1, 1, 0])


def _cell_rank(i: int) -> int:
    """How many earlier examples share example i's (y, a)."""
    same = (Y[:i] == Y[i]) & (A[:i] == A[i])
    return int(same.sum())


def _sources(row: torch.Tensor) -> list[tuple[int, float]]:
    return [(int(i), float(row[i])) for i in torch.nonzero(row)[:, 0]]


@pytest.mark.parametrize("same_label", [True, False])
@pytest.mark.parametrize("seed", range(5))
def test_lisa_mixes_only_the_pairs_its_rule_allows(same_label: bool, seed: int) -> None:
    torch.manual_seed(seed)
    x = torch.eye(len(Y))  # row i is example i, so a mixture shows its two sources and ratio
    mixed, targets = selective_mix(x, Y, A, 2, 2, same_label, alpha=2.0)
    assert mixed.shape == x.shape and targets.shape == (len(Y), 2)
    for row, target in zip(mixed, targets, strict=True):
        (i, wi), (j, wj) = _sources(row)
        assert math.isclose(wi + wj, 1.0, rel_tol=1e-6)
        if same_label:
            assert Y[i] == Y[j] and A[i] != A[j]
        else:
            assert A[i] == A[j] and Y[i] != Y[j]
        assert _cell_rank(i) == _cell_rank(j)  # the k-th of one side with the k-th of the other
        expected = wi * F.one_hot(Y[i], 2).float() + wj * F.one_hot(Y[j], 2).float()
        torch.testing.assert_close(target, expected)


def test_lisa_leaves_a_batch_it_cannot_mix_unchanged() -> None:
    x = torch.randn(4, 3)
    y, a = torch.tensor([0, 1, 0, 1]), torch.tensor([0, 0, 0, 0])
    mixed, targets = selective_mix(x, y, a, 2, 2, same_label=True, alpha=2.0)  # one attribute
    assert torch.equal(mixed, x) and torch.equal(targets, F.one_hot(y, 2).float())
    mixed, _ = selective_mix(x, y, y.clone(), 2, 2, same_label=False, alpha=2.0)  # a = y: no pair
    assert torch.equal(mixed, x)


@pytest.mark.parametrize("same_label", [True, False])
def test_lisa_with_three_attribute_values_mixes_within_the_rule(same_label: bool) -> None:
    """Cells of 6, 4, 2 and 2, 4, 6 examples: which two attribute values a round pairs decides
    how many pairs it mixes (2 or 4 per class), so rounds differ; every mixture still joins the
    k-th of one allowed cell with the k-th of the other."""
    y = torch.tensor([0] * 12 + [1] * 12)
    a = torch.tensor([0] * 6 + [1] * 4 + [2] * 2 + [0] * 2 + [1] * 4 + [2] * 6)

    def rank(i: int) -> int:
        return int(((y[:i] == y[i]) & (a[:i] == a[i])).sum())

    for seed in range(20):
        torch.manual_seed(seed)
        mixed, _ = selective_mix(torch.eye(24), y, a, 2, 3, same_label, alpha=2.0)
        assert mixed.shape == (24, 24)
        for row in mixed:
            (i, _), (j, _) = _sources(row)
            within, varying = (y, a) if same_label else (a, y)
            assert within[i] == within[j] and varying[i] != varying[j] and rank(i) == rank(j)


@pytest.mark.parametrize("same_label", [True, False])
@pytest.mark.parametrize("seed", range(3))
def test_lisa_rounds_fill_the_batch_with_each_pair_equally_often(same_label, seed) -> None:
    """Each round pairs the k-th of one side with the k-th of the other: 2 pairs per class
    (or attribute value) here, 4 per round, so exactly 3 rounds give the 12 mixtures, and
    each of the 4 pairs is mixed 3 times (with fresh ratios)."""
    torch.manual_seed(seed)
    mixed, _ = selective_mix(torch.eye(len(Y)), Y, A, 2, 2, same_label, alpha=2.0)
    pairs = Counter(frozenset(i for i, _ in _sources(row)) for row in mixed)
    assert sorted(pairs.values()) == [3, 3, 3, 3]


@pytest.mark.parametrize("seed", range(3))
def test_cutmix_pastes_a_box_from_the_partner_and_mixes_targets_by_area(seed) -> None:
    """Example i is an image filled with i + 1: each mixture shows two examples of an
    allowed pair (the same rank in their cells), one of them inside a rectangle, and its
    targets are their one-hot targets mixed by their shares of the pixels."""
    torch.manual_seed(seed)
    images = (torch.arange(len(Y), dtype=torch.float32) + 1).view(-1, 1, 1, 1).expand(-1, 1, 8, 8)
    mixed, targets = selective_mix(images, Y, A, 2, 2, True, 2.0, cut=True)
    assert mixed.shape == images.shape
    for image, target in zip(mixed[:, 0], targets, strict=True):
        sources = [int(v) - 1 for v in torch.unique(image)]
        assert len(sources) in (1, 2)  # one: an empty box (a ratio close to 1)
        if len(sources) == 2:
            i, j = sources
            assert Y[i] == Y[j] and A[i] != A[j] and _cell_rank(i) == _cell_rank(j)

            def rectangle(region: torch.Tensor) -> bool:
                rows, cols = torch.nonzero(region, as_tuple=True)
                size = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
                return bool(region.sum() == size)

            assert rectangle(image == i + 1) or rectangle(image == j + 1)
        expected = sum(
            (image == k + 1).float().mean() * F.one_hot(Y[k], 2).float() for k in sources
        )
        torch.testing.assert_close(target, expected)


def test_lisa_loss_is_the_soft_target_cross_entropy_of_the_mixture() -> None:
    method = _method("lisa", p_sel=1.0)
    method.model = _Recorder()
    x = torch.randn(len(Y), 2)
    batch = Batch(torch.arange(len(Y)), x, Y, A, 2)
    torch.manual_seed(7)
    loss = method.loss(batch)
    torch.manual_seed(7)
    torch.rand(())  # the intra-label / intra-domain draw
    mixed, targets = selective_mix(x, Y, A, 2, 2, True, 2.0)
    torch.testing.assert_close(method.model.seen[0], mixed)
    torch.testing.assert_close(loss, F.cross_entropy(mixed, targets))


class _BagOfWords(nn.Module):
    """Token ids [batch, length, 3] -> mean embedding -> linear; refuses float inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert not torch.is_floating_point(x), "token ids must not be mixed"
        return self.head(self.embed(x[..., 0]).mean(1))


class _Squashed(_BagOfWords):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(super().forward(x))


def _tokens(network: type[nn.Module]) -> BenchmarkDataset:
    class Tokens(BenchmarkDataset):
        name = "mixing-test-tokens"
        n_classes, n_attributes = 2, 2
        class_names, attribute_names = ("y0", "y1"), ("a0", "a1")
        hparam_family = "text"

        def load_split(self, split: str) -> SplitArrays:
            ids = torch.randint(1, 50, (8, 5, 1), generator=torch.Generator().manual_seed(0))
            x = torch.cat([ids, torch.ones_like(ids), torch.zeros_like(ids)], dim=-1)
            y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
            return SplitArrays(x, y, torch.tensor([0, 1, 0, 1, 0, 1, 0, 1]))

        def build_model(self) -> nn.Module:
            return network()

    return Tokens()


def test_mixup_on_token_ids_mixes_the_features() -> None:
    dataset = _tokens(_BagOfWords)
    method = _method("mixup", dataset)
    method.draw = lambda n, device: (0.3, torch.arange(n).flip(0))
    train = dataset.split("train")
    batch = Batch(torch.arange(8), train.inputs, train.y, None, 2)
    network = method.model
    features = network.embed(train.inputs[..., 0]).mean(1)
    logits = network.head(0.3 * features + 0.7 * features.flip(0))
    expected = 0.3 * F.cross_entropy(logits, train.y) + 0.7 * F.cross_entropy(
        logits, train.y.flip(0)
    )
    torch.testing.assert_close(method.loss(batch), expected)


@pytest.mark.parametrize("name", ["mixup", "lisa"])
def test_token_inputs_need_a_separable_last_layer(name) -> None:
    dataset = _tokens(_Squashed)
    method = _method(name, dataset)
    train = dataset.split("train")
    batch = Batch(torch.arange(8), train.inputs, train.y, train.a, 2)
    with pytest.raises(UserError, match=f"{name}.*mixing-test-tokens's network \\(_Squashed\\)"):
        method.loss(batch)


def test_lisa_on_token_ids_runs_on_the_features() -> None:
    dataset = _tokens(_BagOfWords)
    method = _method("lisa", dataset)
    train = dataset.split("train")
    loss = method.loss(Batch(torch.arange(8), train.inputs, train.y, train.a, 2))
    loss.backward()
    assert method.model.embed.weight.grad is not None


@pytest.mark.parametrize("name", ["mixup", "lisa"])
def test_runs_on_synthetic(workdir, name) -> None:
    run_tiny(workdir, name)


@pytest.mark.parametrize(
    ("name", "hparams"), [("mixup", {}), ("lisa", {}), ("lisa", {"mix_method": "cutmix"})]
)
def test_runs_on_colored_digits(workdir, name, hparams) -> None:
    result = run_tiny(workdir, name, dataset="colored-digits", data_params={}, hparams=hparams)
    assert math.isfinite(result.selected["test_wga"])
