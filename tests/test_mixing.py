"""Mixup and LISA: their mixtures on hand-made batches, and short runs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import run_tiny
from torch import nn

from robustbench_mat.data import BenchmarkDataset, SplitArrays
from robustbench_mat.errors import UserError
from robustbench_mat.method import Batch
from robustbench_mat.methods.mixing import cut_pairs, selective_mix
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
    mixed, targets = selective_mix(x, Y, A, 2, same_label, alpha=2.0)
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
    mixed, targets = selective_mix(x, y, a, 2, same_label=True, alpha=2.0)  # one attribute
    assert torch.equal(mixed, x) and torch.equal(targets, F.one_hot(y, 2).float())
    mixed, _ = selective_mix(x, y, y.clone(), 2, same_label=False, alpha=2.0)  # a = y: no pair
    assert torch.equal(mixed, x)


def test_cutmix_pastes_a_box_from_the_partner_and_mixes_targets_by_area() -> None:
    torch.manual_seed(3)
    zeros, ones = torch.zeros(2, 1, 8, 8), torch.ones(2, 1, 8, 8)
    t0, t1 = F.one_hot(torch.tensor([0, 0]), 2).float(), F.one_hot(torch.tensor([1, 1]), 2).float()
    mixed, targets = cut_pairs(2.0, zeros, ones, t0, t1)
    assert mixed.shape == (4, 1, 8, 8)
    box = mixed[0, 0] == 1
    assert torch.equal(mixed[1, 0] == 1, box) and torch.equal(mixed[2, 0] == 0, box)
    rows, cols = torch.nonzero(box, as_tuple=True)
    assert box.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    kept = 1 - box.float().mean()
    torch.testing.assert_close(targets[0], torch.stack([kept, 1 - kept]))
    torch.testing.assert_close(targets[2], torch.stack([1 - kept, kept]))


def test_lisa_loss_is_the_soft_target_cross_entropy_of_the_mixture() -> None:
    method = _method("lisa", p_sel=1.0)
    method.model = _Recorder()
    x = torch.randn(len(Y), 2)
    batch = Batch(torch.arange(len(Y)), x, Y, A, 2)
    torch.manual_seed(7)
    loss = method.loss(batch)
    torch.manual_seed(7)
    torch.rand(())  # the intra-label / intra-domain draw
    mixed, targets = selective_mix(x, Y, A, 2, True, 2.0)
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
