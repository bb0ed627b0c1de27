"""Every cell of the leaderboard equals mean ± std straight from mlflow.search_runs; trial,
unfinished and failed runs never count."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from robustbench_mat.cli import main
from robustbench_mat.leaderboard.table import build, published
from robustbench_mat.tracking import TAGS, Tracker
from robustbench_mat.tuning import TuneSpec, tune


@pytest.fixture
def swept(workdir: Path) -> Path:
    for method, regime in (("erm", "val-only"), ("erm", "full"), ("groupdro", "full")):
        tune(
            TuneSpec(
                method=method,
                dataset="synthetic",
                regime=regime,
                trials=2,
                seeds=3,
                steps=30,
                eval_every=10,
                data_params={"n": 200, "dim": 20},
                workdir=str(workdir),
                prune=False,
            ),
            log=lambda line: None,
        )
    tracker = Tracker(workdir)  # decoys: an unfinished and a failed "final" run
    for state in ("running", "failed"):
        run_id = tracker.start(
            "synthetic",
            f"decoy {state}",
            {
                TAGS.METHOD: "erm",
                TAGS.DATASET: "synthetic",
                TAGS.REGIME: "val-only",
                TAGS.SEED: 7,
                TAGS.FINAL: "true",
                TAGS.CRITERION: "val_wga",
                "robustbench.study": "decoy",
            },
            {},
        )
        tracker.log_metrics(run_id, {"test_avg": 0.0, "test_wga": 0.0})
        if state == "failed":
            tracker.end(run_id, "failed")
    return workdir


def test_every_cell_matches_mlflow(swept: Path) -> None:
    uri = f"sqlite:///{swept / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["synthetic"])
    final = runs[(runs["tags.robustbench.final"] == "true") & (runs["status"] == "FINISHED")]
    assert len(final) == 9  # 3 studies x 3 seeds; decoys and trials excluded
    board = build(uri)
    cells = pd.read_csv(io.StringIO(board.render("csv")))
    assert len(cells) == 3
    markdown = board.render("markdown")
    for (regime, method), group in final.groupby(
        ["tags.robustbench.regime", "tags.robustbench.method"]
    ):
        cell = cells[(cells.regime == regime) & (cells.method == method)].iloc[0]
        for metric in ("avg", "wga"):
            values = group[f"metrics.test_{metric}"] * 100
            assert cell[metric] == pytest.approx(values.mean())
            assert cell[f"{metric}_std"] == pytest.approx(values.std(ddof=1))
            assert f"{values.mean():.1f} ± {values.std(ddof=1):.1f} (3)" in markdown
        assert cell["seeds"] == 3
        # The budget, read from what `tune` recorded: the runs' steps param, the study's
        # trial runs and its final seed runs.
        assert (cell["steps"], cell["trials"], cell["protocol"]) == (30, 2, "default")
    assert markdown.count("30 steps, 2 trials, 3 seeds, default") == 3
    best = cells["wga"].max()
    assert re.search(rf"\*\*{best:.1f} ± [0-9.]+ \(3\)\*\*", markdown)


def test_published_rows_are_marked_and_match_the_paper(swept: Path) -> None:
    uri = f"sqlite:///{swept / 'mlflow.db'}"
    board = build(uri, with_published=True, datasets=["synthetic", "waterbirds"])
    markdown = board.render("markdown")
    assert "| ✗    | ✗    | MAT (published)      | –" in markdown
    assert "90.4 ± 0.7" in markdown and "88.1 ± 0.9" in markdown
    table = published()
    mat = table[
        (table.method == "MAT") & (table.regime == "val-only") & (table.dataset == "civilcomments")
    ].iloc[0]
    assert (mat.avg, mat.avg_std, mat.wga, mat.wga_std) == (84.3, 0.3, 74.0, 0.8)
    assert "plain test accuracy" in board.header()
    assert "weighted by the training group" in build(uri, average="train-weighted").header()


def test_leaderboard_command_writes_the_file_and_logs_a_run(
    swept: Path, capsys, tmp_path: Path
) -> None:
    out = tmp_path / "board.tex"
    assert (
        main(["leaderboard", "--workdir", str(swept), "--format", "latex", "--out", str(out)]) == 0
    )
    assert "\\textbf{" in out.read_text()
    assert "erm" in (swept / "leaderboard" / "LEADERBOARD.md").read_text()
    client = mlflow.MlflowClient(f"sqlite:///{swept / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("leaderboard").experiment_id])
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {
        "LEADERBOARD.md",
        "worst_group_accuracy.png",
    }


def test_empty_store_says_how_to_fill_it(workdir: Path, capsys) -> None:
    assert main(["leaderboard", "--workdir", str(workdir)]) == 2
    assert "run `robustbench-mat tune`" in capsys.readouterr().err


def test_a_row_says_which_protocol_made_it(workdir: Path) -> None:
    for protocol in ("default", "paper"):
        tune(
            TuneSpec(
                method="erm",
                dataset="synthetic",
                trials=1,
                seeds=2,
                steps=20,
                eval_every=10,
                data_params={"n": 200, "dim": 20},
                workdir=str(workdir),
                protocol=protocol,
            ),
            log=lambda line: None,
        )
    board = build(f"sqlite:///{workdir / 'mlflow.db'}")
    assert sorted(board.cells.method) == ["erm", "erm [paper]"]
    assert "erm [paper]" in board.render("markdown")


def test_reading_the_leaderboard_leaves_the_tracking_variable_as_it_was(tmp_path, monkeypatch):
    """A Tracker made after the leaderboard, in the same process, keeps its own store."""
    from robustbench_mat.leaderboard.table import final_runs
    from robustbench_mat.tracking import tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    final_runs(f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}")
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert tracking_uri(tmp_path / "b") == f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    final_runs(f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}")
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:///elsewhere.db"
