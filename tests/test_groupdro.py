"""GroupDRO's weights move to the group with the highest loss."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from helpers import run_tiny

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


def test_generalization_adjustment_enters_the_weight_update_and_the_objective() -> None:
    # A batch from two groups, (class 0, attribute 0) and (class 1, attribute 1), of 10 and 27
    # training examples, and fixed logits, so that the per-group losses are known by hand.
    dataset = DATASETS.get("synthetic")(n=40, dim=4)
    cls = METHODS.get("groupdro")
    hparams = {name: spec.default for name, spec in cls.hparam_specs(dataset).items()}
    hparams.update(eta=0.5, generalization_adjustment=2.0)
    method = cls(dataset, hparams)
    train = dataset.split("train")
    sizes = torch.bincount(train.g, minlength=4).double()
    assert sizes.tolist() == [10, 1, 2, 27]
    with torch.no_grad():  # logits (log 3, 0) on the inputs below: p(class 0) = 3/4
        method.model.weight.zero_()
        method.model.weight[0, 0] = 1.0
    idx = torch.cat([torch.nonzero(train.g == g)[:, 0][:2] for g in (0, 3)])
    x = torch.zeros(4, 4)
    x[:, 0] = math.log(3.0)
    batch = Batch(idx, x, train.y[idx], train.a[idx], 2)
    loss = method.loss(batch)
    # L_0 = -log(3/4) (class 0), L_3 = -log(1/4) (class 1), absent groups 1 and 2 have L = 0.
    group_loss = torch.tensor([-math.log(0.75), 0.0, 0.0, -math.log(0.25)], dtype=torch.double)
    adjusted = group_loss + 2.0 / sizes.sqrt()
    expected = torch.exp(0.5 * adjusted)
    expected /= expected.sum()  # q started uniform, so the 1/4 cancels
    torch.testing.assert_close(method.group_weights, expected.float())
    torch.testing.assert_close(loss, (expected * adjusted).sum().float())


def test_adjustment_off_leaves_the_plain_update() -> None:
    dataset, method = _groupdro(eta=0.5)
    assert method.hp["generalization_adjustment"] == 0.0 and not method.hp["group_balanced"]
    assert method.train_weights(dataset.split("train")) is None


def test_group_balanced_sampling_gives_every_group_the_same_mass() -> None:
    dataset = DATASETS.get("synthetic")(n=40, dim=4)
    cls = METHODS.get("groupdro")
    hparams = {name: spec.default for name, spec in cls.hparam_specs(dataset).items()}
    hparams["group_balanced"] = True
    method = cls(dataset, hparams)
    train = dataset.split("train")
    weights = method.train_weights(train)
    sizes = torch.bincount(train.g, minlength=4)
    assert (sizes > 0).all() and len(set(sizes.tolist())) > 1  # unequal groups
    mass = torch.zeros(4, dtype=torch.double).index_add_(0, train.g, weights.double())
    torch.testing.assert_close(mass, torch.ones(4, dtype=torch.double))
    # each example weighs 1 / n_g
    torch.testing.assert_close(weights.double(), 1.0 / sizes[train.g].double())


def test_groupdro_with_both_options_runs_end_to_end(workdir) -> None:
    result = run_tiny(
        workdir, "groupdro", hparams={"group_balanced": "true", "generalization_adjustment": "1"}
    )
    assert result.hparams["group_balanced"] is True
    assert result.hparams["generalization_adjustment"] == 1.0
