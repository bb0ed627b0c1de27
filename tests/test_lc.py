"""LC's logit correction is log p̂(y | â) from the biased network's running estimates."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import run_tiny

from robustbench_mat.method import Batch
from robustbench_mat.methods.lc import LC, conditional_prior, logit_correction
from robustbench_mat.methods.lff import generalized_cross_entropy
from robustbench_mat.registry import DATASETS


def _lc(**overrides):
    dataset = DATASETS.get("synthetic")(n=40, dim=4)
    hparams = {k: spec.default for k, spec in LC.hparam_specs(dataset).items()}
    hparams.update(overrides)
    torch.manual_seed(0)
    return dataset, LC(dataset, hparams)


def _batch(dataset, idx: torch.Tensor, y: list[int]) -> Batch:
    x = dataset.split("train").inputs[idx]
    return Batch(idx, x, torch.tensor(y), None, 2)


def test_conditional_prior_normalises_the_column_of_the_pseudo_attribute() -> None:
    matrix = torch.tensor([[0.8, 0.3], [0.4, 0.9]])
    prior = conditional_prior(matrix, torch.tensor([0, 1, 1]))
    torch.testing.assert_close(prior, torch.tensor([[2 / 3, 1 / 3], [0.25, 0.75], [0.25, 0.75]]))


def test_correction_equals_the_hand_computed_log_prior() -> None:
    dataset, method = _lc(ema=0.5, temperature=1.0)
    probs = torch.tensor([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.1, 0.9]])
    batch = _batch(dataset, torch.tensor([0, 1, 2, 3]), [0, 0, 1, 1])
    shift, attr = method.correction(batch, probs.log())
    assert attr.tolist() == [0, 1, 0, 1]
    # Cells (y, â): (0,0) p_y = 0.8, (0,1) 0.3, (1,0) 0.4, (1,1) 0.9 -> M = [[.8, .3], [.4, .9]]
    # p̂(y | â=0) = [.8, .4] / 1.2, p̂(y | â=1) = [.3, .9] / 1.2
    col0, col1 = [2 / 3, 1 / 3], [0.25, 0.75]
    expected = torch.tensor([col0, col1, col0, col1]).add(1e-4).log()
    torch.testing.assert_close(shift, expected)

    # Second step on examples 0 and 2: their softmax averages move halfway (α = 0.5) to
    # [0.4, 0.6] -> [0.6, 0.4] and [0.5, 0.5]; both keep â = 0, so cells (0,0) and (1,0) move
    # to 0.5 * 0.8 + 0.5 * 0.6 = 0.7 and 0.5 * 0.4 + 0.5 * 0.5 = 0.45; (0,1), (1,1) stay.
    new = torch.tensor([[0.4, 0.6], [0.4, 0.6]])
    shift, attr = method.correction(_batch(dataset, torch.tensor([0, 2]), [0, 1]), new.log())
    assert attr.tolist() == [0, 0]
    torch.testing.assert_close(method.prior_matrix, torch.tensor([[0.7, 0.3], [0.45, 0.9]]))
    col0 = [0.7 / 1.15, 0.45 / 1.15]
    torch.testing.assert_close(shift, torch.tensor([col0, col0]).add(1e-4).log())
    torch.testing.assert_close(logit_correction(torch.tensor([0.5])), torch.tensor([0.5001]).log())


def test_temperature_sharpens_the_pseudo_attribute_softmax() -> None:
    dataset, method = _lc(temperature=0.5)
    logits = torch.tensor([[1.0, 0.0]])
    method.correction(_batch(dataset, torch.tensor([5]), [0]), logits)
    torch.testing.assert_close(method.biased_softmax[5], F.softmax(logits[0] / 0.5, 0))


def test_correction_is_added_in_training_only() -> None:
    dataset, method = _lc()
    train = dataset.split("train")
    batch = Batch(torch.arange(len(train)), train.inputs, train.y, None, 2)
    with torch.no_grad():
        biased = method.model["biased"](train.inputs)
    _, other = _lc()
    shift, _ = other.correction(batch, biased)
    with torch.no_grad():
        target = method.model["target"](train.inputs)
        expected = (
            F.cross_entropy(target + shift, train.y)
            + generalized_cross_entropy(biased, train.y, 0.7).mean()
        )
    torch.testing.assert_close(method.loss(batch), expected)
    x = dataset.split("test").inputs
    torch.testing.assert_close(method.predict(x), method.model["target"](x))


@pytest.mark.parametrize("mixup", [False, True])
def test_lc_runs_end_to_end(workdir, mixup: bool) -> None:
    run_tiny(workdir, "lc", hparams={"group_mixup": mixup})
