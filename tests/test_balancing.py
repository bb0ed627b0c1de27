"""SUBG, SUBY, RWG and RWY balance groups or classes through the loop's sampler."""

from __future__ import annotations

import pytest
import torch
from helpers import run_tiny

from robustbench_mat.data import BatchSchedule
from robustbench_mat.errors import UserError
from robustbench_mat.methods.balancing import balanced_subset
from robustbench_mat.registry import DATASETS, METHODS

DATA = {"n": 400, "dim": 4}


def _method(name: str, seed: int = 0):
    dataset = DATASETS.get("synthetic")(**DATA)
    cls = METHODS.get(name)
    hparams = {k: spec.default for k, spec in cls.hparam_specs(dataset).items()}
    torch.manual_seed(seed)
    return dataset, cls(dataset, hparams)


def _draw_frequencies(name: str, batch_size: int, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Frequencies of the groups and of the classes over `steps` batches of the schedule."""
    dataset, method = _method(name)
    train = dataset.split("train")
    schedule = BatchSchedule(
        len(train),
        batch_size,
        seed=0,
        subset=method.train_subset(train),
        weights=method.train_weights(train),
    )
    drawn = torch.cat([schedule.indices(step) for step in range(steps)])
    groups = torch.bincount(train.g[drawn], minlength=4).double() / len(drawn)
    classes = torch.bincount(train.y[drawn], minlength=2).double() / len(drawn)
    return groups, classes


def test_balanced_subset_keeps_the_smallest_count_of_every_value() -> None:
    labels = torch.tensor([0] * 7 + [1] * 3 + [3] * 5)  # value 2 is absent
    subset = balanced_subset(labels, 4, torch.Generator().manual_seed(0))
    assert torch.bincount(labels[subset], minlength=4).tolist() == [3, 3, 0, 3]
    assert len(torch.unique(subset)) == len(subset)  # drawn without replacement


def test_training_data_is_imbalanced() -> None:
    train = DATASETS.get("synthetic")(**DATA).split("train")
    counts = torch.bincount(train.g, minlength=4)
    assert counts.max() > 5 * counts.min()


@pytest.mark.parametrize("name", ["subg", "suby"])
def test_subsampling_gives_equal_counts_and_frequencies(name: str) -> None:
    dataset, method = _method(name)
    train = dataset.split("train")
    labels, n = (train.g, 4) if name == "subg" else (train.y, 2)
    counts = torch.bincount(labels[method.train_subset(train)], minlength=n)
    assert counts.min() == counts.max() == torch.bincount(labels, minlength=n).min()
    # One epoch of batches of the subset's size sees every kept example once.
    groups, classes = _draw_frequencies(name, batch_size=len(method.subset), steps=10)
    expected = torch.full((n,), 1.0 / n, dtype=torch.double)
    torch.testing.assert_close(groups if name == "subg" else classes, expected)


@pytest.mark.parametrize("name", ["rwg", "rwy"])
def test_reweighting_gives_balanced_frequencies_over_many_draws(name: str) -> None:
    groups, classes = _draw_frequencies(name, batch_size=64, steps=400)  # 25 600 draws
    n = 4 if name == "rwg" else 2
    frequencies = groups if name == "rwg" else classes
    torch.testing.assert_close(
        frequencies, torch.full((n,), 1.0 / n, dtype=torch.double), atol=0.015, rtol=0
    )
    if name == "rwy":  # class balance keeps the spurious correlation inside each class
        assert groups.min() < 0.1


def test_subset_is_reproducible_under_the_seed() -> None:
    first, second, other = _method("subg", 0)[1], _method("subg", 0)[1], _method("subg", 1)[1]
    assert torch.equal(first.subset, second.subset)
    assert not torch.equal(first.subset, other.subset)
    assert "subset" in first.state_dict()  # checkpointed with the run


def test_subg_and_rwy_run_end_to_end(workdir) -> None:
    assert run_tiny(workdir, "subg").regime == "full"
    assert run_tiny(workdir, "rwy").regime == "val-only"


@pytest.mark.parametrize("name", ["subg", "rwg"])
def test_group_balancing_is_refused_without_training_groups(workdir, name: str) -> None:
    with pytest.raises(UserError, match=r"needs training group labels.*can run in: full"):
        run_tiny(workdir, name, regime="val-only")
