"""IRM, VREx, MMD and CORAL: their penalties on hand-made batches, and short runs."""

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
from robustbench_mat.methods.invariance import (
    KERNEL_GAMMAS,
    environment_masks,
    environment_risks,
    gaussian_kernel,
    gaussian_mmd,
    irm_penalties,
)
from robustbench_mat.registry import DATASETS, METHODS

LN3 = math.log(3.0)


def _method(name: str, dataset=None, **overrides):
    dataset = dataset or DATASETS.get("synthetic")(n=40, dim=4)
    cls = METHODS.get(name)
    hparams = {k: spec.default for k, spec in cls.hparam_specs(dataset).items()}
    hparams.update(overrides)
    torch.manual_seed(0)
    return cls(dataset, hparams)


class _Logits(nn.Module):
    """Returns its inputs as the logits (times a scale of 1 that carries a gradient)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def _fixed_logits(name: str, **overrides):
    method = _method(name, **overrides)
    method.model = _Logits()
    return method


def _batch(x, y, a) -> Batch:
    return Batch(torch.arange(len(y)), torch.as_tensor(x), torch.tensor(y), torch.tensor(a), 2)


# Every example has logits [ln 3, 0], so p(y = 0) = 0.75. The gradient of CE(w z, y) in w at
# w = 1 is Σ_k p_k z_k - z_y: -0.25 ln 3 for y = 0 and 0.75 ln 3 for y = 1.
CALIBRATED_Y = [0, 0, 0, 0, 0, 0, 1, 1]  # each half (even, odd positions) has three 0s, one 1
CONFIDENT_Y = [0, 0, 0, 0]  # each half's gradient is -0.25 ln 3


def _logits(n: int) -> torch.Tensor:
    return torch.tensor([[LN3, 0.0]]).repeat(n, 1)


def irm_penalty(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The penalty of a minibatch that is one environment."""
    return irm_penalties(logits, y, torch.ones(1, len(y)))[0]


def test_irm_penalty_is_zero_when_each_half_is_calibrated() -> None:
    penalty = irm_penalty(_logits(8), torch.tensor(CALIBRATED_Y))
    assert abs(penalty.item()) < 1e-7


def test_irm_penalty_is_the_product_of_the_halves_gradients() -> None:
    penalty = irm_penalty(_logits(4), torch.tensor(CONFIDENT_Y))
    torch.testing.assert_close(penalty, torch.tensor((0.25 * LN3) ** 2))
    # Halves that disagree (gradients -0.25 ln 3 and +0.75 ln 3) give a negative estimate.
    mixed = irm_penalty(_logits(2), torch.tensor([0, 1]))
    torch.testing.assert_close(mixed, torch.tensor(-0.25 * 0.75 * LN3**2))
    assert irm_penalty(_logits(1), torch.tensor([1])).item() == 0.0


def _two_environments() -> Batch:
    """Environment a = 0 is CALIBRATED_Y, environment a = 1 is CONFIDENT_Y, interleaved (each
    keeps its order), so that splitting by attribute, not by position, recovers them."""
    a = [0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0]
    y0, y1 = iter(CALIBRATED_Y), iter(CONFIDENT_Y)
    y = [next(y1) if value else next(y0) for value in a]
    return _batch(_logits(12), y, a)


def test_irm_loss_averages_risks_and_penalties_over_attributes_with_annealing() -> None:
    method = _fixed_logits("irm", penalty_weight=100.0, anneal_iters=3)
    batch = _two_environments()
    risk0 = (6 * -math.log(0.75) + 2 * -math.log(0.25)) / 8
    risk1 = -math.log(0.75)
    nll = (risk0 + risk1) / 2
    penalty = (0.0 + (0.25 * LN3) ** 2) / 2
    torch.testing.assert_close(method.loss(batch), torch.tensor(nll + penalty))
    method.after_step(batch, 2)
    torch.testing.assert_close(method.loss(batch), torch.tensor(nll + penalty))
    method.after_step(batch, 3)
    torch.testing.assert_close(method.loss(batch), torch.tensor(nll + 100.0 * penalty))
    assert method.state_dict()["update_count"] == 3  # resumes with the anneal count


def test_environments_are_attribute_values_not_groups() -> None:
    a = torch.tensor([1, 0, 1, 1, 0])
    masks = environment_masks(a, 3)  # value 2 is absent: an empty environment
    assert masks.tolist() == [[0, 1, 0, 0, 1], [1, 0, 1, 1, 0], [0, 0, 0, 0, 0]]
    risks = environment_risks(torch.tensor([1.0, 2.0, 3.0, 5.0, 4.0]), masks)
    assert risks.tolist() == [3.0, 3.0, 0.0]


def test_irm_penalties_of_interleaved_environments_equal_each_alone() -> None:
    batch = _two_environments()
    masks = environment_masks(batch.a, 2)
    penalties = irm_penalties(batch.x, batch.y, masks)
    alone = [irm_penalty(_logits(8), torch.tensor(CALIBRATED_Y))]
    alone.append(irm_penalty(_logits(4), torch.tensor(CONFIDENT_Y)))
    torch.testing.assert_close(penalties, torch.stack(alone))


def test_vrex_penalty_is_the_variance_of_the_environment_risks() -> None:
    method = _fixed_logits("vrex", penalty_weight=10.0, anneal_iters=1)
    batch = _batch(_logits(4), [0, 1, 0, 1], [0, 1, 0, 1])
    losses = F.cross_entropy(batch.x, batch.y, reduction="none")
    risks = environment_risks(losses, environment_masks(batch.a, 2))
    low, high = -math.log(0.75), -math.log(0.25)  # a = 0 has y = 0, a = 1 has y = 1
    torch.testing.assert_close(risks, torch.tensor([low, high]))
    mean, variance = (low + high) / 2, (LN3 / 2) ** 2  # (high - low) / 2 = ln 3 / 2
    torch.testing.assert_close(method.loss(batch), torch.tensor(mean + variance))
    method.after_step(batch, 1)
    torch.testing.assert_close(method.loss(batch), torch.tensor(mean + 10.0 * variance))


def test_vrex_defaults_are_domainbeds() -> None:
    hp = _method("vrex").hp
    assert (hp["penalty_weight"], hp["anneal_iters"]) == (10.0, 500)
    hp = _method("irm").hp
    assert (hp["penalty_weight"], hp["anneal_iters"]) == (100.0, 500)


def test_coral_penalty_for_known_means_and_covariances() -> None:
    method = _method("coral")
    # a = 0: mean (1, 1), covariance diag(4/3, 4/3); a = 1: mean (4, 1), covariance
    # [[2, 0], [0, 0]]. Mean gap: (9 + 0) / 2; covariance gap: ((2/3)^2 + (4/3)^2) / 4 = 5/9.
    features = torch.tensor([[0.0, 0], [3, 1], [2, 0], [0, 2], [5, 1], [2, 2]])
    a = torch.tensor([0, 1, 0, 0, 1, 0])
    torch.testing.assert_close(method.penalty(features, a), torch.tensor(4.5 + 5 / 9))
    assert method.penalty(features, torch.zeros(6, dtype=torch.long)).item() == 0.0


def test_coral_loss_is_cross_entropy_plus_gamma_times_penalty() -> None:
    method = _method("coral", gamma=2.0)
    # synthetic's network is one linear layer: its features are its inputs.
    x = torch.tensor([[0.0, 0, 1, 0], [3, 1, 0, 0], [2, 0, 0, 1], [5, 1, 1, 1]])
    batch = _batch(x, [0, 1, 0, 1], [0, 1, 0, 1])
    # a = 0: rows 0 and 2, mean (1, 0, 0.5, 0.5); a = 1: rows 1 and 3, mean (4, 1, 0.5, 0.5).
    gap_mean = (9 + 1) / 4
    d0 = torch.tensor([-2.0, 0, 1, -1])
    d1 = torch.tensor([-2.0, 0, -1, -1])
    gap_cov = (torch.outer(d0, d0) / 2 - torch.outer(d1, d1) / 2).pow(2).mean()
    expected = F.cross_entropy(method.model(x), batch.y) + 2.0 * (gap_mean + gap_cov)
    torch.testing.assert_close(method.loss(batch), expected)


def test_mmd_is_zero_for_identical_feature_sets() -> None:
    method = _method("mmd")
    same = torch.tensor([[0.0, 1.0], [2.0, -1.0], [0.5, 0.5]])
    features = torch.cat([same, same])
    a = torch.tensor([0, 0, 0, 1, 1, 1])
    assert abs(method.penalty(features, a).item()) < 1e-6
    moved = torch.cat([same, same + 1])
    assert method.penalty(moved, a).item() > 0.1


def test_gaussian_mmd_of_two_points_by_hand() -> None:
    # k(u, u) = Σ_γ exp(-γ 1e-30) = 7 (distances are clamped at 1e-30); k(0, 1) = Σ_γ e^-γ.
    cross = sum(math.exp(-gamma) for gamma in KERNEL_GAMMAS)
    points = torch.tensor([[0.0], [1.0]])
    value = gaussian_mmd(gaussian_kernel(points, points), torch.eye(2), 0, 1)
    torch.testing.assert_close(value, torch.tensor(14 - 2 * cross))


class _NoHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(4, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


class _Squashed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(x))


def _dataset(network: type[nn.Module]) -> BenchmarkDataset:
    class Tiny(BenchmarkDataset):
        name = "invariance-test"
        n_classes, n_attributes = 2, 2
        class_names, attribute_names = ("y0", "y1"), ("a0", "a1")

        def load_split(self, split: str) -> SplitArrays:
            y = torch.tensor([0, 1, 0, 1])
            return SplitArrays(torch.randn(4, 4), y, y.clone())

        def build_model(self) -> nn.Module:
            return network()

    return Tiny()


@pytest.mark.parametrize("name", ["mmd", "coral"])
@pytest.mark.parametrize("network", [_NoHead, _Squashed])
def test_feature_matching_refuses_a_network_without_a_separable_head(name, network) -> None:
    with pytest.raises(UserError, match=f"{name}.*invariance-test's network \\({network.__name__}"):
        _method(name, _dataset(network))


@pytest.mark.parametrize("name", ["irm", "vrex", "mmd", "coral"])
def test_invariance_methods_need_training_attributes(name) -> None:
    assert METHODS.get(name).needs_train_groups
    assert not METHODS.get(name).stackable


@pytest.mark.parametrize("name", ["irm", "vrex", "mmd", "coral"])
def test_runs_on_synthetic(workdir, name) -> None:
    run_tiny(workdir, name, hparams={"anneal_iters": 10} if name in ("irm", "vrex") else {})


@pytest.mark.parametrize("name", ["irm", "vrex", "mmd", "coral"])
def test_runs_on_colored_digits(workdir, name) -> None:
    result = run_tiny(workdir, name, dataset="colored-digits", data_params={})
    assert math.isfinite(result.selected["test_wga"])
