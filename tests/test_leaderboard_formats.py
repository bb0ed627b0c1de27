"""The leaderboard for papers and scripts: published rows without measured runs, table-only
stdout for csv/latex, LaTeX that compiles, each row's budget, and one MLflow run per work
directory. Final runs are written straight to MLflow, as `tune` tags them."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from robustbench_mat.cli import main
from robustbench_mat.leaderboard.table import build, published
from robustbench_mat.tracking import TAGS, Tracker

PAPER_DATASETS = "celeba, civilcomments, multinli, waterbirds"


def add_study(
    workdir: Path,
    method: str = "erm",
    dataset: str = "synthetic",
    regime: str = "val-only",
    *,
    steps: int = 500,
    trials: dict[str, int] | None = None,
    seeds: int = 2,
    protocol: str = "default",
    wga: float = 0.5,
) -> None:
    """A study as MLflow holds it: trial runs (by final state) and `seeds` final seed runs."""
    tracker = Tracker(workdir)
    study = f"{method}.{dataset}.{regime}.steps{steps}.{protocol}"
    base = {
        TAGS.METHOD: method,
        TAGS.DATASET: dataset,
        TAGS.REGIME: regime,
        TAGS.CRITERION: "val_wga",
        TAGS.PROTOCOL: protocol,
        "robustbench.study": study,
    }
    params = {"steps": steps, "protocol": protocol}
    number = 0
    for state, count in (trials or {"finished": 3}).items():
        for _ in range(count):
            tags = {**base, TAGS.SEED: 0, TAGS.KIND: "trial", "robustbench.trial": number}
            run_id = tracker.start(dataset, f"trial {number}", tags, params)
            tracker.end(run_id, state)
            number += 1
    for seed in range(seeds):
        tags = {**base, TAGS.SEED: seed, TAGS.KIND: "final", TAGS.FINAL: "true"}
        run_id = tracker.start(dataset, f"{method} seed {seed}", tags, params)
        tracker.log_metrics(run_id, {"test_avg": 0.8, "test_wga": wga + seed / 100})
        tracker.end(run_id, "finished")


def latex_problems(latex: str, columns: int) -> list[str]:
    """What would stop `latex` from compiling, found without LaTeX: unbalanced braces or math,
    an unescaped special character, a non-ASCII character, a row with the wrong number of
    cells, or a missing booktabs rule."""
    problems = []
    body = "\n".join(line for line in latex.splitlines() if not line.startswith("%"))
    if not body.isascii():
        problems.append(f"non-ASCII characters: {sorted({c for c in body if not c.isascii()})}")
    # Escaped characters and the row end `\\` are fine wherever they are: drop them first.
    bare = re.sub(r"\\[\\{}#$%&_]", "", body)
    depth = 0
    for character in bare:
        depth += {"{": 1, "}": -1}.get(character, 0)
        if depth < 0:
            problems.append("a } closes no {")
            break
    if depth > 0:
        problems.append(f"{depth} unclosed {{")
    if bare.count("$") % 2:
        problems.append("unbalanced $")
    for special in "#_%^~":
        if special in bare:
            problems.append(f"unescaped {special}")
    for rule in ("\\toprule", "\\midrule", "\\bottomrule", "\\begin{tabular}", "\\end{tabular}"):
        if rule not in body:
            problems.append(f"no {rule}")
    rows = body.split("\\midrule")[-1].split("\\bottomrule")[0].strip().splitlines()
    for row in rows:
        cells = len(re.findall(r"(?<!\\)&", row)) + 1
        if cells != columns or not row.rstrip().endswith("\\\\"):
            problems.append(f"row with {cells} cells, not {columns}: {row}")
    return problems


def test_published_rows_without_any_measured_run(workdir: Path, capfd) -> None:
    assert main(["leaderboard", "--workdir", str(workdir), "--published"]) == 0
    out, err = capfd.readouterr()
    assert f"published numbers (MAT paper Table 1) for: {PAPER_DATASETS}" in err
    assert "| ✗    | ✗    | MAT (published)" in out
    assert "waterbirds wga" in out and "multinli avg" in out
    table = published()
    assert len(re.findall(r"\(published\)", out)) == len(table.groupby(["regime", "method"]))


def test_published_adds_its_datasets_beside_the_measured_ones(workdir: Path, capfd) -> None:
    add_study(workdir)
    assert main(["leaderboard", "--workdir", str(workdir), "--published", "--format", "csv"]) == 0
    out, err = capfd.readouterr()
    cells = pd.read_csv(io.StringIO(out))
    assert sorted(cells.dataset.unique()) == sorted(["synthetic", *PAPER_DATASETS.split(", ")])
    assert f"for: {PAPER_DATASETS}; none for: synthetic" in err
    # --datasets still chooses the columns.
    board = build(f"sqlite:///{workdir / 'mlflow.db'}", with_published=True, datasets=["celeba"])
    assert board.datasets == ["celeba"] and set(board.cells.dataset) == {"celeba"}


def test_csv_writes_only_the_table_to_stdout(workdir: Path, capfd) -> None:
    add_study(workdir, "erm", steps=300, trials={"finished": 2, "pruned": 1, "failed": 1})
    add_study(workdir, "mat", regime="none", seeds=3, wga=0.7)
    assert main(["leaderboard", "--workdir", str(workdir), "--format", "csv"]) == 0
    out, err = capfd.readouterr()
    cells = pd.read_csv(io.StringIO(out))  # the whole of stdout is the CSV
    assert out.splitlines()[0].startswith("regime,method,dataset,protocol,avg,avg_std,wga")
    assert len(cells) == 2 == len(out.splitlines()) - 1
    erm = cells[cells.method == "erm"].iloc[0]
    # Finished and pruned trials count, a failed one does not.
    assert (erm.steps, erm.trials, erm.seeds, erm.protocol) == (300, 3, 2, "default")
    mat = cells[cells.method == "mat"].iloc[0]
    assert mat.wga == pytest.approx(100 * (0.7 + 0.71 + 0.72) / 3)
    assert "Test accuracy in %" in err and "written to" in err


def test_markdown_keeps_notes_and_table_on_stdout_with_each_row_budget(
    workdir: Path, capfd
) -> None:
    add_study(workdir, "erm", "synthetic", steps=500, trials={"finished": 8}, seeds=3)
    add_study(workdir, "erm", "colored-digits", steps=500, trials={"finished": 8}, seeds=3)
    add_study(workdir, "mat", "synthetic", steps=2000, trials={"finished": 4}, protocol="paper")
    add_study(workdir, "mat", "colored-digits", steps=1000, trials={"finished": 4})
    assert main(["leaderboard", "--workdir", str(workdir)]) == 0
    out, _ = capfd.readouterr()
    assert out.startswith("Test accuracy in %") and "written to" in out
    rows = {line.split("|")[3].strip(): line for line in out.splitlines() if line.count("|") > 5}
    assert rows["erm"].rstrip(" |").endswith("500 steps, 8 trials, 3 seeds, default")
    assert rows["mat [paper]"].rstrip(" |").endswith("2000 steps, 4 trials, 2 seeds, paper")
    assert rows["mat"].rstrip(" |").endswith("1000 steps, 4 trials, 2 seeds, default")


def test_latex_is_table_only_escaped_booktabs(workdir: Path, capfd, tmp_path: Path) -> None:
    add_study(workdir, "my_erm & co #1 50% ~^", "my_data", regime="full", wga=0.9)
    add_study(workdir, "mat", "my_data", regime="none", protocol="paper_v2")
    assert main(["leaderboard", "--workdir", str(workdir), "--format", "latex"]) == 0
    out, err = capfd.readouterr()
    assert out.startswith("% needs \\usepackage{booktabs}")
    assert out.endswith("\\end{tabular}\n")
    assert "Test accuracy" not in out and "Test accuracy" in err
    assert latex_problems(out, columns=3 + 2 + 1) == []
    assert "my\\_erm \\& co \\#1 50\\% \\textasciitilde \\textasciicircum" in out
    assert "\\multicolumn{2}{c}{my\\_data}" in out and "\\cmidrule(lr){4-5}" in out
    assert "\\textbf{90.5 $\\pm$ 0.7 (2)}" in out  # the best measured wga, in bold
    assert "$\\checkmark$ & $\\checkmark$ & my\\_erm" in out
    assert "\\texttimes & \\texttimes & mat [paper\\_v2]" in out
    assert "paper\\_v2" in out.splitlines()[-3]  # the budget's protocol, escaped


def test_latex_with_published_rows_is_valid(workdir: Path, capfd) -> None:
    assert main(["leaderboard", "--workdir", str(workdir), "--published", "--format", "latex"]) == 0
    out = capfd.readouterr().out
    assert latex_problems(out, columns=3 + 2 * 4) == []  # no measured rows: no budget
    assert "90.4 $\\pm$ 0.7" in out and " -- " in out


def test_the_validity_check_catches_broken_latex() -> None:
    good = "\\begin{tabular}{ll}\n\\toprule\na & b \\\\\n\\midrule\nx\\_1 & \\{y\\} \\\\\n"
    good += "\\bottomrule\n\\end{tabular}"
    assert latex_problems(good, 2) == []
    assert "unescaped _" in latex_problems(good.replace("x\\_1", "x_1"), 2)
    assert "1 unclosed {" in latex_problems(good.replace("\\{y\\}", "{y"), 2)
    assert any("3 cells" in p for p in latex_problems(good.replace("x\\_1", "x & 1"), 2))
    assert "no \\toprule" in latex_problems(good.replace("\\toprule", ""), 2)
    assert any("non-ASCII" in p for p in latex_problems(good.replace("x\\_1", "1 ± 2"), 2))


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed")
def test_latex_compiles_with_pdflatex(workdir: Path, capfd, tmp_path: Path) -> None:
    add_study(workdir, "my_erm & co #1 50% ~^", "my_data", regime="full")
    assert main(["leaderboard", "--workdir", str(workdir), "--published", "--format", "latex"]) == 0
    (tmp_path / "table.tex").write_text(capfd.readouterr().out)
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
    assert (tmp_path / "paper.pdf").stat().st_size > 0


def test_an_unknown_format_lists_the_valid_ones(workdir: Path, capfd) -> None:
    assert main(["leaderboard", "--workdir", str(workdir), "--format", "docx"]) == 2
    out, err = capfd.readouterr()
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert "'docx'" in err and all(f in err for f in ("markdown", "html", "latex", "csv"))
    with pytest.raises(ValueError, match="valid: markdown, html, latex, csv"):
        build(f"sqlite:///{workdir / 'mlflow.db'}", with_published=True).render("docx")


def test_one_leaderboard_run_per_workdir_updated_on_each_call(workdir: Path, capfd) -> None:
    add_study(workdir, "erm", "synthetic")
    add_study(workdir, "erm", "colored-digits")
    ids = set()
    for datasets in (["synthetic"], ["synthetic", "colored-digits"], ["colored-digits"]):
        assert main(["leaderboard", "--workdir", str(workdir), "--datasets", *datasets]) == 0
        ids.add(re.search(r"logged as MLflow run (\w+)", capfd.readouterr().out)[1])
    client = mlflow.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("leaderboard").experiment_id
    (run,) = client.search_runs([experiment])
    assert ids == {run.info.run_id} and run.info.status == "FINISHED"
    assert run.data.tags["robustbench.calls"] == "3"
    assert run.data.tags["robustbench.datasets"] == "colored-digits"  # the latest call's
    assert run.data.tags["robustbench.workdir"] == str(workdir)
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert names == {"LEADERBOARD.md", "worst_group_accuracy.png"}
    logged = Path(client.download_artifacts(run.info.run_id, "LEADERBOARD.md"))
    assert "colored-digits avg" in logged.read_text()
    assert "synthetic avg" not in logged.read_text()  # replaced, not the first call's


def test_each_work_directory_has_its_own_leaderboard_run(
    workdir: Path, tmp_path: Path, monkeypatch, capfd
) -> None:
    add_study(workdir)
    other = tmp_path / "other"
    shutil.copytree(workdir, other)
    # One store shared by both work directories (MLFLOW_TRACKING_URI), two leaderboard runs.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'mlflow.db'}")
    for directory in (workdir, other, workdir):
        assert main(["leaderboard", "--workdir", str(directory)]) == 0
    client = mlflow.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("leaderboard").experiment_id])
    calls = {r.data.tags["robustbench.workdir"]: r.data.tags["robustbench.calls"] for r in runs}
    assert calls == {str(workdir): "2", str(other): "1"}


def test_redirected_stdout_of_a_fresh_process_is_only_the_csv(tmp_path: Path) -> None:
    """`> FILE` as a user types it: a new process on a work directory without a store (whose
    creation MLflow logs) still writes nothing but the table to stdout."""
    table = tmp_path / "published.csv"
    with table.open("w") as stdout:
        done = subprocess.run(
            [sys.executable, "-m", "robustbench_mat.cli", "leaderboard", "--published"]
            + ["--format", "csv", "--workdir", str(tmp_path / "fresh")],
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
        )
    assert done.returncode == 0, done.stderr
    cells = pd.read_csv(table)
    assert len(cells) == len(published()) and set(cells.source) == set(published().source)
    assert f"published numbers (MAT paper Table 1) for: {PAPER_DATASETS}" in done.stderr
