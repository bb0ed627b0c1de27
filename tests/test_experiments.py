"""The paper's synthetic figures, reproduced through the shared runner (acceptance bands)."""

from __future__ import annotations

import re
from pathlib import Path

import mlflow
import pytest

from robustbench_mat.cli import main


def _cells(table: str, label: str) -> list[float]:
    row = next(line for line in table.splitlines() if line.startswith(f"| {label}"))
    return [float(cell.split("±")[0]) for cell in row.strip("|").split("|")[1:]]


def test_figure1_reproduces_erm_memorisation_and_mat(workdir: Path, capsys) -> None:
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
    assert "figure1.md" in artifacts


def test_figure3_orders_good_ugly_bad(workdir: Path, capsys) -> None:
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
