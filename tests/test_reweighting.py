"""ReWeight, SqrtReWeight and CBLoss scale each example's loss by a fixed weight of its group."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import run_tiny

from robustbench_mat.errors import UserError
from robustbench_mat.method import Batch
from robustbench_mat.methods.reweighting import class_balanced_weights, inverse_size_weights
from robustbench_mat.registry import DATASETS, METHODS
from robustbench_mat.runner import RunSpec, plan

NAMES = ["reweight", "sqrtreweight", "cbloss"]


def _method(name: str, **overrides):
    dataset = DATASETS.get("synthetic")(n=40, dim=4)
    cls = METHODS.get(name)
    hparams = {k: spec.default for k, spec in cls.hparam_specs(dataset).items()}
    hparams.update(overrides)
    return dataset, cls(dataset, hparams)


def _double(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.double)


def test_inverse_size_weights_for_groups_of_90_and_10() -> None:
    # 1/90 and 1/10 are 1/10 and 9/10 of their sum 10/90; scaled to sum to 2 groups: 0.2, 1.8.
    torch.testing.assert_close(
        inverse_size_weights(torch.tensor([90, 10]), 1.0), _double([0.2, 1.8])
    )
    # Two empty groups weigh 0 but still count in the normaliser: the same shares times 4.
    torch.testing.assert_close(
        inverse_size_weights(torch.tensor([90, 10, 0, 0]), 1.0), _double([0.4, 3.6, 0.0, 0.0])
    )


def test_square_root_weights() -> None:
    # 1/sqrt(100) = 1/10 and 1/sqrt(25) = 1/5 are 1/3 and 2/3 of their sum; times 2: 2/3, 4/3.
    weights = inverse_size_weights(torch.tensor([100, 25]), 0.5)
    torch.testing.assert_close(weights, _double([2 / 3, 4 / 3]))


def test_class_balanced_weights_by_hand() -> None:
    # β = 0.9, sizes 1 and 2: (1 - β) / (1 - β) = 1 and 0.1 / (1 - 0.81) = 10/19; their sum is
    # 29/19, so the weights normalised to sum to 2 are 38/29 and 20/29.
    weights = class_balanced_weights(torch.tensor([1, 2]), 0.9)
    torch.testing.assert_close(weights, _double([38 / 29, 20 / 29]))
    # β = 0: every non-empty group weighs (1 - 0) / (1 - 0) = 1; the empty one 0.
    torch.testing.assert_close(
        class_balanced_weights(torch.tensor([5, 500, 0]), 0.0), _double([1.5, 1.5, 0.0])
    )
    # β -> 1: (1 - β) / (1 - β^n) -> 1 / n, ReWeight's weights.
    counts = torch.tensor([90, 10])
    torch.testing.assert_close(
        class_balanced_weights(counts, 1 - 1e-9),
        inverse_size_weights(counts, 1.0),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("name", NAMES)
def test_loss_is_the_mean_of_group_weighted_cross_entropies(name: str) -> None:
    dataset, method = _method(name, **({"beta": 0.9} if name == "cbloss" else {}))
    train = dataset.split("train")
    assert torch.bincount(train.g, minlength=4).tolist() == [10, 1, 2, 27]
    sizes = _double([10, 1, 2, 27])
    raw = {
        "reweight": 1 / sizes,  # 1/10, 1, 1/2, 1/27
        "sqrtreweight": 1 / sizes.sqrt(),
        "cbloss": 0.1 / (1 - 0.9**sizes),  # (1 - β) / (1 - β^n)
    }[name]
    weights = 4 * raw / raw.sum()
    torch.testing.assert_close(method.group_weights, weights.float())
    with torch.no_grad():  # zero logits: every example's cross-entropy is log 2
        method.model.weight.zero_()
    idx = torch.cat([torch.nonzero(train.g == g)[:, 0][:k] for g, k in ((0, 1), (1, 1), (3, 2))])
    batch = Batch(idx, train.inputs[idx], train.y[idx], train.a[idx], 2)
    # groups 0, 1, 3, 3: the mean of the four weighted losses, not divided by the weights' sum
    expected = math.log(2) * (weights[0] + weights[1] + 2 * weights[3]) / 4
    torch.testing.assert_close(method.loss(batch), expected.float())


@pytest.mark.parametrize("name", NAMES)
def test_refused_without_training_group_labels(name: str, tmp_path) -> None:
    assert METHODS.get(name).needs_train_groups
    for regime in ("val-only", "none"):
        with pytest.raises(UserError, match="needs training group labels"):
            plan(RunSpec(name, "synthetic", regime=regime, workdir=tmp_path))
    assert plan(RunSpec(name, "synthetic", workdir=tmp_path)).regime.name == "full"


def test_cbloss_declares_subpopbench_default_and_search() -> None:
    spec = METHODS.get("cbloss").hparams["beta"]
    assert spec.default == 0.9999
    assert list(spec.search.choices) == [0.99, 0.999, 0.9999, 0.99999]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dataset", ["synthetic", "colored-digits"])
def test_runs_end_to_end(name: str, dataset: str, workdir) -> None:
    data = {"n": 200, "dim": 20} if dataset == "synthetic" else {}
    result = run_tiny(workdir, name, dataset=dataset, data_params=data)
    assert math.isfinite(result.final["val_wga"])
