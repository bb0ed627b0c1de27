"""The memorization experiment: Feldman & Zhang's subsampled self-influence estimate and
TracIn's approximation."""

from __future__ import annotations

import math

import mlflow
import pandas as pd
import pytest
import torch
from helpers import registered
from torch import nn

from robustbench_mat.data import BenchmarkDataset, SplitArrays
from robustbench_mat.errors import UserError
from robustbench_mat.experiments.memorization import (
    MIN_MODELS,
    MemorizationSettings,
    run_memorization,
    self_influence,
    squared_gradient_norms,
)
from robustbench_mat.registry import DATASETS, METHODS
from robustbench_mat.runner import random_subset

ORDINARY, COPIES = 24, 6
UNIQUE = ORDINARY  # the training example whose label no other example supports
DUPLICATED = list(range(ORDINARY + 1, ORDINARY + 1 + COPIES))


class KnownAnswers(BenchmarkDataset):
    """Ordinary examples labelled as a shared feature says; one example labelled against it that
    no other example supports; six identical copies of another, labelled against it too. Every
    distinct training example has a private input dimension a model can fit it by."""

    n_classes = 2
    n_attributes = 2
    class_names = ("y0", "y1")
    attribute_names = ("a0", "a1")
    default_steps = 300
    default_eval_every = 100
    dim = 1 + ORDINARY + 2

    def default_hparams(self):
        return {"lr": 0.5, "batch_size": 0, "optimizer": "sgd", "momentum": 0.0}

    def load_split(self, split):
        if split != "train":
            y = torch.tensor([0, 1] * 4)
            x = torch.zeros(8, self.dim)
            x[:, 0] = 0.5 * (2 * y - 1)
            return SplitArrays(x, y, y.clone())
        y = torch.tensor([i % 2 for i in range(ORDINARY)] + [1] * (1 + COPIES))
        x = torch.zeros(len(y), self.dim)
        x[:, 0] = 0.5 * (2 * y - 1)
        x[ORDINARY:, 0] = -0.5  # the shared feature says y0, the label is y1
        private = torch.tensor([*range(ORDINARY), ORDINARY, *[ORDINARY + 1] * COPIES])
        x[torch.arange(len(y)), 1 + private] = 1.0
        return SplitArrays(x, y, (x[:, 0] > 0).long())

    def build_model(self):
        return nn.Linear(self.dim, 2)


@pytest.fixture
def known_answers():
    with registered(DATASETS, "known-answers", KnownAnswers) as name:
        yield name


def test_self_influence_by_hand():
    """Six models, three examples: one right only when trained on (score 1), one always right
    (score 0), one held in by too few models (no score)."""
    held_in = torch.tensor(
        [[1, 1, 1], [1, 0, 1], [1, 1, 0], [0, 0, 0], [0, 1, 0], [0, 0, 0]], dtype=torch.bool
    )
    correct = torch.tensor(
        [[1, 1, 1], [1, 1, 1], [1, 1, 0], [0, 1, 0], [0, 1, 1], [0, 1, 0]], dtype=torch.bool
    )
    p_true = torch.tensor(
        [
            [0.9, 0.8, 0.7],
            [0.7, 0.8, 0.7],
            [0.8, 0.8, 0.1],
            [0.2, 0.8, 0.1],
            [0.4, 0.8, 0.6],
            [0.0, 0.8, 0.1],
        ]
    )
    scores = self_influence(correct, p_true, held_in)
    assert scores["n_in"].tolist() == [3, 3, 2]
    assert scores["n_out"].tolist() == [3, 3, 4]
    assert scores["score"][0].item() == pytest.approx(1.0)
    assert scores["soft_score"][0].item() == pytest.approx(0.8 - 0.2)
    assert scores["score"][1].item() == pytest.approx(0.0)
    assert scores["soft_score"][1].item() == pytest.approx(0.0)
    assert math.isnan(scores["score"][2].item()) and MIN_MODELS == 3


def test_unique_example_is_memorized_and_duplicated_one_is_not(tmp_path, known_answers):
    """Feldman & Zhang's two reference cases: a model gets the example with the unsupported label
    right only when it trained on it (score 1); the six copies are right whenever one of the
    other five copies was trained on, so leaving one out changes nothing (score 0)."""
    settings = _settings(dataset=known_answers, models=16, steps=None, data_params={})
    _, out = run_memorization(settings, tmp_path)
    scores = pd.read_csv(out / "scores.csv").set_index("index")["score"]
    assert scores[UNIQUE] >= 0.9
    assert all(scores[i] <= 0.1 for i in DUPLICATED)
    assert scores[list(range(ORDINARY))].mean() <= 0.2


def test_tracin_ranks_the_unique_example_first_and_the_copies_low(tmp_path, known_answers):
    settings = _settings(dataset=known_answers, steps=None, data_params={}, models=None)
    settings.estimator = "tracin"
    table, out = run_memorization(settings, tmp_path)
    assert out == tmp_path / "experiments" / "memorization" / known_answers / "tracin"
    scores = pd.read_csv(out / "scores.csv").set_index("index")
    assert (scores["n_in"] == 1).all() and (scores["n_out"] == 0).all()
    assert scores["soft_score"].isna().all()
    assert scores["score"].idxmax() == UNIQUE
    assert all(scores["score"][i] < 0.2 * scores["score"][UNIQUE] for i in DUPLICATED)
    assert "No subsampled estimate to compare with" in table


def test_squared_gradient_norms_of_a_linear_head_by_hand(known_answers):
    """For logits Wx + b and cross-entropy, grad_W = (p - e_y) x^T and grad_b = p - e_y, so
    ||grad||^2 = ||p - e_y||^2 (||x||^2 + 1)."""
    dataset = DATASETS.get(known_answers)()
    method = METHODS.get("erm")(dataset, {})
    with torch.no_grad():
        for parameter in method.parameters():  # away from the zero-gradient start
            parameter.normal_()
    method.eval()
    train = dataset.split("train")
    with torch.no_grad():
        logits = method.predict(train.inputs)
    residual = torch.softmax(logits, 1) - nn.functional.one_hot(train.y, 2)
    expected = residual.pow(2).sum(1) * (train.inputs.pow(2).sum(1) + 1)
    norms = squared_gradient_norms(method, train, dataset.loss, torch.device("cpu"))
    assert norms.dtype == torch.float64
    assert torch.allclose(norms, expected.double(), rtol=1e-5)


def test_tracin_sums_the_learning_rate_times_the_norms_over_the_snapshots(tmp_path):
    settings = _settings(steps=40, models=None, checkpoints=4)
    settings.estimator = "tracin"
    _, out = run_memorization(settings, tmp_path)
    [run_dir] = (tmp_path / "runs").iterdir()
    paths = sorted((run_dir / "snapshots").glob("step-*.pt"))
    assert [p.name for p in paths] == [f"step-{s:07d}.pt" for s in (10, 20, 30, 40)]
    dataset = DATASETS.get("synthetic")(n=300, dim=300)
    train = dataset.split("train")
    expected = torch.zeros(len(train), dtype=torch.float64)
    for path in paths:
        snapshot = torch.load(path, weights_only=True)
        assert snapshot["lr"] == 1e-2  # synthetic's constant learning rate
        [weight] = snapshot["method"].values()  # synthetic's linear model has no bias
        p = torch.softmax(train.inputs @ weight.T, 1)
        residual = p - nn.functional.one_hot(train.y, 2)
        norms = residual.pow(2).sum(1) * train.inputs.pow(2).sum(1)
        expected += snapshot["lr"] * norms.double()
    scores = pd.read_csv(out / "scores.csv")["score"]
    assert torch.allclose(torch.tensor(scores.values), expected, rtol=1e-4)


def test_random_subsets_have_the_asked_size_and_differ():
    one, other = random_subset(100, 0.5, 1), random_subset(100, 0.5, 2)
    assert len(one) == len(other) == 50
    assert torch.equal(one, torch.sort(one).values) and len(set(one.tolist())) == 50
    assert not torch.equal(one, other)
    assert torch.equal(one, random_subset(100, 0.5, 1))


def _settings(**overrides) -> MemorizationSettings:
    settings = dict(
        dataset="synthetic",
        methods=["erm"],
        models=6,
        steps=300,
        data_params={"n": 300, "dim": 300},
        device="cpu",
        progress=False,
    )
    settings.update(overrides)
    return MemorizationSettings(**settings)


def test_erm_memorizes_the_minority_only_and_a_second_call_reuses_the_models(tmp_path):
    """ERM fits the minority examples through their noise dimensions: right on them when it
    trained on them, wrong otherwise (score near 1); majority examples are predicted from the
    spurious feature either way (score near 0)."""
    table, out = run_memorization(_settings(), tmp_path)
    scores = pd.read_csv(out / "scores.csv")
    assert list(scores.columns) == [
        "method", "index", "y", "a", "group", "score", "soft_score", "n_in", "n_out"
    ]  # fmt: skip
    assert (scores["n_in"] + scores["n_out"] == 6).all()
    minority = scores[scores["y"] != scores["a"]]
    majority = scores[scores["y"] == scores["a"]]
    assert minority["score"].mean() >= 0.5
    assert majority["score"].mean() <= 0.1
    assert "mean score" in table and (out / "memorization.png").stat().st_size > 0
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(runs) == 6  # one cached run per model

    again, _ = run_memorization(_settings(), tmp_path)
    assert again == table
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == runs

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("experiments")
    [summary, *_] = client.search_runs([experiment.experiment_id])
    assert summary.data.params["estimator"] == "subsample"
    assert summary.data.params["models"] == "6"
    assert summary.data.tags["robustbench.estimator"] == "subsample"
    assert summary.data.tags["robustbench.models"] == "6"
    model_runs = client.search_runs(
        [client.get_experiment_by_name("synthetic").experiment_id],
        "tags.`robustbench.experiment` = 'memorization'",
    )
    assert sorted(r.info.run_name for r in model_runs) == [
        f"memorization erm model {k} (0.5 subset)" for k in range(6)
    ]


def test_too_few_models_is_refused():
    with pytest.raises(UserError, match="--models 4"):
        run_memorization(_settings(models=4), None)


@pytest.mark.slow
def test_mat_memorizes_the_minority_less_than_erm(tmp_path):
    """The paper's claim on the synthetic task, with 16 models per method."""
    settings = _settings(methods=["erm", "mat"], models=16, steps=None, data_params={})
    run_memorization(settings, tmp_path)
    scores = pd.read_csv(tmp_path / "experiments" / "memorization" / "synthetic" / "scores.csv")
    minority = scores[scores["y"] != scores["a"]].groupby("method")["score"].mean()
    majority = scores[scores["y"] == scores["a"]].groupby("method")["score"].mean()
    assert minority["erm"] >= 0.5 and majority["erm"] <= 0.1
    assert minority["mat"] <= minority["erm"] - 0.3 and majority["mat"] <= 0.1


def test_colored_digits_end_to_end_with_a_network_that_trains_alone(tmp_path, capsys):
    """A convolutional network cannot be stacked: its models train one at a time, and every
    example is still scored from K models."""
    settings = _settings(dataset="colored-digits", methods=["erm"], steps=5, data_params={})
    table, out = run_memorization(settings, tmp_path)
    assert "train one at a time here" in capsys.readouterr().err
    scores = pd.read_csv(out / "scores.csv")
    assert set(scores["group"]) == {
        "digit0-4/red",
        "digit0-4/green",
        "digit5-9/red",
        "digit5-9/green",
    }
    assert (scores["n_in"] + scores["n_out"] == 6).all()
    assert scores["score"].notna().any()


def test_waterbirds_cached_features_end_to_end(tmp_path):
    from upstream_fixtures import write_waterbirds

    from robustbench_mat.datasets.waterbirds import Waterbirds
    from robustbench_mat.download import prepare_dataset

    write_waterbirds(tmp_path / "data" / "waterbirds")
    prepare_dataset(Waterbirds, tmp_path / "data", show_progress=False)
    settings = _settings(
        dataset="waterbirds",
        methods=["erm"],
        steps=5,
        data_params={"features": "resnet50", "weights": "none", "image_size": 32},
        data_dir=str(tmp_path / "data"),
    )
    table, out = run_memorization(settings, tmp_path / "work")
    scores = pd.read_csv(out / "scores.csv")
    train = Waterbirds(tmp_path / "data").split("train")
    names = Waterbirds(tmp_path / "data").group_names()
    assert scores["group"].tolist() == [names[g] for g in (train.y * 2 + train.a).tolist()]
    assert (scores["n_in"] + scores["n_out"] == 6).all()
