"""The leaderboard: mean ± std over seeds of the final seed runs recorded in MLflow, in the
layout of the MAT paper's Table 1 (one row per regime and method, average and worst-group test
accuracy per dataset), with the paper's published numbers beside them on request.

Only FINISHED runs tagged `robustbench.final=true` count (the seed runs of a study's best
configuration): trials, failed, killed and unfinished runs never do. When several studies
produced final runs for the same (method, dataset, regime), the most recent study is shown.
"""

from __future__ import annotations

import csv
import math
import os
import tempfile
from dataclasses import dataclass, field
from importlib.resources import files
from typing import TYPE_CHECKING, Any

import pandas as pd
from tabulate import tabulate

from robustbench_mat.tracking import TAGS

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from mlflow.entities import Run

    from robustbench_mat.tracking import Tracker

REGIMES = {"full": ("✓", "✓"), "val-only": ("✗", "✓"), "none": ("✗", "✗")}
AVERAGES = {
    "plain": ("test_avg", "plain test accuracy (the XRM and MAT papers' convention)"),
    "train-weighted": (
        "test_avg_train_weighted",
        "test group accuracies weighted by the training group proportions (the DFR/AFR convention)",
    ),
}
EXTRA_METRICS = {
    "balanced": "balanced: the mean over classes of the test class accuracies",
    "worst_class": "worst_class: the lowest test class accuracy",
}
TEST_METRICS = ("test_avg", "test_wga", "test_avg_train_weighted", *EXTRA_METRICS)
CLASS_ACC = "test_class_acc."
HISTORY_FILE = "history.csv"
FORMATS = ("markdown", "html", "latex", "csv")
_BOLD = {"markdown": "**{}**", "html": "<b>{}</b>", "latex": "\\textbf{{{}}}"}


def final_runs(tracking_uri: str) -> pd.DataFrame:
    """One row per finished final seed run: method, dataset, regime, seed, study, criterion,
    run id and the test metrics (fractions)."""
    from robustbench_mat.tracking import ensure_store

    ensure_store(tracking_uri, None)  # a new store is created atomically, as every command does
    runs = _search_runs(
        tracking_uri, f"tags.`{TAGS.FINAL}` = 'true' and attributes.status = 'FINISHED'"
    )
    columns = [
        "method",
        "dataset",
        "regime",
        "seed",
        "study",
        "criterion",
        "protocol",
        "steps",
        "run_id",
        "end_time",
        "artifact_uri",
        *TEST_METRICS,
        "trials",
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
            "steps": _param_or_nan(runs, "steps"),
            "run_id": runs["run_id"],
            "end_time": runs["end_time"],
            "artifact_uri": runs["artifact_uri"],
        }
    )
    for metric, values in leaderboard_metrics(runs, "metrics.").items():
        table[metric] = values
    counts = trial_counts(tracking_uri)
    table["trials"] = table["study"].map(counts).astype("Int64")
    return table


def _search_runs(tracking_uri: str, filter_string: str) -> pd.DataFrame:
    """`mlflow.search_runs` over every experiment of the store at `tracking_uri`. MLflow's
    fluent API needs the URI set globally, which also sets MLFLOW_TRACKING_URI: the variable is
    restored after, so that a Tracker made later in this process for another work directory
    keeps its own store."""
    import mlflow

    saved = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri)
    try:
        return mlflow.search_runs(search_all_experiments=True, filter_string=filter_string)
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved


def trial_counts(tracking_uri: str) -> dict[str, int]:
    """The number of finished (complete or pruned) trial runs that MLflow holds per study."""
    runs = _search_runs(tracking_uri, "tags.`robustbench.trial` != ''")
    state = f"tags.{TAGS.STATE}"
    if runs.empty or state not in runs or "tags.robustbench.study" not in runs:
        return {}
    done = runs[runs[state].isin(("finished", "pruned"))]
    return done.groupby("tags.robustbench.study")["run_id"].nunique().to_dict()


def leaderboard_metrics(frame: pd.DataFrame, prefix: str = "") -> pd.DataFrame:
    """The leaderboard's test metrics (`TEST_METRICS`) of each row of `frame`, whose columns are
    metric keys after `prefix`: balanced accuracy is the mean of the row's class accuracies."""

    missing = pd.Series(float("nan"), index=frame.index)

    def column(key: str) -> pd.Series:
        return frame[prefix + key] if prefix + key in frame else missing

    classes = [c for c in frame.columns if c.startswith(prefix + CLASS_ACC)]
    return pd.DataFrame(
        {
            "test_avg": column("test_avg"),
            "test_wga": column("test_wga"),
            "test_avg_train_weighted": column("test_avg_train_weighted"),
            "balanced": frame[classes].astype(float).mean(axis=1) if classes else missing,
            "worst_class": column("test_worst_class"),
        }
    )


def run_history(artifact_uri: str) -> list[dict[str, Any]] | None:
    """Every evaluation record of a run, from its `history.csv` artifact (MLflow's `history/`
    metrics keep at most `MAX_HISTORY_POINTS` of them), numbers parsed exactly as written, or
    None where the artifact cannot be read."""
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    try:
        repository = get_artifact_repository(artifact_uri)
        with tempfile.TemporaryDirectory() as folder:
            local = isinstance(repository, LocalArtifactRepository)  # read in place
            path = repository.download_artifacts(HISTORY_FILE, None if local else folder)
            with open(path, newline="") as file:
                return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(file)]
    except (OSError, csv.Error, MlflowException):
        return None


def _number(text: str) -> float | str:
    try:
        return float(text) if text else float("nan")
    except ValueError:
        return text


def _measures(history: list[dict[str, Any]], key: str) -> bool:
    """Whether some record of `history` has a number for `key`."""
    return any(isinstance(r.get(key), float) and not math.isnan(r[key]) for r in history)


def reselect(runs: pd.DataFrame, criterion: str) -> tuple[pd.DataFrame, list[str]]:
    """`runs` with their test metrics taken at the evaluation step that `criterion` selects
    from each run's history (ties to the later step, as in training), a `reselected` flag, and
    notes on the rows and runs left without values."""
    from robustbench_mat.evaluation import check_criterion, select

    check_criterion(criterion)
    runs = runs.assign(reselected=False, **{m: float("nan") for m in TEST_METRICS})
    forbidden, notes = _forbidden_regimes(sorted(runs.regime.unique()), criterion)
    missing: dict[str, list[str]] = {}
    for index, run in runs[~runs.regime.isin(forbidden)].iterrows():
        history = run_history(run.artifact_uri)
        if history is None or not _measures(history, criterion):
            reason = (
                f"have no readable {HISTORY_FILE} artifact"
                if history is None
                else f"did not record {criterion} in their {HISTORY_FILE}"
            )
            missing.setdefault(reason, []).append(_run_label(run))
            continue
        record = select(history, criterion)
        for metric, value in leaderboard_metrics(pd.DataFrame([record])).iloc[0].items():
            runs.loc[index, metric] = value
        runs.loc[index, "reselected"] = True
    for reason, labels in missing.items():
        notes.append(
            f"--criterion {criterion}: {len(labels)} final run(s) {reason}, so their steps "
            f"cannot be re-selected and they are left out of their cells: {'; '.join(labels)}"
        )
    return runs, notes


def _forbidden_regimes(regimes: list[str], criterion: str) -> tuple[set[str], list[str]]:
    """The regimes that withhold the group labels `criterion` reads, with one note each."""
    from robustbench_mat.errors import UserError
    from robustbench_mat.regimes import check_criterion_allowed, get_regime

    forbidden, notes = set(), []
    for regime in regimes:
        try:
            check_criterion_allowed(criterion, get_regime(regime))
        except UserError as error:
            forbidden.add(regime)
            notes.append(f"--criterion: {error}; the cells of its rows are left empty")
    return forbidden, notes


def _run_label(run: pd.Series) -> str:
    return f"{run.method} ({run.regime}) on {run.dataset} seed {run.seed}, run {run.run_id}"


def _param_or_nan(runs: pd.DataFrame, name: str) -> pd.Series:
    column = f"params.{name}"
    if column not in runs:
        return pd.Series(float("nan"), index=runs.index)
    return pd.to_numeric(runs[column], errors="coerce")


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


def aggregate(
    runs: pd.DataFrame, average: str = "plain", extra: Sequence[str] = ()
) -> pd.DataFrame:
    """Mean, std and count over seeds (in %) per (regime, method, dataset), of avg, wga and the
    `extra` metrics; with re-selected runs (`reselect`), how many seeds each cell has."""
    metric = AVERAGES[average][0]
    runs = latest_study_only(runs)
    grouped = runs.groupby(["regime", "method", "dataset", "protocol"])
    sources = {"avg": metric, "wga": "test_wga", **{name: name for name in extra}}
    values: dict[str, pd.Series] = {}
    for name, source in sources.items():
        values[name] = grouped[source].mean() * 100
        values[f"{name}_std"] = grouped[source].std(ddof=1) * 100
    values["seeds"] = grouped["seed"].nunique()
    if "reselected" in runs:
        values["seeds_reselected"] = grouped["reselected"].sum().astype(int)
    summary = pd.DataFrame(
        {
            **values,
            "steps": grouped["steps"].max().astype("Int64"),
            "trials": grouped["trials"].max(),
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
    published_datasets: list[str] = field(default_factory=list)
    extra: tuple[str, ...] = ()
    step_criterion: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def metrics(self) -> tuple[str, ...]:
        """The columns of each dataset."""
        return ("avg", "wga", *self.extra)

    def header(self) -> str:
        criteria = ", ".join(sorted({c for c in self.cells["criterion"].dropna() if c}))
        extra = "".join(f"; {EXTRA_METRICS[name]}" for name in self.extra)
        selection = f"Selection criteria: {criteria or 'none'}."
        if self.step_criterion:
            selection = (
                f"Evaluation steps re-selected by {self.step_criterion} from each run's "
                f"{HISTORY_FILE}; configurations (hyperparameters) as tuned under "
                f"{criteria or 'none'}, not re-tuned."
            )
        return (
            f"Test accuracy in %, mean ± std over seeds (number of seeds), of the final runs "
            f"recorded in MLflow. avg: {AVERAGES[self.average][1]}; wga: worst-group accuracy"
            f"{extra}. {selection} tr / va: group labels used "
            f"in training / in validation. budget: training steps per run, tuning trials, "
            f"seeds and protocol of each measured row. Best measured value per column in bold; "
            f"rows marked 'published' are the MAT paper's Table 1 (not measured here)."
        )

    def published_note(self) -> str:
        """Which datasets the shipped published numbers cover, and which shown ones they miss."""
        note = f"published numbers (MAT paper Table 1) for: {', '.join(self.published_datasets)}"
        missing = [d for d in self.datasets if d not in self.published_datasets]
        return note + (f"; none for: {', '.join(missing)}" if missing else "")

    def rows(self, style: str) -> tuple[list[str], list[list[str]]]:
        """Column names and one list of cell texts per (regime, method, source) row."""
        headers = ["tr", "va", "method"]
        for dataset in self.datasets:
            headers += [f"{dataset} {metric}" for metric in self.metrics]
        measured = self.cells[self.cells.source == "measured"]
        if not measured.empty:
            headers.append("budget")
        best = {
            (dataset, metric): measured.loc[measured.dataset == dataset, metric].max()
            for dataset in self.datasets
            for metric in self.metrics
        }
        order = {name: i for i, name in enumerate(REGIMES)}
        keys = self.cells[["regime", "method", "source"]].drop_duplicates()
        keys = keys.assign(
            _regime=keys.regime.map(order), _published=keys.source != "measured"
        ).sort_values(["_regime", "_published", "method"])
        marks = _LATEX_MARKS if style == "latex" else REGIMES
        rows = []
        for regime, method, source in keys[["regime", "method", "source"]].itertuples(index=False):
            label = method if source == "measured" else f"{method} (published)"
            row = [*marks[regime], label]
            mine = self.cells[
                (self.cells.regime == regime)
                & (self.cells.method == method)
                & (self.cells.source == source)
            ]
            for dataset in self.datasets:
                cell = mine[mine.dataset == dataset]
                for metric in self.metrics:
                    row.append(_cell(cell, metric, style, best[(dataset, metric)]))
            if not measured.empty:
                row.append(_budget(mine, style))
            rows.append(row)
        return headers, rows

    def render(self, style: str = "markdown") -> str:
        """The table as `style` (one of FORMATS): csv has one line per (row, dataset) cell."""
        if style not in FORMATS:
            raise ValueError(f"unknown format {style!r}; valid: {', '.join(FORMATS)}")
        if style == "csv":
            return self.cells.to_csv(index=False)
        headers, rows = self.rows(style)
        if style == "latex":
            return self._latex(headers, rows)
        tablefmt = {"markdown": "github", "html": "unsafehtml"}[style]
        return tabulate(rows, headers=headers, tablefmt=tablefmt, disable_numparse=True)

    def _latex(self, headers: list[str], rows: list[list[str]]) -> str:
        """A booktabs tabular, one column group per dataset, text cells escaped by pandas."""
        columns = [("", "tr"), ("", "va"), ("", "method")]
        columns += [(d, m) for d in self.datasets for m in self.metrics]
        columns += [("", name) for name in headers[len(columns) :]]  # the budget, if any
        frame = pd.DataFrame(rows, columns=pd.MultiIndex.from_tuples(columns))
        text = [c for c in columns if c[1] in ("method", "budget")]
        styler = (
            frame.style.hide(axis="index")
            .format(escape="latex", subset=text)
            .format_index(escape="latex", axis=1)
        )
        width = len(self.metrics)
        latex = styler.to_latex(
            hrules=True,
            multicol_align="c",
            column_format="ccl"
            + "r" * width * len(self.datasets)
            + "l" * (len(columns) - 3 - width * len(self.datasets)),
        )
        # A rule under each dataset's name, as booktabs tables have it.
        rules = " ".join(
            f"\\cmidrule(lr){{{4 + width * i}-{3 + width * (i + 1)}}}"
            for i in range(len(self.datasets))
        )
        head, end, body = latex.partition("\\\\\n")
        latex = head + end + (rules + "\n" if rules else "") + body
        return LATEX_PREAMBLE + latex.rstrip("\n")


LATEX_PREAMBLE = "% needs \\usepackage{booktabs} and \\usepackage{amssymb} (for \\checkmark)\n"
_LATEX_MARKS = {
    regime: tuple("$\\checkmark$" if mark == "✓" else "\\texttimes" for mark in marks)
    for regime, marks in REGIMES.items()
}


def _cell(cell: pd.DataFrame, metric: str, style: str, best: float) -> str:
    if cell.empty or pd.isna(cell[metric].iloc[0]):
        return "--" if style == "latex" else "–"
    row = cell.iloc[0]
    text = f"{row[metric]:.1f}"
    if not pd.isna(row[f"{metric}_std"]):
        text += (" $\\pm$ " if style == "latex" else " ± ") + f"{row[f'{metric}_std']:.1f}"
    if row["source"] == "measured":
        text += f" ({_seeds(row)})"
        if row[metric] == best:
            text = _BOLD[style].format(text)
    return text


def _seeds(row: pd.Series) -> object:
    """The number of seeds behind a measured cell: those re-selected, where steps were."""
    reselected = row.get("seeds_reselected")
    return row["seeds"] if reselected is None or pd.isna(reselected) else int(reselected)


def budget_text(cell: pd.Series) -> str:
    """`500 steps, 8 trials, 3 seeds, default` for one measured cell (`?` where unrecorded)."""

    def known(value: object) -> str:
        return "?" if pd.isna(value) else str(int(value))

    return (
        f"{known(cell.get('steps'))} steps, {known(cell.get('trials'))} trials, "
        f"{known(cell.get('seeds'))} seeds, {cell.get('protocol')}"
    )


def _budget(cells: pd.DataFrame, style: str) -> str:
    """A row's budget: one text when every dataset had the same, else one per dataset."""
    measured = cells[cells.source == "measured"]
    if measured.empty:
        return "--" if style == "latex" else "–"
    texts = {row.dataset: budget_text(row) for _, row in measured.iterrows()}
    if len(set(texts.values())) == 1:
        return next(iter(texts.values()))
    return "; ".join(f"{dataset}: {text}" for dataset, text in texts.items())


def build(
    tracking_uri: str,
    average: str = "plain",
    with_published: bool = False,
    datasets: list[str] | None = None,
    *,
    criterion: str | None = None,
    extra: Sequence[str] = (),
) -> Leaderboard:
    """The leaderboard of the final runs in `tracking_uri`; `with_published` adds the paper's
    rows and, unless `datasets` is given, a column for every dataset they cover. `criterion`
    re-selects each run's evaluation step from its history (the configurations stay as tuned);
    `extra` adds columns of `EXTRA_METRICS`."""
    unknown = [name for name in extra if name not in EXTRA_METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; valid: {', '.join(EXTRA_METRICS)}")
    extra = tuple(dict.fromkeys(extra))
    runs, notes = final_runs(tracking_uri), []
    if criterion:
        runs, notes = reselect(latest_study_only(runs), criterion)
    cells = aggregate(runs, average, extra)
    if criterion:
        cells.insert(cells.columns.get_loc("criterion") + 1, "step_criterion", criterion)
    chosen = list(datasets or sorted(cells["dataset"].unique()))
    covered: list[str] = []
    if with_published:
        paper = published()
        covered = sorted(paper.dataset.unique())
        if not datasets:
            chosen += [d for d in covered if d not in chosen]
        cells = pd.concat([cells, paper[paper.dataset.isin(chosen)]], ignore_index=True)
    cells = cells[cells.dataset.isin(chosen)].reset_index(drop=True)
    return Leaderboard(cells, chosen, average, covered, extra, criterion, notes)


REGIME_COLOURS = {"full": "tab:green", "val-only": "tab:orange", "none": "tab:purple"}
PUBLISHED_MARKER = {"marker": "D", "color": "black", "markersize": 5, "linestyle": "none"}
BAR_WIDTH = 0.6
MIN_VISIBLE = 1.5  # a bar lower than this (in %) gets a hatched stub of this height


def _published_wga() -> dict[tuple[str, str, str], tuple[float, float]]:
    """(regime, lower-case method, dataset) -> (published wga, its std or NaN), in %."""
    table = published()
    return {
        (row.regime, row.method.lower(), row.dataset): (row.wga, row.wga_std)
        for row in table.itertuples(index=False)
        if not pd.isna(row.wga)
    }


def chart_figure(board: Leaderboard):
    """Worst-group test accuracy of the measured rows: one panel per dataset, one bar per
    (method, regime) coloured by regime, ± std over seeds, the value and the number of seeds,
    and the MAT paper's published value as a marker beside the bar; returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    measured = board.cells[board.cells.source == "measured"]
    reference = _published_wga()
    order = {name: i for i, name in enumerate(REGIMES)}
    count = max(1, len(board.datasets))
    figure, axes = plt.subplots(1, count, squeeze=False, figsize=(4.8 * count, 4.2))
    any_published = False
    for axis, dataset in zip(axes[0], board.datasets, strict=False):
        part = measured[measured.dataset == dataset]
        part = part.assign(_regime=part.regime.map(order)).sort_values(["_regime", "method"])
        positions = list(range(len(part)))
        for x, row in zip(positions, part.itertuples(index=False), strict=True):
            colour = REGIME_COLOURS.get(row.regime, "tab:gray")
            value = 0.0 if pd.isna(row.wga) else float(row.wga)
            std = 0.0 if pd.isna(row.wga_std) else float(row.wga_std)
            (bar,) = axis.bar(
                x,
                value,
                BAR_WIDTH,
                yerr=std or None,
                color=colour,
                edgecolor="black",
                linewidth=0.6,
                capsize=3,
            )
            bar.set_gid(f"bar:{row.method}:{row.regime}")
            if value < MIN_VISIBLE:  # a zero bar stays visible as a hatched stub
                (stub,) = axis.bar(
                    x,
                    MIN_VISIBLE,
                    BAR_WIDTH,
                    facecolor="none",
                    edgecolor=colour,
                    hatch="////",
                    linewidth=0.8,
                )
                stub.set_gid(f"stub:{row.method}:{row.regime}")
            axis.text(
                x,
                max(value, MIN_VISIBLE) + std + 1.5,
                f"{value:.1f}",
                ha="center",
                va="bottom",
                fontsize=7,
                gid=f"value:{row.method}:{row.regime}",
            )
            base = row.method.split(" [", 1)[0].lower()
            mark = reference.get((row.regime, base, dataset))
            if mark is not None:
                any_published = True
                drawn = axis.errorbar(
                    x + BAR_WIDTH / 2 + 0.12,
                    mark[0],
                    yerr=None if pd.isna(mark[1]) else mark[1],
                    capsize=2,
                    **PUBLISHED_MARKER,
                )
                drawn.lines[0].set_gid(f"published:{row.method}:{row.regime}")
        counts = [_seeds(row) for _, row in part.iterrows()]
        seeds = ["?" if pd.isna(n) else int(n) for n in counts]
        axis.set_xticks(
            positions,
            [f"{m}\nn={n}" for m, n in zip(part.method, seeds, strict=True)],
            fontsize=7,
        )
        axis.axhline(0, color="black", linewidth=0.6)
        axis.set(title=dataset, ylabel="worst-group test accuracy (%)", ylim=(0, 112))
        axis.set_xlim(-0.6, max(len(part), 1) - 0.2)
    shown = set(measured.regime)
    handles = [
        Patch(facecolor=c, edgecolor="black", linewidth=0.6, label=f"regime {r}")
        for r, c in REGIME_COLOURS.items()
        if r in shown or not shown
    ]
    if any_published:
        handles.append(Line2D([], [], label="published (MAT paper Table 1)", **PUBLISHED_MARKER))
    figure.legend(handles=handles, loc="upper center", ncols=len(handles), fontsize=8)
    figure.text(
        0.01,
        0.01,
        "bars: mean ± std over n seeds (value above); hatched: below 1.5 %",
        fontsize=7,
    )
    figure.tight_layout(rect=(0, 0.03, 1, 0.92))
    return figure


def bar_chart(board: Leaderboard, path) -> None:
    """Draw `chart_figure(board)` and save it to `path`."""
    import matplotlib.pyplot as plt

    figure = chart_figure(board)
    figure.savefig(path, dpi=110)
    plt.close(figure)


WORKDIR_TAG = "robustbench.workdir"


def record(board: Leaderboard, workdir, text: str) -> tuple[str, str]:
    """Write `<workdir>/leaderboard/LEADERBOARD.md` and the bar chart, and log both as the
    artifacts of the work directory's one run of the MLflow experiment `leaderboard`, created
    on the first call and updated (artifacts replaced, tags rewritten) on every later one;
    returns (path, run id)."""
    from datetime import datetime, timezone
    from pathlib import Path

    from filelock import FileLock

    from robustbench_mat.tracking import Tracker

    workdir = Path(workdir)
    folder = workdir / "leaderboard"
    folder.mkdir(parents=True, exist_ok=True)
    markdown = folder / "LEADERBOARD.md"
    markdown.write_text(f"# Leaderboard\n\n{board.header()}\n\n{text}\n")
    chart = folder / "worst_group_accuracy.png"
    bar_chart(board, chart)
    tracker = Tracker(workdir)
    with FileLock(folder / ".run.lock"):  # two calls at once still share one run
        existing = leaderboard_run(tracker, workdir)
        calls = 1
        if existing is None:
            run_id = tracker.start(
                "leaderboard",
                "leaderboard",
                {TAGS.KIND: "leaderboard", WORKDIR_TAG: str(workdir)},
                {},
            )
        else:
            run_id = tracker.start(
                "leaderboard", "leaderboard", {}, {}, run_id=existing.info.run_id
            )
            calls = int(existing.data.tags.get("robustbench.calls", "0") or 0) + 1
        tracker.set_tags(
            run_id,
            {
                "robustbench.average": board.average,
                "robustbench.datasets": " ".join(board.datasets),
                "robustbench.calls": calls,
                "robustbench.updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            },
        )
        for path in (markdown, chart):
            tracker.log_artifact(run_id, path)
        tracker.end(run_id, "finished")
    return str(markdown), run_id


def leaderboard_run(tracker: Tracker, workdir: Path) -> Run | None:
    """The work directory's leaderboard run (the oldest, should there be several), or None."""
    experiment = tracker.client.get_experiment_by_name("leaderboard")
    if experiment is None:
        return None
    runs = tracker.client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{TAGS.KIND}` = 'leaderboard'",
        order_by=["attributes.start_time ASC"],
        max_results=1000,
    )
    mine = [run for run in runs if run.data.tags.get(WORKDIR_TAG) == str(workdir)]
    return mine[0] if mine else None
