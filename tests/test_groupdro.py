"""GroupDRO's weights move to the group with the highest loss."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from robustbench_mat.method import Batch
from robustbench_mat.registry import DATASETS, METHODS


def _groupdro(eta: float):
    dataset = DATASETS.get("synthetic")(n=40, dim=4)
    cls = METHODS.get("groupdro")
    hparams = {name: spec.default for name, spec in cls.hparam_specs(dataset).items()}
    hparams["eta"] = eta
    return dataset, cls(dataset, hparams)


def test_weights_follow_the_exponentiated_group_losses() -> None:
    dataset, method = _groupdro(eta=0.5)
    train = dataset.split("train")
    batch = Batch(torch.arange(len(train)), train.inputs, train.y, train.a, 2)
    with torch.no_grad():
        losses = F.cross_entropy(method.model(train.inputs), train.y, reduction="none")
    group_loss = torch.stack([losses[train.g == g].mean() for g in range(4)])
    expected = torch.full((4,), 0.25) * torch.exp(0.5 * group_loss)
    expected /= expected.sum()

    loss = method.loss(batch)
    torch.testing.assert_close(method.group_weights, expected)
    torch.testing.assert_close(loss, (expected * group_loss).sum())
    assert method.group_weights.argmax() == group_loss.argmax()


def test_weight_moves_to_the_group_that_stays_misclassified() -> None:
    dataset, method = _groupdro(eta=0.1)
    train = dataset.split("train")
    with torch.no_grad():  # a model that uses only the spurious feature: minority groups fail
        method.model.weight.zero_()
        method.model.weight[0, 1], method.model.weight[1, 1] = 1.0, -1.0
    hardest = int(train.g[train.a != train.y][0])
    batch = Batch(torch.arange(len(train)), train.inputs, train.y, train.a, 2)
    initial = method.group_weights.clone()
    for _ in range(5):
        method.loss(batch)
    assert method.group_weights[hardest] > initial[hardest]
    majority = [g for g in range(4) if g // 2 == g % 2]
    assert all(method.group_weights[g] < initial[g] for g in majority)
    assert math.isclose(method.group_weights.sum().item(), 1.0, rel_tol=1e-6)


def test_absent_groups_keep_their_weight_and_add_no_loss() -> None:
    dataset, method = _groupdro(eta=1.0)
    train = dataset.split("train")
    only = torch.nonzero(train.g == 0)[:, 0]
    batch = Batch(only, train.inputs[only], train.y[only], train.a[only], 2)
    loss = method.loss(batch)
    weights = method.group_weights
    # group 0 was upweighted, the three absent groups share the rest equally
    assert torch.allclose(weights[1:], weights[1].expand(3))
    with torch.no_grad():
        group0 = F.cross_entropy(method.model(batch.x), batch.y)
    torch.testing.assert_close(loss, weights[0] * group0)
