"""DFR replaces the last layer by the authors' ℓ1 logistic regression on balanced val data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import StageContext, only_run_dir, run_tiny
from sklearn.linear_model import LogisticRegression

from robustbench_mat.errors import UserError
from robustbench_mat.methods import dfr as dfr_module
from robustbench_mat.methods.dfr import (
    C_GRID,
    DFR,
    Standardizer,
    l1_logistic_objective,
    worst_group_accuracy,
)
from robustbench_mat.methods.jtt import ERMStage
from robustbench_mat.registry import DATASETS
from robustbench_mat.runner import RunSpec, run
from robustbench_mat.training import CheckpointStore


def small_synthetic():
    return DATASETS.get("synthetic")(n=200, dim=20, eval_majority=0.8)


def prepared_dfr(dataset, tmp_path: Path, seed: int = 0, steps: int = 30, **hparams) -> DFR:
    values = {k: spec.default for k, spec in DFR.hparam_specs(dataset).items()}
    torch.manual_seed(seed)
    method = DFR(dataset, {**values, **hparams})
    method.prepare(StageContext(tmp_path, steps=steps))
    return method


def standardised_binary_fit(method: DFR, scale: Standardizer) -> tuple[np.ndarray, np.ndarray]:
    """The (coef, intercept) on standardised features that the network's last layer holds."""
    weight = method.head.weight.double().numpy()
    bias = method.head.bias.double().numpy()
    raw = weight[1] - weight[0]
    return (raw * scale.std)[None], np.array([bias[1] - bias[0] + raw @ scale.mean])


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A DFR fit with its defaults, recording every liblinear fit (C, inputs, solution)."""
    fits = []
    original = LogisticRegression.fit

    def fit(self, x, y, *args, **kwargs):
        result = original(self, x, y, *args, **kwargs)
        fits.append((self.C, np.array(x), np.array(y), self.coef_.copy(), self.intercept_.copy()))
        return result

    dataset = small_synthetic()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(LogisticRegression, "fit", fit)
        method = prepared_dfr(dataset, tmp_path_factory.mktemp("dfr"))
    return dataset, method, fits


def test_the_objective_is_liblinears_optimum_and_sparse_on_synthetic(tmp_path) -> None:
    """One fit (num_retrains=1) on the default synthetic task, read back from the network's last
    layer, reaches the objective of a direct scikit-learn fit on the same standardised,
    group-balanced data (liblinear at its tightest), with a sparse solution."""
    dataset = DATASETS.get("synthetic")()
    c = 0.1
    method = prepared_dfr(dataset, tmp_path, steps=50, C=c, num_retrains=1)
    scale = Standardizer(dataset.split("train").inputs.double().numpy())
    val, subsample = dataset.split("val"), method.subsamples[0].numpy()
    x, y = scale(val.inputs.double().numpy()[subsample]), val.y.numpy()[subsample]
    assert (
        np.bincount(val.g.numpy()[subsample]).min() == np.bincount(val.g.numpy()[subsample]).max()
    )
    coef, intercept = standardised_binary_fit(method, scale)
    reference = LogisticRegression(
        C=c, solver="liblinear", tol=1e-10, max_iter=100_000, **dfr_module._l1_penalty()
    ).fit(x, y)
    ours = l1_logistic_objective(coef, intercept, x, y, c)
    theirs = l1_logistic_objective(reference.coef_, reference.intercept_, x, y, c)
    nonzero = int((method.head.weight[1] != 0).sum())
    print(f"objective ours {ours:.6f} liblinear {theirs:.6f}; non-zero {nonzero} of {x.shape[1]}")
    assert ours == pytest.approx(theirs, abs=1e-3)
    assert nonzero == int((reference.coef_ != 0).sum()) and nonzero <= 5


def test_c_is_the_grid_value_with_the_best_held_out_worst_group_accuracy(tmp_path, monkeypatch):
    scores = iter([0.5, 0.6, 0.9, 0.9, 0.2, 0.1, 0.3])
    held_out_sizes, fitted_cs = [], []
    fit = dfr_module.l1_logistic

    def scorer(predicted, y, g):
        held_out_sizes.append(len(y))
        return next(scores)

    def recording_fit(x, y, c, seed, n_classes=2):
        fitted_cs.append(c)
        return fit(x, y, c, seed, n_classes)

    monkeypatch.setattr(dfr_module, "worst_group_accuracy", scorer)
    monkeypatch.setattr(dfr_module, "l1_logistic", recording_fit)
    dataset = small_synthetic()
    method = prepared_dfr(dataset, tmp_path, num_retrains=2)
    assert method.selected_c == 0.3  # the first of the two best
    assert fitted_cs == [*C_GRID, 0.3, 0.3]
    assert held_out_sizes == [len(dataset.split("val")) // 2] * len(C_GRID)


def test_worst_group_accuracy_is_over_the_groups_present() -> None:
    y = np.array([0, 0, 1, 1, 1, 0])
    g = np.array([0, 0, 3, 3, 3, 1])
    assert worst_group_accuracy(np.array([0, 0, 1, 0, 0, 0]), y, g) == pytest.approx(1 / 3)


def test_grid_fits_and_twenty_balanced_refits_are_averaged(recorded) -> None:
    dataset, method, fits = recorded
    assert method.hp["num_retrains"] == 20 and method.selected_c in C_GRID
    assert [c for c, *_ in fits] == [*C_GRID] + [method.selected_c] * 20
    val = dataset.split("val")
    assert len(method.subsamples) == 20 and len({tuple(s.tolist()) for s in method.subsamples}) > 1
    for subsample in method.subsamples:  # every group of val, as often as the rarest one
        counts = torch.bincount(val.g[subsample], minlength=4)
        assert counts.min() == counts.max() == torch.bincount(val.g, minlength=4).min()
    scale = Standardizer(dataset.split("train").inputs.double().numpy())
    coef, intercept = standardised_binary_fit(method, scale)
    np.testing.assert_allclose(coef, np.mean([f[3] for f in fits[7:]], axis=0), atol=1e-5)
    np.testing.assert_allclose(intercept, np.mean([f[4] for f in fits[7:]], axis=0), atol=1e-5)


def test_refits_standardise_with_training_statistics(recorded) -> None:
    dataset, method, fits = recorded
    train, val = dataset.split("train").inputs.double(), dataset.split("val").inputs.double()
    mean, std = train.mean(0), train.std(0, unbiased=False)
    for (_, x, y, *_), subsample in zip(fits[7:], method.subsamples, strict=True):
        np.testing.assert_allclose(x, ((val[subsample] - mean) / std).numpy(), atol=1e-9)
        np.testing.assert_array_equal(y, dataset.split("val").y[subsample].numpy())
    # selection fits standardise with their own (fitting-subsample) statistics, as the authors
    selection_x = fits[0][1]
    np.testing.assert_allclose(selection_x.mean(0), 0, atol=1e-9)
    np.testing.assert_allclose(selection_x.std(0), 1, atol=1e-9)


def test_the_network_predicts_with_the_folded_back_layer(recorded) -> None:
    dataset, method, fits = recorded
    test = dataset.split("test")
    scale = Standardizer(dataset.split("train").inputs.double().numpy())
    coef = np.mean([f[3] for f in fits[7:]], axis=0)
    intercept = np.mean([f[4] for f in fits[7:]], axis=0)
    scores = scale(test.inputs.double().numpy()) @ coef[0] + intercept[0]
    with torch.no_grad():
        logits = method.predict(test.inputs).double()
    np.testing.assert_allclose((logits[:, 1] - logits[:, 0]).numpy(), scores, atol=1e-4)
    assert method.head is method.model and method.model.bias is not None  # synthetic's, biased


def test_the_main_loop_trains_nothing_and_evaluates_the_fit_once(tmp_path) -> None:
    from robustbench_mat.runner import RunSpec, plan, run

    spec = RunSpec(
        method="dfr",
        dataset="synthetic",
        steps=40,
        eval_every=10,
        data_params={"n": 200, "dim": 20},
        workdir=tmp_path / "work",
        show_progress=False,
    )
    assert (plan(spec).steps, plan(spec).main_steps) == (40, 0)
    result = run(spec)
    assert [record["step"] for record in result_history(tmp_path / "work")] == [0]
    assert result.selected_step == 0 and result.final == result.selected


def result_history(workdir):
    import pandas as pd

    (history,) = (workdir / "runs").glob("synthetic-dfr-*/history.csv")
    return pd.read_csv(history).to_dict("records")


def test_the_same_seed_fits_the_same_layer(tmp_path) -> None:
    dataset = small_synthetic()
    first = prepared_dfr(dataset, tmp_path / "a", num_retrains=3)
    again = prepared_dfr(dataset, tmp_path / "b", num_retrains=3)
    other = prepared_dfr(dataset, tmp_path / "c", seed=1, num_retrains=3)
    assert torch.equal(first.head.weight, again.head.weight)
    assert torch.equal(first.head.bias, again.head.bias)
    assert any(
        not torch.equal(a, b) for a, b in zip(first.subsamples, other.subsamples, strict=True)
    )


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(make_workdir, monkeypatch) -> None:
    def spec(workdir: Path) -> RunSpec:
        return RunSpec(
            method="dfr",
            dataset="synthetic",
            seed=0,
            steps=4,
            eval_every=2,
            checkpoint_every=2,
            data_params={"n": 200, "dim": 20},
            hparams={"num_retrains": 3},
            workdir=workdir,
            show_progress=False,
        )

    reference = run(spec(make_workdir("reference")))

    def interrupted(self, batch, step):
        if step == 3:
            raise KeyboardInterrupt

    workdir = make_workdir("resumed")
    with monkeypatch.context() as patch:  # DFR trains only in stage 1 (its main loop: 0 steps)
        patch.setattr(ERMStage, "after_step", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run(spec(workdir))
    assert CheckpointStore(only_run_dir(workdir) / "stage1.pt").load()["step"] == 2
    resumed = run(spec(workdir))
    assert resumed.final == reference.final and resumed.selected == reference.selected
    assert run(spec(make_workdir("again"))).final == reference.final


def test_dfr_beats_erm_worst_group_accuracy_on_synthetic(workdir) -> None:
    dfr = run_tiny(workdir, "dfr", data_params={"n": 200, "dim": 20, "eval_majority": 0.8})
    erm = run_tiny(workdir, "erm", data_params={"n": 200, "dim": 20, "eval_majority": 0.8})
    assert dfr.regime == "val-only"
    print(f"test wga: dfr {dfr.final['test_wga']:.3f}, erm {erm.final['test_wga']:.3f}")
    assert dfr.final["test_wga"] > erm.final["test_wga"] + 0.1


def test_dfr_is_refused_without_validation_groups(workdir) -> None:
    message = "needs validation group labels.*can run in: full, val-only"
    with pytest.raises(UserError, match=message):
        run_tiny(workdir, "dfr", regime="none")


def test_more_than_two_classes_are_fitted_one_vs_rest() -> None:
    generator = np.random.default_rng(0)
    y = np.arange(90) % 3
    x = generator.normal(size=(90, 5)) + np.eye(5)[y] * 2
    coef, intercept = dfr_module.l1_logistic(x, y, 0.3, seed=0, n_classes=3)
    assert coef.shape == (3, 5) and intercept.shape == (3,)
    for k in range(3):
        alone, alone_intercept = dfr_module.l1_logistic(x, (y == k).astype(int), 0.3, seed=0)
        np.testing.assert_allclose(coef[k], alone[0])
        np.testing.assert_allclose(intercept[k], alone_intercept[0])
    assert (dfr_module.linear_predict(coef, intercept, x) == y).mean() > 0.8
