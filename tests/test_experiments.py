"""The paper's synthetic figures, reproduced through the shared runner (acceptance bands)."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib
import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from robustbench_mat.cli import main
from robustbench_mat.experiments import figure1, figure3
from robustbench_mat.leaderboard.table import build, final_runs

matplotlib.use("Agg")


@pytest.fixture
def saved_figures(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """File name -> titles of the axes of every figure saved while the test runs."""
    from matplotlib.figure import Figure

    saved: dict[str, list[str]] = {}
    original = Figure.savefig

    def spy(self: Figure, path, *args, **kwargs) -> None:
        saved[Path(path).name] = [axis.get_title() for axis in self.axes]
        original(self, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    return saved


def _experiment_runs(workdir: Path, dataset: str) -> list:
    """The MLflow runs of `dataset`'s experiment tagged as made by an `experiment` command."""
    client = mlflow.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    return client.search_runs(
        [client.get_experiment_by_name(dataset).experiment_id],
        filter_string="tags.`robustbench.kind` = 'experiment'",
    )


def _cells(table: str, label: str) -> list[float]:
    row = next(line for line in table.splitlines() if line.startswith(f"| {label}"))
    return [float(cell.split("±")[0]) for cell in row.strip("|").split("|")[1:]]


def test_figure1_reproduces_erm_memorisation_and_mat(
    workdir: Path, capsys, saved_figures: dict[str, list[str]]
) -> None:
    assert (
        main(
            [
                "experiment",
                "figure1",
                "--seeds",
                "1234",
                "--quiet",
                "--workdir",
                str(workdir),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    majority_train, minority_train, majority_va, minority_va, _, minority_te = range(6)
    erm_clean, erm_noisy, mat = (
        _cells(table, label) for label in ("ERM, σ=0 ", "ERM, σ=0.5", "MAT")
    )
    assert erm_clean[minority_va] >= 0.98
    assert erm_noisy[minority_train] == 1.0 and erm_noisy[majority_train] == 1.0
    assert erm_noisy[minority_va] <= 0.35 and erm_noisy[minority_te] <= 0.35
    assert mat[minority_va] >= 0.80 and mat[minority_te] >= 0.80
    assert mat[majority_va] >= 0.9
    # The authors' script on seed 1234 (their "test" is va): ERM σ=0.5 0.144, MAT 0.898. Same
    # data and initial weights, so ERM repeats their run; MAT's own draws differ.
    assert erm_noisy[minority_va] == pytest.approx(0.144, abs=0.01)
    assert mat[minority_va] == pytest.approx(0.898, abs=0.02)
    assert 'va: the 50/50 split the authors plot and report as "test"' in table

    folder = workdir / "experiments" / "figure1"
    assert sorted(p.name for p in (folder / "seed1234").glob("*.png")) == [
        "erm_noise0.5.png",
        "erm_noise0.png",
        "mat_noise0.5.png",
    ]
    assert "MAT, σ=0.5, τ=0.1" in (folder / "figure1.md").read_text()
    client = mlflow.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    (summary,) = client.search_runs([client.get_experiment_by_name("experiments").experiment_id])
    assert summary.info.status == "FINISHED"
    assert summary.data.metrics["mat_noise0.5.minority_va"] == pytest.approx(
        mat[minority_va], abs=5e-4
    )
    artifacts = {a.path for a in client.list_artifacts(summary.info.run_id)}
    assert {"figure1.md", "figure1_combined.png"} <= artifacts

    # The combined figure: three settings side by side, curves above, boundaries below.
    assert (folder / "figure1_combined.png").is_file()
    titles = saved_figures["figure1_combined.png"]
    assert len(titles) == 6
    assert titles[:3] == [s.label for s in figure1.SETTINGS]
    assert all(t.startswith("boundary: mean over seeds") for t in titles[3:])
    for text in (table, (folder / "figure1.md").read_text()):
        assert "- `figure1_combined.png`" in text and "- `seed1234/mat_noise0.5.png`" in text

    # Its training runs are named and tagged as experiment runs, and no leaderboard reads them.
    runs = _experiment_runs(workdir, "synthetic")
    assert sorted(r.info.run_name for r in runs) == [
        f"figure1 {s.slug} seed 1234" for s in sorted(figure1.SETTINGS, key=lambda s: s.slug)
    ]
    assert all(r.data.tags["robustbench.experiment"] == "figure1" for r in runs)
    (mat_run,) = (r for r in runs if r.data.tags["robustbench.method"] == "mat")
    inference = client.get_run(mat_run.data.tags["robustbench.inferred_groups.run_id"])
    assert inference.info.run_name == "figure1 mat_noise0.5 seed 1234 (group inference)"
    assert inference.data.tags["robustbench.experiment"] == "figure1"
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    assert final_runs(uri).empty and build(uri).cells.empty


def test_figure1_combined_figure_draws_mean_and_min_max_band() -> None:
    """Two seeds' made-up curves: each curve is the mean, its band spans the seeds' min–max."""
    steps = np.arange(5)
    curves = [
        pd.DataFrame({"step": steps, **{c: np.full(5, level) for c in figure1.CURVE_STYLES}})
        for level in (0.2, 0.6)
    ]
    surfaces = [torch.rand(figure1.PLANE_POINTS, figure1.PLANE_POINTS) for _ in range(2)]
    dataset = figure1.DATASETS.get("synthetic")(noise_std=0.5, seed=7)
    figure = figure1.combined_figure(
        [(setting, curves, surfaces, dataset) for setting in figure1.SETTINGS], [7, 8]
    )
    try:
        assert len(figure.axes) == 6
        top = figure.axes[0]
        assert len(top.lines) == len(figure1.CURVE_STYLES)
        assert np.allclose(top.lines[0].get_ydata(), 0.4)
        (band, *_) = top.collections
        y = band.get_paths()[0].vertices[:, 1]
        assert y.min() == pytest.approx(0.2) and y.max() == pytest.approx(0.6)
        assert "band: min–max over seeds" in figure.get_suptitle()
        labels = [t.get_text() for t in figure.legends[0].get_texts()]
        assert labels[0] == "majority train"
    finally:
        matplotlib.pyplot.close(figure)


def test_figure3_orders_good_ugly_bad(
    workdir: Path, capsys, saved_figures: dict[str, list[str]]
) -> None:
    assert (
        main(["experiment", "figure3", "--quiet", "--workdir", str(workdir), "--device", "cpu"])
        == 0
    )
    table = capsys.readouterr().out
    mse = {}
    for name in ("good", "bad", "ugly"):
        row = next(line for line in table.splitlines() if line.startswith(f"| {name}"))
        steps, error = (cell.strip() for cell in row.strip("|").split("|")[2:4])
        assert int(steps) < 100_000  # reached a training MSE below 1e-6
        mse[name] = float(re.split(r"\s", error)[0])
    assert mse["good"] < mse["ugly"] < mse["bad"]
    assert (workdir / "experiments" / "figure3" / "good_bad_ugly_seed123.png").is_file()

    # Each panel's title carries its run's test MSE; the runs are named and tagged experiments.
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    runs = {r.info.run_name: r for r in _experiment_runs(workdir, "good-bad-ugly")}
    assert sorted(runs) == [f"figure3 {n} seed 123" for n in ("bad", "good", "ugly")]
    titles = saved_figures["good_bad_ugly_seed123.png"]
    for (name, std), title in zip(figure3.SETTINGS, titles, strict=True):
        # The last evaluation's test MSE (the figure shows the final model, as does the table).
        history = mlflow.artifacts.download_artifacts(
            run_id=runs[f"figure3 {name} seed 123"].info.run_id,
            artifact_path="history.csv",
            tracking_uri=uri,
        )
        run_mse = pd.read_csv(history)["test_mse"].iloc[-1]
        assert title.startswith(f"{name}: σ_ε = {std:g}")
        shown = float(title.rsplit("test MSE = ", 1)[1])
        assert shown == pytest.approx(run_mse, abs=5e-5)
        assert mse[name] == pytest.approx(shown, abs=1e-4)
