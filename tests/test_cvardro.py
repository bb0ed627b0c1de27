"""CVaR DRO minimises the mean of the worst α-fraction of each minibatch's losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import run_tiny

from robustbench_mat.method import Batch
from robustbench_mat.methods.cvardro import cvar
from robustbench_mat.registry import DATASETS, METHODS
from robustbench_mat.runner import RunSpec, plan

LOSSES = torch.tensor([0.5, 3.0, 0.1, 2.0, 0.7, 0.2, 1.0, 0.4], dtype=torch.double)


def test_quarter_of_eight_losses_is_the_mean_of_the_two_largest() -> None:
    # α m = 0.25 * 8 = 2: the two largest, 3.0 and 2.0, weigh 1/2 each.
    torch.testing.assert_close(cvar(LOSSES, 0.25), torch.tensor(2.5, dtype=torch.double))


def test_fractional_mass_goes_to_the_next_largest_loss() -> None:
    losses = LOSSES[:5]  # 0.5, 3.0, 0.1, 2.0, 0.7
    # α m = 0.3 * 5 = 1.5: the largest weighs 1 / 1.5 = 2/3, the next the remaining 1/3.
    expected = 2 / 3 * 3.0 + 1 / 3 * 2.0
    torch.testing.assert_close(cvar(losses, 0.3), torch.tensor(expected, dtype=torch.double))
    # α m = 0.1 * 5 = 0.5 < 1: all the weight on the largest loss.
    torch.testing.assert_close(cvar(losses, 0.1), torch.tensor(3.0, dtype=torch.double))
    # α = 1: every loss weighs 1/m, the mean.
    torch.testing.assert_close(cvar(losses, 1.0), losses.mean())


@pytest.mark.parametrize("alpha", [0.01, 0.1, 0.25, 0.3, 0.5, 0.77, 1.0])
def test_equals_the_variational_form(alpha: float) -> None:
    # Rockafellar-Uryasev: CVaR_α = min over η of η + Σ (l - η)_+ / (α m); the objective is
    # piecewise linear in η with kinks at the losses, so its minimum is at one of them.
    losses = torch.rand(13, generator=torch.Generator().manual_seed(1), dtype=torch.double)
    dual = min(
        float(eta + torch.relu(losses - eta).sum() / (alpha * len(losses))) for eta in losses
    )
    assert math.isclose(float(cvar(losses, alpha)), dual, rel_tol=1e-9)


def test_gradient_reaches_only_the_worst_losses() -> None:
    losses = LOSSES.clone().requires_grad_(True)
    cvar(losses, 0.25).backward()
    expected = torch.zeros(8, dtype=torch.double)
    expected[1] = expected[3] = 0.5  # 3.0 and 2.0
    torch.testing.assert_close(losses.grad, expected)


def test_method_loss_is_the_cvar_of_the_batch_cross_entropies() -> None:
    dataset = DATASETS.get("synthetic")(n=40, dim=4)
    cls = METHODS.get("cvardro")
    hparams = {k: spec.default for k, spec in cls.hparam_specs(dataset).items()}
    hparams["alpha"] = 0.25
    method = cls(dataset, hparams)
    train = dataset.split("train")
    idx = torch.arange(8)
    batch = Batch(idx, train.inputs[idx], train.y[idx], None, 2)
    with torch.no_grad():
        losses = F.cross_entropy(method.model(batch.x), batch.y, reduction="none")
    top_two = torch.sort(losses, descending=True).values[:2].mean()
    torch.testing.assert_close(method.loss(batch), top_two)


def test_needs_no_group_labels_and_declares_subpopbench_s_alpha(tmp_path) -> None:
    cls = METHODS.get("cvardro")
    assert not cls.needs_train_groups
    plan(RunSpec("cvardro", "synthetic", regime="none", workdir=tmp_path))
    spec = cls.hparams["alpha"]
    assert spec.default == 0.1
    assert (spec.search.low, spec.search.high, spec.search.log) == (0.01, 1.0, True)


@pytest.mark.parametrize("dataset", ["synthetic", "colored-digits"])
def test_runs_end_to_end(dataset: str, workdir) -> None:
    data = {"n": 200, "dim": 20} if dataset == "synthetic" else {}
    result = run_tiny(workdir, "cvardro", dataset=dataset, data_params=data)
    assert math.isfinite(result.final["val_wga"])
