"""The leaderboard: mean ± std over seeds of the final seed runs recorded in MLflow, in the
layout of the MAT paper's Table 1 (one row per regime and method, average and worst-group test
accuracy per dataset), with the paper's published numbers beside them on request.

Only FINISHED runs tagged `robustbench.final=true` count (the seed runs of a study's best
configuration): trials, failed, killed and unfinished runs never do. When several studies
produced final runs for the same (method, dataset, regime), the most recent study is shown.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files

import pandas as pd
from tabulate import tabulate

from robustbench_mat.tracking import TAGS

REGIMES = {"full": ("✓", "✓"), "val-only": ("✗", "✓"), "none": ("✗", "✗")}
AVERAGES = {
    "plain": ("test_avg", "plain test accuracy (the XRM and MAT papers' convention)"),
    "train-weighted": (
        "test_avg_train_weighted",
        "test group accuracies weighted by the training group proportions (the DFR/AFR convention)",
    ),
}
FORMATS = ("markdown", "html", "latex", "csv")
_BOLD = {"markdown": "**{}**", "html": "<b>{}</b>", "latex": "\\textbf{{{}}}"}


def final_runs(tracking_uri: str) -> pd.DataFrame:
    """One row per finished final seed run: method, dataset, regime, seed, study, criterion,
    run id and the test metrics (fractions)."""
    import mlflow

    from robustbench_mat.tracking import ensure_store

    ensure_store(tracking_uri, None)  # a new store is created atomically, as every command does
    mlflow.set_tracking_uri(tracking_uri)
    runs = mlflow.search_runs(
        search_all_experiments=True,
        filter_string=f"tags.`{TAGS.FINAL}` = 'true' and attributes.status = 'FINISHED'",
    )
    columns = [
        "method",
        "dataset",
        "regime",
        "seed",
        "study",
        "criterion",
        "protocol",
        "run_id",
        "end_time",
        "test_avg",
        "test_wga",
        "test_avg_train_weighted",
    ]
    if runs.empty:
        return pd.DataFrame(columns=columns)
    table = pd.DataFrame(
        {
            "method": runs[f"tags.{TAGS.METHOD}"],
            "dataset": runs[f"tags.{TAGS.DATASET}"],
            "regime": runs[f"tags.{TAGS.REGIME}"],
            "seed": runs[f"tags.{TAGS.SEED}"].astype(int),
            "study": runs["tags.robustbench.study"],
            "criterion": runs[f"tags.{TAGS.CRITERION}"],
            "protocol": _tag_or(runs, TAGS.PROTOCOL, "default"),
            "run_id": runs["run_id"],
            "end_time": runs["end_time"],
        }
    )
    for metric in ("test_avg", "test_wga", "test_avg_train_weighted"):
        column = f"metrics.{metric}"
        table[metric] = runs[column] if column in runs else float("nan")
    return table


def _tag_or(runs: pd.DataFrame, tag: str, default: str) -> pd.Series:
    column = f"tags.{tag}"
    return runs[column].fillna(default) if column in runs else pd.Series(default, index=runs.index)


ROW_KEY = ["method", "dataset", "regime", "protocol"]


def latest_study_only(runs: pd.DataFrame) -> pd.DataFrame:
    """Keep, for each (method, dataset, regime, protocol), the runs of the study that finished
    last."""
    if runs.empty:
        return runs
    last = runs.groupby([*ROW_KEY, "study"])["end_time"].max().reset_index()
    last = last.sort_values("end_time").groupby(ROW_KEY).tail(1)
    return runs.merge(last[[*ROW_KEY, "study"]])


def aggregate(runs: pd.DataFrame, average: str = "plain") -> pd.DataFrame:
    """Mean, std and count over seeds (in %) per (regime, method, dataset)."""
    metric = AVERAGES[average][0]
    runs = latest_study_only(runs)
    grouped = runs.groupby(["regime", "method", "dataset", "protocol"])
    summary = pd.DataFrame(
        {
            "avg": grouped[metric].mean() * 100,
            "avg_std": grouped[metric].std(ddof=1) * 100,
            "wga": grouped["test_wga"].mean() * 100,
            "wga_std": grouped["test_wga"].std(ddof=1) * 100,
            "seeds": grouped["seed"].nunique(),
            "criterion": grouped["criterion"].agg(lambda c: ", ".join(sorted(set(c)))),
        }
    ).reset_index()
    summary["source"] = "measured"
    # A row says which protocol made it: `mat [paper]` beside the plain `mat`.
    marked = summary.protocol != "default"
    summary.loc[marked, "method"] = summary.method + " [" + summary.protocol + "]"
    return summary


def published() -> pd.DataFrame:
    """The MAT paper's Table 1 (in %), as shipped with the package."""
    table = pd.read_csv(files("robustbench_mat.leaderboard") / "published.csv")
    regime = {("yes", "yes"): "full", ("no", "yes"): "val-only", ("no", "no"): "none"}
    table["regime"] = [
        regime[(t, v)] for t, v in zip(table.train_groups, table.val_groups, strict=True)
    ]
    table["seeds"] = pd.NA
    table["criterion"] = ""
    return table[
        [
            "regime",
            "method",
            "dataset",
            "avg",
            "avg_std",
            "wga",
            "wga_std",
            "seeds",
            "criterion",
            "source",
        ]
    ]


@dataclass
class Leaderboard:
    """The aggregated cells and what they mean."""

    cells: pd.DataFrame
    datasets: list[str]
    average: str

    def header(self) -> str:
        criteria = sorted({c for c in self.cells["criterion"].dropna() if c})
        return (
            f"Test accuracy in %, mean ± std over seeds (number of seeds), of the final runs "
            f"recorded in MLflow. avg: {AVERAGES[self.average][1]}; wga: worst-group accuracy. "
            f"Selection criteria: {', '.join(criteria) or 'none'}. tr / va: group labels used "
            f"in training / in validation. Best measured value per column in bold; rows marked "
            f"'published' are the MAT paper's Table 1 (not measured here)."
        )

    def rows(self, style: str) -> tuple[list[str], list[list[str]]]:
        headers = ["tr", "va", "method"]
        for dataset in self.datasets:
            headers += [f"{dataset} avg", f"{dataset} wga"]
        measured = self.cells[self.cells.source == "measured"]
        best = {
            (dataset, metric): measured.loc[measured.dataset == dataset, metric].max()
            for dataset in self.datasets
            for metric in ("avg", "wga")
        }
        order = {name: i for i, name in enumerate(REGIMES)}
        keys = self.cells[["regime", "method", "source"]].drop_duplicates()
        keys = keys.assign(
            _regime=keys.regime.map(order), _published=keys.source != "measured"
        ).sort_values(["_regime", "_published", "method"])
        rows = []
        for regime, method, source in keys[["regime", "method", "source"]].itertuples(index=False):
            label = method if source == "measured" else f"{method} (published)"
            row = [*REGIMES[regime], label]
            for dataset in self.datasets:
                cell = self.cells[
                    (self.cells.regime == regime)
                    & (self.cells.method == method)
                    & (self.cells.source == source)
                    & (self.cells.dataset == dataset)
                ]
                for metric in ("avg", "wga"):
                    row.append(_cell(cell, metric, style, best[(dataset, metric)]))
            rows.append(row)
        return headers, rows

    def render(self, style: str = "markdown") -> str:
        if style == "csv":
            return self.cells.to_csv(index=False)
        headers, rows = self.rows(style)
        tablefmt = {"markdown": "github", "html": "unsafehtml", "latex": "latex_raw"}[style]
        return tabulate(rows, headers=headers, tablefmt=tablefmt, disable_numparse=True)


def _cell(cell: pd.DataFrame, metric: str, style: str, best: float) -> str:
    if cell.empty or pd.isna(cell[metric].iloc[0]):
        return "–"
    row = cell.iloc[0]
    text = f"{row[metric]:.1f}"
    if not pd.isna(row[f"{metric}_std"]):
        text += f" ± {row[f'{metric}_std']:.1f}"
    if row["source"] == "measured":
        text += f" ({row['seeds']})"
        if row[metric] == best:
            text = _BOLD[style].format(text)
    return text


def build(
    tracking_uri: str,
    average: str = "plain",
    with_published: bool = False,
    datasets: list[str] | None = None,
) -> Leaderboard:
    cells = aggregate(final_runs(tracking_uri), average)
    chosen = datasets or sorted(cells["dataset"].unique())
    if with_published:
        extra = published()
        cells = pd.concat([cells, extra[extra.dataset.isin(chosen)]], ignore_index=True)
    return Leaderboard(cells[cells.dataset.isin(chosen)].reset_index(drop=True), chosen, average)


def bar_chart(board: Leaderboard, path) -> None:
    """Worst-group test accuracy per method (bars) and dataset (panels), measured rows only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = board.cells[board.cells.source == "measured"]
    figure, axes = plt.subplots(
        1,
        max(1, len(board.datasets)),
        squeeze=False,
        figsize=(4.5 * max(1, len(board.datasets)), 3.6),
    )
    for axis, dataset in zip(axes[0], board.datasets, strict=False):
        part = measured[measured.dataset == dataset].sort_values(["regime", "method"])
        labels = [f"{m}\n{r}" for r, m in zip(part.regime, part.method, strict=True)]
        axis.bar(labels, part.wga, yerr=part.wga_std.fillna(0), color="tab:blue", capsize=3)
        axis.set(title=dataset, ylabel="worst-group test accuracy (%)", ylim=(0, 100))
        axis.tick_params(axis="x", labelsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def record(board: Leaderboard, workdir, text: str) -> tuple[str, str]:
    """Write `<workdir>/leaderboard/LEADERBOARD.md` and the bar chart, and log both as the
    artifacts of a run of the MLflow experiment `leaderboard`; returns (path, run id)."""
    from pathlib import Path

    from robustbench_mat.tracking import Tracker

    folder = Path(workdir) / "leaderboard"
    folder.mkdir(parents=True, exist_ok=True)
    markdown = folder / "LEADERBOARD.md"
    markdown.write_text(f"# Leaderboard\n\n{board.header()}\n\n{text}\n")
    chart = folder / "worst_group_accuracy.png"
    bar_chart(board, chart)
    tracker = Tracker(Path(workdir))
    run_id = tracker.start(
        "leaderboard",
        "leaderboard",
        {TAGS.KIND: "leaderboard"},
        {"average": board.average, "datasets": " ".join(board.datasets)},
    )
    for path in (markdown, chart):
        tracker.log_artifact(run_id, path)
    tracker.end(run_id, "finished")
    return str(markdown), run_id
