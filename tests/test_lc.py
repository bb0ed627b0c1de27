"""LC's logit correction is log p̂(y | â) from the biased network's running estimates."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import run_tiny
from torch import nn

from robustbench_mat.data import BenchmarkDataset, SplitArrays
from robustbench_mat.method import Batch
from robustbench_mat.methods.lc import LC, conditional_prior, logit_correction
from robustbench_mat.methods.lff import generalized_cross_entropy
from robustbench_mat.registry import DATASETS, METHODS
from robustbench_mat.training import LoopSettings, train


def _lc(dataset=None, **overrides):
    dataset = dataset or DATASETS.get("synthetic")(n=40, dim=4)
    hparams = {k: spec.default for k, spec in LC.hparam_specs(dataset).items()}
    hparams.update(overrides)
    torch.manual_seed(0)
    return dataset, LC(dataset, hparams)


def _batch(dataset, idx: torch.Tensor, y: list[int]) -> Batch:
    x = dataset.split("train").inputs[idx]
    return Batch(idx, x, torch.tensor(y), None, 2)


# Five examples: y = [0, 0, 1, 1, 0]; biased softmax rows (τ = 1) below, so â = [0, 1, 0, 1, 0]
# and the probabilities of the true label are [.8, .3, .4, .9, .6]. Cell (0, 0) holds examples
# 0 and 4 (in that order), the other cells one example each.
PROBS = torch.tensor([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.1, 0.9], [0.6, 0.4]])
LABELS = [0, 0, 1, 1, 0]


def _first_batch(method, dataset):
    batch = _batch(dataset, torch.arange(5), LABELS)
    shift, attr = method.correction(batch, PROBS.log())
    assert attr.tolist() == [0, 1, 0, 1, 0]
    return shift


def test_defaults_are_the_authors() -> None:
    _, method = _lc(DATASETS.get("colored-digits")())
    hp = method.hp
    assert (hp["q"], hp["temperature"], hp["gce_weight"]) == (0.7, 1.0, 1.0)
    assert (hp["estimator"], hp["ema"], hp["attribute_ema"]) == ("mv", 0.995, 0.0)
    assert hp["group_mixup"] is True and hp["mixup_rampup"] == 0.0
    assert hp["biased_lr_scale"] == 0.1
    assert method.mixup_strength() == 0.5  # no ramp: λ ~ U(0, 0.5) from the first step
    # On synthetic GroupMixUp reverses the spurious feature: off, by validation WGA.
    synthetic = DATASETS.get("synthetic")(n=40, dim=4)
    assert LC.hparam_specs(synthetic)["group_mixup"].default is False


def test_mv_moves_each_cell_example_by_example() -> None:
    dataset, method = _lc(ema=0.5)
    shift = _first_batch(method, dataset)
    # (0,0): set to .8 by example 0, then .5 * .8 + .5 * .6 = .7; the others set on first sight.
    torch.testing.assert_close(method.prior_matrix, torch.tensor([[0.7, 0.3], [0.4, 0.9]]))
    col0, col1 = [0.7 / 1.1, 0.4 / 1.1], [0.25, 0.75]
    expected = torch.tensor([col0, col1, col0, col1, col0]).add(1e-4).log()
    torch.testing.assert_close(shift, expected)
    # Example 0 again with p_y = .9: (0,0) -> .5 * .7 + .5 * .9 = .8; absent cells stay.
    method.correction(_batch(dataset, torch.tensor([0]), [0]), torch.tensor([[0.9, 0.1]]).log())
    torch.testing.assert_close(method.prior_matrix, torch.tensor([[0.8, 0.3], [0.4, 0.9]]))


def test_mv_batch_moves_every_cell_towards_the_batch_means() -> None:
    dataset, method = _lc(estimator="mv_batch", ema=0.5)
    _first_batch(method, dataset)
    # Means S / (n + 1e-4): (0,0) 1.4 / 2.0001, others p / 1.0001; M starts at 0, α = .5.
    means = torch.tensor([[1.4 / 2.0001, 0.3 / 1.0001], [0.4 / 1.0001, 0.9 / 1.0001]])
    torch.testing.assert_close(method.prior_matrix, 0.5 * means)
    # Example 0 alone (p_y = .9): (0,0) -> .5 * M + .5 * .9 / 1.0001; absent cells halve.
    method.correction(_batch(dataset, torch.tensor([0]), [0]), torch.tensor([[0.9, 0.1]]).log())
    expected = 0.25 * means
    expected[0, 0] = 0.25 * means[0, 0] + 0.5 * 0.9 / 1.0001
    torch.testing.assert_close(method.prior_matrix, expected)


def test_batch_estimator_keeps_only_the_batch_means() -> None:
    dataset, method = _lc(estimator="batch", ema=0.5)
    shift = _first_batch(method, dataset)
    means = torch.tensor([[1.4 / 2.0001, 0.3 / 1.0001], [0.4 / 1.0001, 0.9 / 1.0001]])
    torch.testing.assert_close(method.prior_matrix, means)
    col0 = (means[:, 0] / means[:, 0].sum()).add(1e-4).log()
    torch.testing.assert_close(shift[0], col0)
    method.correction(_batch(dataset, torch.tensor([0]), [0]), torch.tensor([[0.9, 0.1]]).log())
    torch.testing.assert_close(method.prior_matrix, torch.tensor([[0.9 / 1.0001, 0], [0, 0]]))


def test_pseudo_attribute_is_the_current_softmax_without_ema() -> None:
    dataset, method = _lc()
    batch = _batch(dataset, torch.tensor([3]), [0])
    method.correction(batch, torch.tensor([[2.0, 0.0]]))
    _, attr = method.correction(batch, torch.tensor([[0.0, 1.0]]))
    assert attr.tolist() == [1]  # an EMA of [.88, .12] and [.27, .73] would keep â = 0
    torch.testing.assert_close(method.biased_softmax[3], F.softmax(torch.tensor([0.0, 1.0]), 0))


def test_attribute_ema_option_averages_the_softmax() -> None:
    dataset, method = _lc(attribute_ema=0.5)
    batch = _batch(dataset, torch.tensor([3]), [0])
    method.correction(batch, torch.tensor([[0.8, 0.2]]).log())
    method.correction(batch, torch.tensor([[0.4, 0.6]]).log())
    torch.testing.assert_close(method.biased_softmax[3], torch.tensor([0.6, 0.4]))


def test_temperature_sharpens_the_pseudo_attribute_softmax() -> None:
    dataset, method = _lc(temperature=0.5)
    logits = torch.tensor([[1.0, 0.0]])
    method.correction(_batch(dataset, torch.tensor([5]), [0]), logits)
    torch.testing.assert_close(method.biased_softmax[5], F.softmax(logits[0] / 0.5, 0))


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_biased_network_learns_at_a_tenth_of_the_learning_rate(optimizer) -> None:
    _, method = _lc(lr=0.02, optimizer=optimizer)
    groups = method.configure_optimizer().param_groups
    networks = {
        id(p): name for name in ("target", "biased") for p in method.model[name].parameters()
    }
    lrs = {(networks[id(p)], round(g["lr"], 12)) for g in groups for p in g["params"]}
    assert lrs == {("target", 0.02), ("biased", 0.002)}  # 0.1 x lr
    assert sum(len(g["params"]) for g in groups) == len(networks)


def test_correction_is_added_in_training_only() -> None:
    dataset, method = _lc(group_mixup=False)
    train_split = dataset.split("train")
    batch = Batch(torch.arange(len(train_split)), train_split.inputs, train_split.y, None, 2)
    with torch.no_grad():
        biased = method.model["biased"](train_split.inputs)
    _, other = _lc(group_mixup=False)
    shift, _ = other.correction(batch, biased)
    with torch.no_grad():
        target = method.model["target"](train_split.inputs)
        expected = (
            F.cross_entropy(target + shift, train_split.y)
            + generalized_cross_entropy(biased, train_split.y, 0.7).mean()
        )
    torch.testing.assert_close(method.loss(batch), expected)
    x = dataset.split("test").inputs
    torch.testing.assert_close(method.predict(x), method.model["target"](x))
    torch.testing.assert_close(logit_correction(torch.tensor([0.5])), torch.tensor([0.5001]).log())
    matrix = torch.tensor([[0.8, 0.3], [0.4, 0.9]])
    prior = conditional_prior(matrix, torch.tensor([0, 1]))
    torch.testing.assert_close(prior, torch.tensor([[2 / 3, 1 / 3], [0.25, 0.75]]))


def test_group_mixup_pairs_each_example_with_a_same_class_pseudo_minority() -> None:
    _, method = _lc()
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    attr = torch.tensor([0, 1, 0, 1, 1, 1])  # class 0's only minority is 1; class 1 has none
    partner = method.mixup_partners(y, attr)
    assert partner[:3].tolist() == [1, 1, 1]
    assert sorted(partner[3:].tolist()) == [3, 4, 5]  # a permutation of its class


class _BagOfWords(nn.Module):
    """Token ids [batch, length, 3] -> mean embedding -> linear; refuses float inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 4)
        self.head = nn.Linear(4, 2)
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert not torch.is_floating_point(x), "token ids must not be mixed"
        self.seen.append(x)
        return self.head(self.embed(x[..., 0]).mean(1))


class _Tokens(BenchmarkDataset):
    name = "lc-test-tokens"
    n_classes, n_attributes = 2, 2
    class_names, attribute_names = ("y0", "y1"), ("a0", "a1")
    hparam_family = "text"

    def load_split(self, split: str) -> SplitArrays:
        ids = torch.randint(1, 50, (8, 5, 1), generator=torch.Generator().manual_seed(0))
        x = torch.cat([ids, torch.ones_like(ids), torch.zeros_like(ids)], dim=-1)
        y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
        return SplitArrays(x, y, y.clone())

    def build_model(self) -> nn.Module:
        return _BagOfWords()


def test_group_mixup_on_token_ids_mixes_the_features_not_the_ids() -> None:
    dataset = _Tokens()
    _, method = _lc(dataset)
    _, twin = _lc(dataset)
    x = dataset.split("train").inputs
    batch = Batch(torch.arange(8), x, dataset.split("train").y, None, 2)
    torch.manual_seed(1)
    loss = method.loss(batch)
    seen = method.model["target"].seen  # the ids reached the network unchanged (check: 2 rows)
    assert seen and all(torch.equal(ids, x[: len(ids)]) for ids in seen)

    torch.manual_seed(1)
    with torch.no_grad():
        biased = twin.model["biased"](x)
        shift, attr = twin.correction(batch, biased)
        lam = 0.5 * torch.rand(()).item()  # t = 0.5: λ ~ U(0, 0.5)
        partner = twin.mixup_partners(batch.y, attr)
        target = twin.model["target"]
        features = target.embed(x[..., 0]).mean(1)
        mixed = lam * features + (1 - lam) * features[partner]
        logits = target.head(mixed) + lam * shift + (1 - lam) * shift[partner]
        expected = F.cross_entropy(logits, batch.y)
        expected = expected + generalized_cross_entropy(biased, batch.y, 0.7).mean()
    torch.testing.assert_close(loss, expected)


def _test_wga(method_name: str, dataset, **overrides) -> float:
    method_class = METHODS.get(method_name)
    hparams = {k: spec.default for k, spec in method_class.hparam_specs(dataset).items()}
    hparams.update(overrides)
    torch.manual_seed(0)
    method = method_class(dataset, hparams)
    settings = LoopSettings(
        steps=300,
        eval_every=20,
        seed=0,
        device=torch.device("cpu"),
        criterion="val_wga",
        train_groups_visible=False,
        show_progress=False,
    )
    method.total_steps = settings.steps
    return train(method, dataset, settings).selected["test_wga"]


def test_lc_beats_erm_worst_group_accuracy_on_synthetic() -> None:
    dataset = DATASETS.get("synthetic")(n=400, dim=200)
    erm, lc = _test_wga("erm", dataset), _test_wga("lc", dataset)
    print(f"test WGA: lc {lc:.3f}, erm {erm:.3f}")
    assert lc > erm + 0.2, (lc, erm)


@pytest.mark.parametrize("mixup", [False, True])
def test_lc_runs_end_to_end(workdir, mixup: bool) -> None:
    run_tiny(workdir, "lc", hparams={"group_mixup": mixup})
