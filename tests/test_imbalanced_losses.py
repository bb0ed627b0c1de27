"""Focal, LDAM and BSoftmax: SubpopBench's class-imbalance losses, checked by hand."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import run_tiny

from robustbench_mat.method import Batch
from robustbench_mat.methods.imbalanced_losses import focal_loss, ldam_margins
from robustbench_mat.methods.reweighting import class_balanced_weights
from robustbench_mat.registry import DATASETS, METHODS
from robustbench_mat.runner import RunSpec, plan

NAMES = ["focal", "ldam", "bsoftmax"]
CLASS_SIZES = [11, 29]  # synthetic(n=40, dim=4): groups 10, 1, 2, 27


def _method(name: str, **overrides):
    dataset = DATASETS.get("synthetic")(n=40, dim=4)
    cls = METHODS.get(name)
    hparams = {k: spec.default for k, spec in cls.hparam_specs(dataset).items()}
    hparams.update(overrides)
    method = cls(dataset, hparams)
    assert torch.bincount(dataset.split("train").y).tolist() == CLASS_SIZES
    return dataset, method


def _zero_logit_batch(method, y: list[int]) -> Batch:
    """A batch whose logits are all 0 (the network's weight zeroed) and no group labels."""
    with torch.no_grad():
        method.model.weight.zero_()
    labels = torch.tensor(y)
    return Batch(torch.arange(len(y)), torch.randn(len(y), 4), labels, None, 2)


def test_focal_with_gamma_zero_is_cross_entropy() -> None:
    losses = torch.tensor([0.0, 0.1, 1.0, 5.0])
    torch.testing.assert_close(focal_loss(losses, 0.0), losses)


def test_focal_shrinks_confident_examples_most() -> None:
    # p = 0.9: CE = -log 0.9 and (1 - 0.9)^2 = 0.01; p = 0.1: CE = -log 0.1 and 0.9^2 = 0.81.
    losses = torch.tensor([-math.log(0.9), -math.log(0.1)], dtype=torch.double)
    focal = focal_loss(losses, 2.0)
    torch.testing.assert_close(focal, torch.tensor([0.01, 0.81], dtype=torch.double) * losses)
    assert (focal < losses).all() and focal[0] / losses[0] < focal[1] / losses[1]


def test_focal_gradient_is_finite_at_zero_loss() -> None:
    losses = torch.tensor([0.0, 0.5], requires_grad=True)
    focal_loss(losses, 0.5).sum().backward()
    assert torch.isfinite(losses.grad).all()


def test_focal_method_averages_the_scaled_losses() -> None:
    _, method = _method("focal", gamma=2.0)
    batch = _zero_logit_batch(method, [0, 1, 1])
    # zero logits: p_y = 1/2 for every example, so each loss is (1/2)^2 * log 2
    torch.testing.assert_close(method.loss(batch), torch.tensor(0.25 * math.log(2)))
    _, erm_like = _method("focal", gamma=0.0)
    batch = Batch(torch.arange(3), torch.randn(3, 4), torch.tensor([0, 1, 1]), None, 2)
    torch.testing.assert_close(
        erm_like.loss(batch), F.cross_entropy(erm_like.model(batch.x), batch.y)
    )


def test_ldam_margins_for_class_sizes_100_and_1() -> None:
    # 100^(-1/4) = 1/sqrt(10) and 1^(-1/4) = 1; scaled so that the largest is 0.5.
    margins = ldam_margins(torch.tensor([100, 1]), 0.5)
    torch.testing.assert_close(
        margins, torch.tensor([0.5 / math.sqrt(10), 0.5], dtype=torch.double)
    )
    # 16^(-1/4) = 1/2; an empty class has no margin.
    margins = ldam_margins(torch.tensor([16, 1, 0]), 0.4)
    torch.testing.assert_close(margins, torch.tensor([0.2, 0.4, 0.0], dtype=torch.double))


def test_ldam_loss_shifts_the_true_logit_and_scales() -> None:
    _, method = _method("ldam", max_m=0.5, scale=2.0)
    margins = [0.5, 0.5 * (11 / 29) ** 0.25]  # the smaller class 0 gets the largest margin
    torch.testing.assert_close(method.margins, torch.tensor(margins))
    batch = _zero_logit_batch(method, [0, 1])
    # Two classes at logit 0, the true one moved to -m_y, all times s = 2:
    # CE = log(1 + exp(s * m_y)).
    expected = sum(math.log1p(math.exp(2.0 * m)) for m in margins) / 2
    torch.testing.assert_close(method.loss(batch), torch.tensor(expected))
    x = torch.randn(5, 4)
    torch.testing.assert_close(method.predict(x), method.model(x))


def test_ldam_deferred_reweighting_starts_at_its_fraction_of_the_run() -> None:
    _, method = _method("ldam", drw=True, drw_start=0.5, drw_beta=0.999)
    method.prepare(SimpleNamespace(settings=SimpleNamespace(steps=6)))  # weighted after 3 steps
    batch = Batch(torch.arange(4), torch.randn(4, 4), torch.tensor([0, 1, 1, 1]), None, 2)
    logits = method.hp["scale"] * (method.model(batch.x) - F.one_hot(batch.y, 2) * method.margins)
    weights = class_balanced_weights(torch.tensor(CLASS_SIZES), 0.999).float()
    assert weights[0] > 1 > weights[1]  # the smaller class weighs more
    plain = F.cross_entropy(logits, batch.y)
    weighted = F.cross_entropy(logits, batch.y, weight=weights)  # Σ w_y CE / Σ w_y
    for step in range(6):
        expected = plain if step < 3 else weighted
        torch.testing.assert_close(method.loss(batch), expected)
    assert int(method.steps_done) == 6


def test_bsoftmax_adds_log_class_sizes_in_training_only() -> None:
    _, method = _method("bsoftmax")
    x = torch.randn(5, 4)
    shift = torch.log(torch.tensor(CLASS_SIZES, dtype=torch.float))
    torch.testing.assert_close(method.training_logits(x), method.model(x) + shift)
    torch.testing.assert_close(method.predict(x), method.model(x))
    batch = _zero_logit_batch(method, [0, 1])
    # training logits (log 11, log 29): p(class 0) = 11/40, p(class 1) = 29/40
    expected = (math.log(40 / 11) + math.log(40 / 29)) / 2
    torch.testing.assert_close(method.loss(batch), torch.tensor(expected))


@pytest.mark.parametrize("name", NAMES)
def test_needs_no_group_labels(name: str, tmp_path) -> None:
    assert not METHODS.get(name).needs_train_groups
    assert plan(RunSpec(name, "synthetic", workdir=tmp_path)).regime.name == "val-only"
    plan(RunSpec(name, "synthetic", regime="none", workdir=tmp_path))


def test_defaults_and_search_ranges_are_subpopbench_s() -> None:
    focal = METHODS.get("focal").hparams["gamma"]
    assert focal.default == 1.0
    assert (focal.search.low, focal.search.high, focal.search.log) == (0.5, 5.0, True)
    ldam = METHODS.get("ldam").hparams
    assert ldam["max_m"].default == 0.5 and ldam["scale"].default == 30.0
    assert (ldam["max_m"].search.low, ldam["max_m"].search.high) == (0.1, 10**-0.1)
    assert list(ldam["scale"].search.choices) == [10.0, 30.0]
    assert ldam["drw"].default is False


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dataset", ["synthetic", "colored-digits"])
def test_runs_end_to_end(name: str, dataset: str, workdir) -> None:
    data = {"n": 200, "dim": 20} if dataset == "synthetic" else {}
    result = run_tiny(workdir, name, dataset=dataset, data_params=data)
    assert math.isfinite(result.final["val_wga"])


def test_ldam_with_deferred_reweighting_runs_end_to_end(workdir) -> None:
    result = run_tiny(workdir, "ldam", hparams={"drw": "true", "drw_start": "0.5"})
    assert result.hparams["drw"] is True
