"""MAT's shift equals the calibrated log-probability of the held-out model (hand-computed)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from robustbench_mat.group_inference import InferredGroups
from robustbench_mat.method import Batch
from robustbench_mat.methods.mat import MAT, calibrated_log_prior
from robustbench_mat.registry import DATASETS, METHODS
from robustbench_mat.training import LoopSettings, train

EPS = 1e-6


def _logits(probabilities: list[list[float]]) -> torch.Tensor:
    """Held-out logits whose softmax at temperature 1 is `probabilities`."""
    return torch.tensor(probabilities).log()


def test_shift_matches_hand_computed_two_class_example() -> None:
    # P = softmax(H): rows are examples, columns the held-out prediction y_ho.
    heldout = _logits([[0.8, 0.2], [0.2, 0.8], [0.5, 0.5], [0.8, 0.2]])
    y = torch.tensor([0, 1, 1, 0])
    # J[y_ho, y] = sum_{i: y_i = y} P[i, y_ho] / 4 = [[0.4, 0.175], [0.1, 0.325]]
    # p(y | y_ho) = rows of J normalised: [16/23, 7/23] and [4/17, 13/17]
    # p̂(y | x_i) = P[i] @ p(y | y_ho)
    row0, row1 = [16 / 23, 7 / 23], [4 / 17, 13 / 17]
    expected = [
        [0.8 * row0[0] + 0.2 * row1[0], 0.8 * row0[1] + 0.2 * row1[1]],  # 0.603581, 0.396419
        [0.2 * row0[0] + 0.8 * row1[0], 0.2 * row0[1] + 0.8 * row1[1]],  # 0.327365, 0.672635
        [0.5 * row0[0] + 0.5 * row1[0], 0.5 * row0[1] + 0.5 * row1[1]],  # 0.465473, 0.534527
        [0.8 * row0[0] + 0.2 * row1[0], 0.8 * row0[1] + 0.2 * row1[1]],
    ]
    assert expected[0][0] == pytest.approx(0.603581, abs=1e-6)
    shift = calibrated_log_prior(heldout, y, n_classes=2, temperature=1.0)
    torch.testing.assert_close(shift, torch.tensor(expected).add(EPS).log())


def test_temperature_sharpens_the_held_out_softmax() -> None:
    heldout = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 1])
    hot = calibrated_log_prior(heldout, y, 2, temperature=0.01)
    # At temperature 0.01 the held-out predictions are one-hot and right: p̂ = one-hot labels.
    torch.testing.assert_close(hot.exp(), torch.eye(2) + EPS, atol=1e-5, rtol=0)
    soft = calibrated_log_prior(heldout, y, 2, temperature=1.0)
    assert soft.exp()[0, 0] < hot.exp()[0, 0]


def test_shift_with_a_class_missing_from_the_batch_keeps_all_columns() -> None:
    heldout = _logits([[0.8, 0.2], [0.2, 0.8]])
    y = torch.tensor([0, 0])
    # J = [[0.5, 0], [0.5, 0]] -> p(y | y_ho) = [1, 0] for both rows -> p̂ = [1, 0].
    shift = calibrated_log_prior(heldout, y, 2, 1.0)
    assert shift.shape == (2, 2)
    torch.testing.assert_close(shift, torch.tensor([[1.0, 0.0], [1.0, 0.0]]).add(EPS).log())
    assert shift[0, 1].item() == pytest.approx(math.log(EPS))


def test_three_class_shift_with_a_missing_class() -> None:
    heldout = _logits([[0.6, 0.3, 0.1], [0.1, 0.2, 0.7]])
    y = torch.tensor([0, 2])
    # J[:, 0] = P[0] / 2 = [.3, .15, .05]; J[:, 1] = 0; J[:, 2] = P[1] / 2 = [.05, .1, .35]
    # p(y | y_ho) rows: [6/7, 0, 1/7], [3/5, 0, 2/5], [1/8, 0, 7/8]
    rows = torch.tensor([[6 / 7, 0, 1 / 7], [3 / 5, 0, 2 / 5], [1 / 8, 0, 7 / 8]])
    expected = torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.2, 0.7]]) @ rows
    torch.testing.assert_close(
        expected[0], torch.tensor([0.706786, 0.0, 0.293214]), atol=1e-6, rtol=0
    )
    shift = calibrated_log_prior(heldout, y, 3, 1.0)
    assert shift.shape == (2, 3)
    torch.testing.assert_close(shift, (expected + EPS).log())


def _small_mat(calibration: str, heldout: torch.Tensor | None = None):
    dataset = DATASETS.get("synthetic")(n=40, dim=6)
    y = dataset.split("train").y
    if heldout is None:
        heldout = torch.randn(len(y), 2, generator=torch.Generator().manual_seed(0))
    hparams = {name: spec.default for name, spec in MAT.hparam_specs(dataset).items()}
    hparams.update(calibration=calibration, temperature=0.5)
    torch.manual_seed(0)
    method = MAT(dataset, hparams)
    inferred = InferredGroups(
        "xrm-infer",
        dataset.name,
        dataset.fingerprint(),
        0,
        {},
        heldout,
        torch.zeros_like(y),
        torch.zeros_like(dataset.split("val").y),
    )
    method.prepare(SimpleNamespace(inferred=inferred))
    return dataset, method, heldout, y


@pytest.mark.parametrize("calibration", ["batch", "global"])
def test_mat_shift_per_calibration_mode(calibration: str) -> None:
    dataset, method, heldout, y = _small_mat(calibration)
    x = dataset.split("train").inputs
    idx = torch.tensor([3, 17, 5, 30, 2])
    batch = Batch(idx, x[idx], y[idx], None, 2)
    if calibration == "batch":
        expected = calibrated_log_prior(heldout[idx], y[idx], 2, 0.5)
    else:
        expected = calibrated_log_prior(heldout, y, 2, 0.5)[idx]
    torch.testing.assert_close(method.shift(batch), expected)
    assert not method.shift(batch).requires_grad
    loss = F.cross_entropy(method.model(x[idx]) + expected, y[idx])
    torch.testing.assert_close(method.loss(batch), loss)


def test_full_batch_calibration_is_the_global_one() -> None:
    dataset, batch_mode, heldout, y = _small_mat("batch")
    _, global_mode, _, _ = _small_mat("global", heldout)
    idx = torch.arange(len(y))
    batch = Batch(idx, dataset.split("train").inputs, y, None, 2)
    torch.testing.assert_close(batch_mode.shift(batch), global_mode.shift(batch))


def test_shift_is_not_applied_at_evaluation() -> None:
    dataset, method, _, _ = _small_mat("batch")
    x = dataset.split("test").inputs
    torch.testing.assert_close(method.predict(x), method.model(x))


def test_mat_with_a_uniform_held_out_model_trains_exactly_like_erm() -> None:
    # With constant held-out logits and balanced classes the shift is the same for every class,
    # so softmax (and every gradient) is unchanged: MAT reduces to ERM.
    dataset = DATASETS.get("synthetic")(n=60, dim=6)
    y = dataset.split("train").y
    assert (y == 0).sum() >= 15 and (y == 1).sum() >= 15
    balanced = torch.cat([torch.nonzero(y == 0)[:15, 0], torch.nonzero(y == 1)[:15, 0]])
    uniform = torch.zeros(len(y), 2)

    def trained(method_name: str):
        cls = METHODS.get(method_name)
        hparams = {name: spec.default for name, spec in cls.hparam_specs(dataset).items()}
        torch.manual_seed(0)
        method = cls(dataset, hparams)
        method.train_subset = lambda train: balanced  # full batch of 15 + 15 examples
        if method_name == "mat":
            inferred = InferredGroups(
                "xrm-infer",
                dataset.name,
                "",
                0,
                {},
                uniform,
                torch.zeros_like(y),
                torch.zeros_like(y),
            )
            method.prepare(SimpleNamespace(inferred=inferred))
        settings = LoopSettings(
            steps=30,
            eval_every=30,
            seed=0,
            device=torch.device("cpu"),
            criterion="val_wga",
            train_groups_visible=False,
            show_progress=False,
        )
        train(method, dataset, settings)
        return method.model.weight.detach()

    torch.testing.assert_close(trained("mat"), trained("erm"), rtol=0, atol=1e-6)
