"""The MAT paper's synthetic experiments, reproduced through the same runner, registry, loop
and methods as every other run (`robustbench-mat experiment figure1|figure3`)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

from tabulate import tabulate

from robustbench_mat.tracking import TAGS, Tracker


def mean_std(values: Sequence[float], digits: int = 3) -> str:
    """'0.897 ± 0.012' over seeds (just the value for one seed)."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def log_experiment(
    workdir: Path,
    name: str,
    metrics: dict[str, float],
    files: list[Path],
    params: dict[str, str],
    tags: dict[str, str] | None = None,
) -> str:
    """Record an experiment's summary as one MLflow run of experiment `experiments`."""
    tracker = Tracker(workdir)
    run_id = tracker.start("experiments", name, {TAGS.KIND: "experiment", **(tags or {})}, params)
    tracker.log_metrics(run_id, metrics)
    for path in files:
        tracker.log_artifact(run_id, path)
    tracker.end(run_id, "finished")
    return run_id


def markdown_table(rows: list[list], headers: list[str]) -> str:
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)
