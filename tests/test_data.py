"""The dataset contract (groups, evaluation groups) and the schedule of training batches."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robustbench_mat.data import (
    BatchSchedule,
    BenchmarkDataset,
    EvalGroups,
    GroupedSplit,
    SplitArrays,
    balanced_weights,
    stable_hash,
)
from robustbench_mat.errors import UserError
from robustbench_mat.hparams import HParam

# --- BatchSchedule -----------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [0, -1, 10, 11, 1000])
def test_full_batch_returns_all_indices(batch_size):
    schedule = BatchSchedule(10, batch_size, seed=3)
    assert schedule.full_batch
    assert schedule.batch_size == 10
    for step in (0, 1, 57):
        assert torch.equal(schedule.indices(step), torch.arange(10))


def test_uniform_schedule_visits_every_example_once_per_epoch():
    n, batch_size = 24, 6
    schedule = BatchSchedule(n, batch_size, seed=7)
    assert not schedule.full_batch
    assert schedule.batches_per_epoch == 4
    epochs = []
    for epoch in range(5):
        batches = [schedule.indices(epoch * 4 + k) for k in range(4)]
        assert all(len(b) == batch_size for b in batches)
        visited = torch.cat(batches)
        assert torch.equal(visited.sort().values, torch.arange(n))
        epochs.append(visited)
    # Each epoch is shuffled anew.
    assert len({tuple(e.tolist()) for e in epochs}) == 5
    assert not torch.equal(epochs[0], torch.arange(n))


def test_uniform_schedule_drops_the_incomplete_last_batch():
    schedule = BatchSchedule(10, 4, seed=0)
    assert schedule.batches_per_epoch == 2
    first_epoch = torch.cat([schedule.indices(0), schedule.indices(1)])
    assert len(first_epoch) == 8 and len(set(first_epoch.tolist())) == 8
    assert len(schedule.indices(2)) == 4


@pytest.mark.parametrize("weighted", [False, True])
def test_schedule_is_a_pure_function_of_seed_and_step(weighted):
    n, batch_size, steps = 50, 5, 300  # several epochs and several weighted chunks (64 steps)
    weights = torch.linspace(1, 3, n) if weighted else None
    forward = BatchSchedule(n, batch_size, seed=11, weights=weights)
    in_order = [forward.indices(s).clone() for s in range(steps)]

    order = torch.randperm(steps, generator=torch.Generator().manual_seed(0)).tolist()
    shuffled = BatchSchedule(n, batch_size, seed=11, weights=weights)
    out_of_order = {s: shuffled.indices(s).clone() for s in order}
    backwards = BatchSchedule(n, batch_size, seed=11, weights=weights)
    for s in reversed(range(steps)):
        assert torch.equal(backwards.indices(s), in_order[s]), s
    for s in range(steps):
        assert torch.equal(out_of_order[s], in_order[s]), s
        # Asking the same object again after jumping around gives the same answer.
        assert torch.equal(forward.indices(s), in_order[s]), s


def test_global_torch_rng_does_not_change_the_schedule():
    torch.manual_seed(0)
    first = BatchSchedule(40, 8, seed=2).indices(13)
    torch.manual_seed(12345)
    torch.rand(100)
    assert torch.equal(BatchSchedule(40, 8, seed=2).indices(13), first)


@pytest.mark.parametrize("weighted", [False, True])
def test_different_seeds_give_different_batches(weighted):
    weights = torch.ones(100) if weighted else None
    a = BatchSchedule(100, 10, seed=0, weights=weights)
    b = BatchSchedule(100, 10, seed=1, weights=weights)
    first_a = torch.cat([a.indices(s) for s in range(10)])
    first_b = torch.cat([b.indices(s) for s in range(10)])
    assert not torch.equal(first_a, first_b)


def test_balanced_weights_are_inverse_frequencies():
    labels = torch.tensor([0, 0, 0, 1, 2, 2])
    weights = balanced_weights(labels)
    expected = torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0, 0.5, 0.5], dtype=torch.float64)
    assert torch.allclose(weights, expected)
    # Every present label carries the same total weight.
    totals = torch.zeros(3, dtype=torch.float64).index_add_(0, labels, weights)
    assert torch.allclose(totals, torch.ones(3, dtype=torch.float64))


def test_weighted_schedule_balances_label_frequencies():
    labels = torch.cat([torch.zeros(900), torch.ones(80), torch.full((20,), 2)]).long()
    labels = labels[torch.randperm(1000, generator=torch.Generator().manual_seed(5))]
    schedule = BatchSchedule(1000, 50, seed=3, weights=balanced_weights(labels))
    assert not schedule.full_batch
    draws = torch.cat([schedule.indices(s) for s in range(600)])  # 30,000 draws
    assert len(draws) == 30_000
    frequencies = torch.bincount(labels[draws], minlength=3).double() / len(draws)
    # Each label has probability 1/3; the standard error is about 0.003.
    assert torch.allclose(frequencies, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.02)
    # Drawn with replacement: the rare label's 20 examples are each drawn hundreds of times.
    assert torch.bincount(draws[labels[draws] == 2]).max() > 100


def test_weighted_schedule_with_batch_size_zero_draws_the_pool_size():
    weights = torch.ones(30)
    schedule = BatchSchedule(30, 0, seed=0, weights=weights)
    assert not schedule.full_batch
    batch = schedule.indices(0)
    assert len(batch) == 30
    assert len(set(batch.tolist())) < 30  # with replacement (all-distinct has p ~ 1e-12)


def test_subset_restricts_uniform_batches():
    subset = torch.tensor([1, 4, 5, 9, 12, 13, 20, 21])
    schedule = BatchSchedule(30, 4, seed=1, subset=subset)
    assert schedule.batches_per_epoch == 2
    epoch = torch.cat([schedule.indices(0), schedule.indices(1)])
    assert torch.equal(epoch.sort().values, subset)
    for step in range(2, 40):
        assert set(schedule.indices(step).tolist()) <= set(subset.tolist())


def test_subset_full_batch_is_the_subset():
    subset = torch.tensor([3, 1, 2])
    schedule = BatchSchedule(10, 0, seed=0, subset=subset)
    assert schedule.full_batch
    assert torch.equal(schedule.indices(4), subset)


def test_subset_with_weights_only_draws_from_the_subset():
    subset = torch.arange(0, 100, 2)
    weights = torch.zeros(100)
    weights[subset] = 1.0
    weights[10] = 0.0  # an excluded-by-weight member of the subset is never drawn
    schedule = BatchSchedule(100, 10, seed=4, subset=subset, weights=weights)
    drawn = set(torch.cat([schedule.indices(s) for s in range(200)]).tolist())
    assert drawn <= set(subset.tolist()) - {10}
    assert len(drawn) > 40


def test_class_balanced_schedule_draws_every_class_equally_often():
    labels = torch.cat([torch.zeros(880), torch.ones(120)]).long()  # CivilComments' 88/12
    schedule = BatchSchedule(1000, 32, seed=0, class_labels=labels)
    assert not schedule.full_batch
    draws = torch.cat([schedule.indices(s) for s in range(500)])  # 16,000 draws
    frequencies = torch.bincount(labels[draws], minlength=2).double() / len(draws)
    # Probability 1/2 each; the standard error is about 0.004.
    assert torch.allclose(frequencies, torch.full((2,), 0.5, dtype=torch.float64), atol=0.02)


def test_class_balance_keeps_the_weights_within_each_class():
    labels = torch.tensor([0, 0, 0, 1])
    weights = torch.tensor([1.0, 1.0, 2.0, 5.0])
    schedule = BatchSchedule(4, 2, seed=0, weights=weights, class_labels=labels)
    expected = torch.tensor([0.25, 0.25, 0.5, 1.0], dtype=torch.float64)
    assert torch.allclose(schedule.weights, expected)  # class totals 1 and 1, 1:1:2 inside


def test_class_balance_counts_the_positions_of_a_subset_with_repeats():
    labels = torch.tensor([0, 0, 1, 1])
    subset = torch.tensor([0, 1, 2, 2, 2, 3])  # JTT-style upsampling of example 2
    schedule = BatchSchedule(4, 2, seed=0, subset=subset, class_labels=labels)
    expected = torch.tensor([0.5, 0.5, 0.25, 0.25, 0.25, 0.25], dtype=torch.float64)
    assert torch.allclose(schedule.weights, expected)


# --- EvalGroups and the group id ---------------------------------------------------------------


def test_eval_groups_from_ids():
    groups = EvalGroups.from_ids(torch.tensor([0, 2, 1, 2, 2]), ("a", "b", "c"))
    assert groups.names == ("a", "b", "c")
    assert groups.membership.dtype == torch.bool
    assert groups.membership.shape == (5, 3)
    assert torch.equal(groups.membership.sum(1), torch.ones(5, dtype=torch.long))
    assert groups.membership[1, 2] and groups.membership[2, 1] and groups.membership[0, 0]
    assert torch.equal(groups.counts(), torch.tensor([1, 1, 3]))


def test_eval_groups_from_ids_keeps_absent_groups():
    groups = EvalGroups.from_ids(torch.tensor([0, 0]), ("a", "b"))
    assert torch.equal(groups.counts(), torch.tensor([2, 0]))


class ThreeColours(BenchmarkDataset):
    """A tiny dataset with two classes and three attribute values."""

    name = "three-colours"
    n_classes = 2
    n_attributes = 3
    class_names = ("cat", "dog")
    attribute_names = ("red", "green", "blue")
    params = {"n": HParam(12, "examples")}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loads = []

    def load_split(self, split):
        self.loads.append(split)
        n = self.config["n"]
        y = torch.tensor([i % 2 for i in range(n)], dtype=torch.int32)
        a = torch.tensor([(i // 2) % 3 for i in range(n)], dtype=torch.int32)
        return SplitArrays(torch.arange(n, dtype=torch.float32)[:, None], y, a)

    def build_model(self):
        return nn.Linear(1, 2)


def test_group_id_is_label_times_attributes_plus_attribute():
    dataset = ThreeColours()
    split = dataset.split("train")
    assert split.y.dtype == torch.long and split.a.dtype == torch.long
    assert torch.equal(split.g, split.y * 3 + split.a)
    assert split.n_attributes == 3
    # i -> (y, a) = (i % 2, (i // 2) % 3); e.g. example 3 is dog/green = 1 * 3 + 1 = 4.
    assert split.g[3].item() == 4
    assert split.g[4].item() == 2  # cat/blue
    assert dataset.n_groups == 6
    assert sorted(set(split.g.tolist())) == list(range(6))


def test_group_names_follow_the_group_id():
    dataset = ThreeColours()
    assert dataset.group_names() == [
        "cat/red",
        "cat/green",
        "cat/blue",
        "dog/red",
        "dog/green",
        "dog/blue",
    ]
    assert dataset.group_name(5) == "dog/blue"
    assert dataset.group_name(torch.tensor(3)) == "dog/red"


def test_default_eval_groups_are_the_training_groups():
    dataset = ThreeColours()
    split = dataset.split("val")
    groups = split.eval_groups
    assert groups.names == tuple(dataset.group_names())
    assert groups.membership.shape == (12, 6)
    assert torch.equal(groups.membership.float().argmax(1), split.g)
    assert torch.equal(groups.counts(), torch.full((6,), 2))


def test_splits_are_loaded_once_and_unknown_splits_rejected():
    dataset = ThreeColours()
    assert dataset.split("train") is dataset.split("train")
    dataset.split("test")
    assert dataset.loads == ["train", "test"]
    with pytest.raises(ValueError, match="unknown split 'training'"):
        dataset.split("training")


def test_dataset_params_are_resolved_and_fingerprinted():
    assert ThreeColours().config == {"n": 12}
    assert len(ThreeColours(n="8").split("train")) == 8
    assert ThreeColours(n=8).fingerprint() == ThreeColours(n="8").fingerprint()
    assert ThreeColours(n=8).fingerprint() != ThreeColours().fingerprint()
    with pytest.raises(UserError, match="unknown dataset 'three-colours' setting size"):
        ThreeColours(size=3)


def test_stable_hash_ignores_key_order():
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})
    assert len(stable_hash({"a": 1}, length=8)) == 8


def test_grouped_split_fetch_from_tensor_and_from_dataset():
    y = torch.tensor([0, 1, 0])
    a = torch.tensor([1, 1, 0])
    groups = EvalGroups.from_ids(y * 2 + a, ("0", "1", "2", "3"))
    tensor_inputs = torch.arange(6.0).reshape(3, 2)
    in_memory = GroupedSplit("train", tensor_inputs, y, a, 2, groups)
    on_disk = GroupedSplit("train", list(tensor_inputs), y, a, 2, groups)
    assert in_memory.in_memory and not on_disk.in_memory
    idx = torch.tensor([2, 0])
    assert torch.equal(in_memory.fetch(idx), tensor_inputs[[2, 0]])
    assert torch.equal(on_disk.fetch(idx), tensor_inputs[[2, 0]])
    assert len(on_disk) == 3
