"""The synthetic dataset of the MAT paper's Figure 1 follows its specification."""

from __future__ import annotations

import pytest
import torch

from robustbench_mat.datasets.synthetic import Synthetic
from robustbench_mat.errors import UserError

SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def default():
    dataset = Synthetic()
    for split in SPLITS:
        dataset.split(split)
    return dataset


def test_shapes_and_label_types(default):
    for split in SPLITS:
        part = default.split(split)
        assert part.inputs.shape == (1000, 1800)
        assert part.inputs.dtype == torch.float32
        assert part.y.shape == part.a.shape == (1000,)
        assert set(part.y.tolist()) == {0, 1}
        assert set(part.a.tolist()) == {0, 1}


def test_custom_size():
    part = Synthetic(n=37, dim=5).split("val")
    assert part.inputs.shape == (37, 5)
    assert len(part) == 37


# int((1 - 0.9) * 1000) is 99, not 100: (1 - 0.9) * 1000 is 99.999... in floating point.
@pytest.mark.parametrize(("split", "agreeing"), [("train", 901), ("val", 500), ("test", 500)])
def test_attribute_agrees_with_the_label_on_exactly_the_majority(default, split, agreeing):
    part = default.split(split)
    assert int((part.a == part.y).sum()) == agreeing


def test_majority_parameters_set_the_exact_flip_count():
    dataset = Synthetic(n=200, dim=4, majority=0.75, eval_majority=0.6)
    train, test = dataset.split("train"), dataset.split("test")
    assert int((train.a == train.y).sum()) == 150
    assert int((test.a == test.y).sum()) == 120


def test_all_four_groups_are_present_in_train(default):
    counts = torch.bincount(default.split("train").g, minlength=4)
    assert counts.sum() == 1000
    assert (counts > 20).all()
    minority = counts[1] + counts[2]  # y0/a1 and y1/a0
    assert minority == 99


def test_attribute_is_the_class_the_spurious_feature_points_to(default):
    for split in SPLITS:
        part = default.split(split)
        spurious = part.inputs[:, 1]
        assert torch.equal(part.a, (spurious < 0).long())


def test_spurious_column_is_five_times_a_core_like_feature(default):
    for split in SPLITS:
        x = default.split(split).inputs
        scaled = x[:, 1] / 5
        assert scaled.abs().mean().item() == pytest.approx(1.0, abs=0.02)
        assert scaled.abs().std().item() == pytest.approx(0.12, abs=0.02)
        # The core feature has the same magnitude distribution, unscaled.
        assert x[:, 0].abs().mean().item() == pytest.approx(1.0, abs=0.02)
        assert x[:, 0].abs().std().item() == pytest.approx(0.12, abs=0.02)


def test_spurious_scale_parameter():
    x = Synthetic(n=500, dim=3, spurious_scale=2.0).split("train").inputs
    assert (x[:, 1] / 2).abs().mean().item() == pytest.approx(1.0, abs=0.03)


def test_class_one_core_feature_is_near_minus_one(default):
    for split in SPLITS:
        part = default.split(split)
        core = part.inputs[:, 0]
        assert core[part.y == 1].mean().item() == pytest.approx(-1.0, abs=0.02)
        assert core[part.y == 0].mean().item() == pytest.approx(1.0, abs=0.02)
        # The core feature alone classifies perfectly.
        assert torch.equal((core < 0).long(), part.y)


def test_noise_columns_have_the_requested_std(default):
    noise = default.split("train").inputs[:, 2:]
    assert noise.shape == (1000, 1798)
    assert noise.std().item() == pytest.approx(0.5, abs=0.005)
    assert noise.mean().item() == pytest.approx(0.0, abs=0.005)
    # Per column too (1000 draws each).
    assert noise.std(0).min().item() > 0.4 and noise.std(0).max().item() < 0.6

    louder = Synthetic(n=300, dim=50, noise_std=2.0).split("val").inputs[:, 2:]
    assert louder.std().item() == pytest.approx(2.0, abs=0.05)


def test_zero_noise_gives_zero_noise_columns():
    x = Synthetic(noise_std=0).split("train").inputs
    assert x.shape == (1000, 1800)
    assert torch.count_nonzero(x[:, 2:]) == 0
    assert torch.count_nonzero(x[:, :2]) == 2000


def test_same_seed_gives_identical_tensors(default):
    again = Synthetic()
    for split in SPLITS:
        first, second = default.split(split), again.split(split)
        assert torch.equal(first.inputs, second.inputs)
        assert torch.equal(first.y, second.y)
        assert torch.equal(first.a, second.a)


def test_different_seed_gives_different_tensors(default):
    other = Synthetic(seed=99)
    for split in SPLITS:
        assert not torch.equal(default.split(split).inputs, other.split(split).inputs)
        assert not torch.equal(default.split(split).y, other.split(split).y)


def test_splits_differ_from_each_other(default):
    train, val, test = (default.split(s).inputs for s in SPLITS)
    assert not torch.equal(train, val)
    assert not torch.equal(val, test)


def test_noise_level_does_not_change_labels_or_features(default):
    quiet = Synthetic(noise_std=0.0)
    for split in SPLITS:
        assert torch.equal(quiet.split(split).y, default.split(split).y)
        assert torch.equal(quiet.split(split).a, default.split(split).a)
        assert torch.equal(quiet.split(split).inputs[:, :2], default.split(split).inputs[:, :2])


def test_model_and_training_defaults():
    dataset = Synthetic()
    model = dataset.build_model()
    assert isinstance(model, torch.nn.Linear)
    assert (model.in_features, model.out_features) == (1800, 2)
    assert model.bias is None
    assert dataset.default_hparams()["lr"] == 1e-2
    assert Synthetic(noise_std=0).default_hparams()["lr"] == 3e-2
    assert dataset.default_hparams()["batch_size"] == 0  # full batch
    assert dataset.group_names() == ["y0/a0", "y0/a1", "y1/a0", "y1/a1"]


@pytest.mark.parametrize("params", [{"dim": 1}, {"n": 0}])
def test_invalid_sizes_are_user_errors(params):
    with pytest.raises(UserError, match="dim >= 2 and n >= 1"):
        Synthetic(**params).split("train")


# The authors' generator, `problem_1` in interpretable_experiment.py of
# facebookresearch/Pitfalls-of-Memorization, re-typed from a reading of it: the global RNG is
# reseeded per split and draws, in this order, the labels, the core feature, the spurious
# feature, the permutation whose head is flipped, and the noise.
AUTHORS_SPLIT = {"train": "tr", "val": "va", "test": "te"}


def authors_problem_1(seed: int, part: str, noise_std: float):
    count, width = 1000, 1800
    agree = {"tr": 0.9, "va": 0.5, "te": 0.5}[part]
    torch.manual_seed(seed + {"tr": 0, "va": 1, "te": 2}[part])
    labels = torch.zeros(count, 1).bernoulli_(0.5)
    direction = 2 * labels - 1
    core = direction * (torch.randn(count, 1) * 0.12 - 1)
    spurious = direction * (torch.randn(count, 1) * 0.12 - 1)
    flip = torch.randperm(count)[: int(count * (1 - agree))]
    spurious[flip] = -spurious[flip]
    noise = noise_std * torch.randn(count, width - 2)
    inputs = torch.cat([core, 5 * spurious, noise], dim=1)
    majority = (inputs[:, 0] * inputs[:, 1] > 0).long()
    return inputs, labels[:, 0].long(), majority


@pytest.mark.parametrize("seed", [1234, 2345])
def test_every_split_is_the_authors_tensors_bit_for_bit(seed):
    dataset = Synthetic(seed=seed)
    for split in SPLITS:
        with torch.random.fork_rng(devices=[]):
            inputs, labels, majority = authors_problem_1(seed, AUTHORS_SPLIT[split], 0.5)
        part = dataset.split(split)
        assert torch.equal(part.inputs, inputs)
        assert torch.equal(part.y, labels)
        assert torch.equal((part.a == part.y).long(), majority)
    assert int((dataset.split("train").a != dataset.split("train").y).sum()) == 99


# Computed once from the authors' generator (torch 2.14, CPU); float32 values written exactly.
FIRST_ROWS = {
    (1234, "train"): (
        [1, 1, 1, 1, 1, 1, 1, 1],
        [
            [-1.0186136960983276, -5.198358535766602, 0.4735213816165924],
            [-1.1011658906936646, -5.538715362548828, 1.154179334640503],
        ],
    ),
    (1234, "val"): (
        [1, 0, 1, 1, 1, 1, 1, 0],
        [
            [-0.787147581577301, -5.104227066040039, -0.1681237369775772],
            [1.0928025245666504, 4.429895401000977, 0.40445244312286377],
        ],
    ),
    (2345, "train"): (
        [0, 1, 1, 0, 1, 1, 0, 1],
        [
            [0.983738124370575, 6.286942958831787, 0.05877114459872246],
            [-1.1173040866851807, -6.25480842590332, -0.47557491064071655],
        ],
    ),
    (2345, "val"): (
        [0, 1, 1, 1, 0, 1, 0, 1],
        [
            [1.0247119665145874, -4.692990779876709, -0.9973209500312805],
            [-1.144200325012207, 3.6997272968292236, -0.5363377332687378],
        ],
    ),
}


@pytest.mark.parametrize(("seed", "split"), sorted(FIRST_ROWS))
def test_first_rows_are_pinned(seed, split):
    labels, rows = FIRST_ROWS[seed, split]
    part = Synthetic(seed=seed).split(split)
    assert part.y[:8].tolist() == labels
    assert torch.equal(part.inputs[:2, :3], torch.tensor(rows, dtype=torch.float32))


def test_building_the_data_leaves_the_global_rng_alone():
    torch.manual_seed(7)
    expected = torch.rand(5)
    torch.manual_seed(7)
    dataset = Synthetic(seed=1234, n=50, dim=10)
    for split in SPLITS:
        dataset.split(split)
    assert torch.equal(torch.rand(5), expected)


@pytest.mark.parametrize("seed", [1234, 2345])
def test_authors_init_continues_their_stream_after_the_va_split(seed):
    with torch.random.fork_rng(devices=[]):
        authors_problem_1(seed, "va", 0.5)  # their script builds its networks right after
        first, second = (torch.nn.Linear(1800, 2, bias=False).weight for _ in range(2))
        # Their noise is drawn even at noise_std 0, so the noise level does not move the stream.
        torch.set_rng_state(Synthetic(seed=seed, noise_std=0.0, init="authors").model_rng_state())
        dataset = Synthetic(seed=seed)
        ours = [dataset.build_model().weight for _ in range(2)]
    assert torch.equal(ours[0], first) and torch.equal(ours[1], second)
    assert Synthetic(seed=seed).model_rng_state() is None  # default: the run seed's weights
