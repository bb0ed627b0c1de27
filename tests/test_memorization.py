"""The memorization experiment: Feldman & Zhang's subsampled self-influence estimate."""

from __future__ import annotations

import math

import mlflow
import pandas as pd
import pytest
import torch

from robustbench_mat.errors import UserError
from robustbench_mat.experiments.memorization import (
    MIN_MODELS,
    MemorizationSettings,
    run_memorization,
    self_influence,
)
from robustbench_mat.runner import random_subset


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
