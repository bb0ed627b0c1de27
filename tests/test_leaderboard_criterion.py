"""`leaderboard --criterion`: each final run's evaluation step re-selected from its recorded
history by another validation metric; `--metrics`: balanced and worst-class accuracy columns.

The runs are written straight to MLflow as `tune` and the runner leave them: the selected
step's metrics under their plain keys, every evaluation in `history.csv`. In the hand-written
history val_avg peaks at step 20 (tied with step 10: the later step wins) and val_wga at step
40 (tied with step 30), the tuning criterion, so the stored metrics are those of step 40."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from test_leaderboard_formats import latex_problems

from robustbench_mat.cli import main
from robustbench_mat.tracking import HISTORY_PREFIX, TAGS, Tracker

HISTORY = [
    # step, val_avg, val_wga, test_avg, test_wga, class a, class b (test)
    (10, 0.875, 0.25, 0.5, 0.125, 0.25, 0.75),
    (20, 0.875, 0.5, 0.875, 0.375, 1.0, 0.5),
    (30, 0.75, 0.75, 0.625, 0.5, 0.75, 0.625),
    (40, 0.625, 0.75, 0.75, 0.25, 0.875, 0.375),
]
SEED_SHIFT = 0.125  # seed s has every test accuracy lowered by s * SEED_SHIFT
STD = 100 * SEED_SHIFT / 2**0.5  # of two seeds


def history(seed: int, inferred: bool) -> list[dict[str, float]]:
    """The evaluation records of one seed's run."""
    records = []
    for step, val_avg, val_wga, *test in HISTORY:
        avg, wga, a, b = (value - seed * SEED_SHIFT for value in test)
        record = {"step": step, "train_loss": 1 / step, "val_avg": val_avg, "val_wga": val_wga}
        if inferred:
            record["val_inferred_wga"] = val_wga
        record |= {"test_avg": avg, "test_wga": wga, "test_worst_class": min(a, b)}
        records.append(record | {"test_class_acc.a": a, "test_class_acc.b": b})
    return records


def add_final_runs(
    workdir: Path,
    method: str,
    regime: str,
    criterion: str,
    *,
    seeds: int = 2,
    without_history: tuple[int, ...] = (),
) -> None:
    """A study's final seed runs with their history, selected by `criterion` as in training."""
    from robustbench_mat.evaluation import select

    tracker = Tracker(workdir)
    tags = {
        TAGS.METHOD: method,
        TAGS.DATASET: "synthetic",
        TAGS.REGIME: regime,
        TAGS.CRITERION: criterion,
        TAGS.KIND: "final",
        TAGS.FINAL: "true",
        "robustbench.study": f"{method}.synthetic.{regime}",
    }
    for seed in range(seeds):
        records = history(seed, inferred=regime == "none")
        run_id = tracker.start("synthetic", f"{method} seed {seed}", {**tags, TAGS.SEED: seed}, {})
        tracker.log_many(run_id, [(r["step"], r) for r in records], HISTORY_PREFIX)
        selected = select(records, criterion)
        tracker.log_metrics(run_id, {**selected, "selected_step": selected["step"]}, step=40)
        if seed not in without_history:
            path = workdir / "runs" / run_id / "history.csv"
            path.parent.mkdir(parents=True)
            pd.DataFrame(records).to_csv(path, index=False)
            tracker.log_artifact(run_id, path)
        tracker.end(run_id, "finished")


@pytest.fixture
def studies(workdir: Path) -> Path:
    add_final_runs(workdir, "erm", "val-only", "val_wga")
    add_final_runs(workdir, "mat", "none", "val_inferred_wga")
    return workdir


def leaderboard(workdir: Path, capfd, *flags: str) -> tuple[str, str]:
    assert main(["leaderboard", "--workdir", str(workdir), *flags]) == 0
    return capfd.readouterr()


def csv_cells(out: str) -> dict[str, pd.Series]:
    cells = pd.read_csv(io.StringIO(out))
    return {row.method: row for _, row in cells.iterrows()}


def test_val_avg_reports_the_test_values_of_its_step(studies: Path, capfd) -> None:
    out, err = leaderboard(studies, capfd, "--criterion", "val_avg", "--format", "csv")
    for method in ("erm", "mat"):
        cell = csv_cells(out)[method]
        # Step 20 (val_avg's later tie), seeds 0 and 1: (0.875 + 0.75) / 2 and so on.
        assert (cell.avg, cell.wga) == (81.25, 31.25)
        assert cell.avg_std == pytest.approx(STD)
        assert (cell.seeds, cell.seeds_reselected, cell.step_criterion) == (2, 2, "val_avg")
    assert csv_cells(out)["mat"].criterion == "val_inferred_wga"  # as tuned
    assert "Evaluation steps re-selected by val_avg" in err
    assert "configurations (hyperparameters) as tuned under val_inferred_wga, val_wga" in err
    assert "--criterion" not in err  # every run recorded val_avg, no regime forbids it


def test_the_tuning_criterion_reproduces_the_stored_values(studies: Path, capfd) -> None:
    stored, _ = leaderboard(studies, capfd, "--format", "csv")
    reselected, _ = leaderboard(studies, capfd, "--criterion", "val_wga", "--format", "csv")
    erm, again = csv_cells(stored)["erm"], csv_cells(reselected)["erm"]
    assert (erm.avg, erm.wga) == (again.avg, again.wga) == (68.75, 18.75)  # step 40


def test_balanced_and_worst_class_columns(studies: Path, capfd) -> None:
    out, _ = leaderboard(studies, capfd, "--metrics", "balanced", "worst_class", "--format", "csv")
    erm = csv_cells(out)["erm"]
    # Step 40: classes (0.875, 0.375) and (0.75, 0.25), so balanced 62.5 and 50.
    assert (erm.balanced, erm.worst_class) == (56.25, 31.25)
    assert erm.balanced_std == pytest.approx(STD)
    out, _ = leaderboard(studies, capfd, "--criterion", "val_avg", "--metrics", "balanced")
    row = next(line for line in out.splitlines() if "| erm " in line).split("|")
    # Step 20: classes (1.0, 0.5) and (0.875, 0.375), so balanced 75 and 62.5.
    assert [cell.strip(" *") for cell in row[4:7]] == [
        "81.2 ± 8.8 (2)",
        "31.2 ± 8.8 (2)",
        "68.8 ± 8.8 (2)",
    ]
    assert "synthetic balanced" in out and "synthetic worst_class" not in out
    assert "balanced: the mean over classes of the test class accuracies" in out


def test_a_forbidden_criterion_leaves_the_rows_of_its_regime_empty(studies: Path, capfd) -> None:
    out, err = leaderboard(studies, capfd, "--criterion", "val_wga", "--metrics", "balanced")
    rows = {
        line.split("|")[3].strip(): line.split("|") for line in out.splitlines() if "| ✗" in line
    }
    assert [cell.strip() for cell in rows["mat"][4:7]] == ["–", "–", "–"]
    assert rows["mat"][7].strip() == "? steps, ? trials, 2 seeds, default"  # the row stays
    assert rows["erm"][4].strip() == "**68.8 ± 8.8 (2)**"
    message = "reads validation group labels, which regime 'none' withholds"
    assert err.count(message) == 1 and "the cells of its rows are left empty" in err


def test_runs_without_the_criterion_are_named_and_left_out(workdir: Path, capfd) -> None:
    add_final_runs(workdir, "erm", "val-only", "val_wga", seeds=3, without_history=(2,))
    add_final_runs(workdir, "mat", "none", "val_inferred_wga")
    out, err = leaderboard(workdir, capfd, "--criterion", "val_inferred_wga", "--format", "csv")
    cells = csv_cells(out)
    assert pd.isna(cells["erm"].avg) and cells["erm"].seeds_reselected == 0
    assert (cells["mat"].avg, cells["mat"].seeds_reselected) == (68.75, 2)  # step 40
    lines = err.splitlines()
    (absent,) = [line for line in lines if "did not record val_inferred_wga" in line]
    assert "2 final run(s)" in absent
    assert "erm (val-only) on synthetic seed 0" in absent and "seed 1" in absent
    (unreadable,) = [line for line in lines if "no readable history.csv" in line]
    assert "1 final run(s)" in unreadable and "erm (val-only) on synthetic seed 2" in unreadable

    out, _ = leaderboard(workdir, capfd, "--criterion", "val_avg", "--format", "csv")
    erm = csv_cells(out)["erm"]  # seeds 0 and 1 only: seed 2 has no history to re-select from
    assert (erm.avg, erm.seeds, erm.seeds_reselected) == (81.25, 3, 2)


def test_an_unknown_criterion_is_one_line(studies: Path, capfd) -> None:
    assert main(["leaderboard", "--workdir", str(studies), "--criterion", "val_avgg"]) == 2
    out, err = capfd.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert "unknown selection criterion 'val_avgg'; did you mean val_avg?" in err
    assert main(["leaderboard", "--workdir", str(studies), "--criterion", "test_wga"]) == 2
    assert "must be a validation metric" in capfd.readouterr().err


def test_latex_with_extra_columns_is_valid(studies: Path, capfd, tmp_path: Path) -> None:
    flags = ("--metrics", "balanced", "worst_class", "--criterion", "val_avg")
    out, _ = leaderboard(studies, capfd, *flags, "--format", "latex")
    assert latex_problems(out, columns=3 + 4 + 1) == []
    assert "\\multicolumn{4}{c}{synthetic}" in out and "\\cmidrule(lr){4-7}" in out
    assert "worst\\_class" in out and "68.8 $\\pm$ 8.8 (2)" in out
    html, _ = leaderboard(studies, capfd, *flags, "--format", "html")
    assert "<th>synthetic worst_class" in html and "<b>43.8 ± 8.8 (2)</b>" in html
    if shutil.which("pdflatex") is None:
        return
    (tmp_path / "table.tex").write_text(out)
    (tmp_path / "paper.tex").write_text(
        "\\documentclass{article}\\usepackage{booktabs}\\usepackage{amssymb}"
        "\\begin{document}\\input{table}\\end{document}\n"
    )
    done = subprocess.run(
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "paper.tex"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:]


DEFAULT_CSV = (
    "regime,method,dataset,protocol,avg,avg_std,wga,wga_std,seeds,steps,trials,criterion,source\n"
    "none,mat,synthetic,default,68.75,8.838834764831844,18.75,8.838834764831844,2,,,"
    "val_inferred_wga,measured\n"
    "val-only,erm,synthetic,default,68.75,8.838834764831844,18.75,8.838834764831844,2,,,"
    "val_wga,measured\n"
)
DEFAULT_TABLE = [
    "| tr   | va   | method   | synthetic avg      | synthetic wga      | "
    "budget                              |",
    "|------|------|----------|--------------------|--------------------|"
    "-------------------------------------|",
    "| ✗    | ✓    | erm      | **68.8 ± 8.8 (2)** | **18.8 ± 8.8 (2)** | "
    "? steps, ? trials, 2 seeds, default |",
    "| ✗    | ✗    | mat      | **68.8 ± 8.8 (2)** | **18.8 ± 8.8 (2)** | "
    "? steps, ? trials, 2 seeds, default |",
]


def test_without_the_flags_the_output_is_unchanged(studies: Path, capfd) -> None:
    out, _ = leaderboard(studies, capfd, "--format", "csv")
    assert out == DEFAULT_CSV
    out, _ = leaderboard(studies, capfd)
    assert "\n".join(DEFAULT_TABLE) in out
    assert "Selection criteria: val_inferred_wga, val_wga. tr / va" in out


def test_a_tuned_study_reselected_by_its_own_criterion_is_unchanged(workdir: Path) -> None:
    """On runs as `tune` writes them, re-selecting by the tuning criterion reads each run's
    history.csv back exactly: the same cells as the stored selected metrics."""
    import mlflow

    from robustbench_mat.leaderboard.table import build
    from robustbench_mat.tuning import TuneSpec, tune

    spec = TuneSpec(
        method="erm",
        dataset="synthetic",
        regime="val-only",
        trials=1,
        seeds=2,
        steps=40,
        eval_every=10,
        data_params={"n": 200, "dim": 20},
        workdir=str(workdir),
        prune=False,
    )
    tune(spec, log=lambda line: None)
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    extra = ("balanced", "worst_class")
    stored = build(uri, extra=extra).cells.iloc[0]
    again = build(uri, criterion="val_wga", extra=extra).cells.iloc[0]
    metrics = ["avg", "avg_std", "wga", "wga_std", *extra]
    assert again[metrics].tolist() == stored[metrics].tolist()
    assert again.seeds_reselected == 2
    runs = mlflow.search_runs(experiment_names=["synthetic"])
    final = runs[runs["tags.robustbench.final"] == "true"]
    classes = final.filter(like="metrics.test_class_acc.")
    assert classes.shape[1] >= 2
    assert stored.balanced == pytest.approx(classes.mean(axis=1).mean() * 100)
    assert stored.worst_class == pytest.approx(final["metrics.test_worst_class"].mean() * 100)
