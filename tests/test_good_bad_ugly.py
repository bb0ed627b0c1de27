"""The good-bad-ugly dataset of the MAT paper's Figure 3 is the authors' data, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from robustbench_mat.datasets.good_bad_ugly import GoodBadUgly


# The authors' generator, `get_data(seed, 'tr', ...)` in good_bad_ugly_memorization.py of
# facebookresearch/Pitfalls-of-Memorization, re-typed from a reading of it: the global RNG is
# reseeded, the sweep's f is computed whole, the training rows' extra features are drawn and
# then the label noise.
def authors_get_data(seed: int, feature_std: float):
    points, chosen_count, extra, label_std = 1000, 20, 30, 0.08
    torch.manual_seed(seed)
    grid = torch.linspace(-1.5, 1.5, points)[:, None]
    target = torch.tanh(grid) + 0.5 * torch.tanh(-5 * grid)
    sweep = torch.cat([grid, torch.zeros(points, extra)], dim=1)
    rows = np.linspace(0, points - 1, chosen_count).astype(int)
    sweep[rows, 1:] = feature_std * torch.randn(chosen_count, extra)
    labels = target[rows] + label_std * torch.randn(chosen_count, 1)
    return sweep[rows], labels[:, 0], sweep, target[:, 0], rows


@pytest.mark.parametrize("seed", [123, 4567])
@pytest.mark.parametrize("feature_std", [1e-4, 1e-3, 0.0])
def test_splits_are_the_authors_tensors_bit_for_bit(seed, feature_std):
    with torch.random.fork_rng(devices=[]):
        inputs, labels, sweep, target, rows = authors_get_data(seed, feature_std)
    dataset = GoodBadUgly(seed=seed, feature_std=feature_std)
    train = dataset.split("train")
    assert torch.equal(train.inputs, inputs)
    assert torch.equal(train.y, labels)
    unseen = np.ones(len(sweep), dtype=bool)
    unseen[rows] = False
    for split in ("val", "test"):
        part = dataset.split(split)
        assert torch.equal(part.inputs, sweep[unseen])  # their extra features are 0
        assert torch.equal(part.y, target[unseen])


def test_first_training_rows_are_pinned():
    # Computed once from the authors' generator (seed 123, torch 2.14, CPU).
    train = GoodBadUgly().split("train")
    assert GoodBadUgly().sweep()[1][:5].tolist() == [0, 52, 105, 157, 210]
    assert train.y[:3].tolist() == [-0.4557073712348938, -0.2867369055747986, -0.26648712158203125]
    assert train.inputs[0, :3].tolist() == [-1.5, 3.373701838427223e-05, -1.7777721950551495e-05]
    assert train.inputs[1, :3].tolist() == [
        -1.3438438177108765,
        -6.315053178695962e-05,
        -0.0002839993976522237,
    ]


def test_building_the_data_leaves_the_global_rng_alone():
    torch.manual_seed(7)
    expected = torch.rand(5)
    torch.manual_seed(7)
    dataset = GoodBadUgly()
    for split in ("train", "val", "test"):
        dataset.split(split)
    assert torch.equal(torch.rand(5), expected)
