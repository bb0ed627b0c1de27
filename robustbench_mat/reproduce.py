"""`robustbench-mat reproduce table1`: one column of the MAT paper's Table 1, end to end.

Every row the harness implements is tuned under `--protocol paper` (the MAT/XRM code's budget,
optimiser, 10-configuration grid and group inference) in the regime the table gives it, and its
best configuration re-run over seeds; the measured rows are then printed beside the published
ones with their difference. Each row is an ordinary study, so an interrupted reproduction resumes
where it stopped and a finished row is not trained again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pandas as pd
from tabulate import tabulate

from robustbench_mat.errors import UserError
from robustbench_mat.tracking import resolve_workdir, tracking_uri
from robustbench_mat.tuning import TuneResult, TuneSpec, base_plan, tune

# (regime, method) of the Table 1 rows the harness implements, in the table's order: all of them
# (EIIL, CnC, LS and BAM of the XRM paper's table have no implementation here).
TABLE1_ROWS = (
    ("full", "groupdro"),
    ("val-only", "erm"),
    ("val-only", "lff"),
    ("val-only", "jtt"),
    ("val-only", "lc"),
    ("val-only", "afr"),
    ("val-only", "mat"),
    ("none", "erm"),
    ("none", "ula"),
    ("none", "xrm"),
    ("none", "mat"),
)


def table1_rows(methods: list[str] | None = None) -> list[tuple[str, str]]:
    """The rows to run: all, or those of `methods`."""
    if not methods:
        return list(TABLE1_ROWS)
    known = {method for _, method in TABLE1_ROWS}
    unknown = sorted(set(methods) - known)
    if unknown:
        raise UserError(
            f"Table 1 has no row for {', '.join(unknown)}; its methods here: "
            f"{', '.join(sorted(known))}"
        )
    return [(regime, method) for regime, method in TABLE1_ROWS if method in methods]


def reproduce_table1(
    spec: TuneSpec, methods: list[str] | None = None, log: Callable[[str], None] = print
) -> tuple[str, Path]:
    """Tune every row for `spec.dataset` (the rest of `spec` applies to every row); returns the
    comparison table and the Markdown file it was written to. A `--steps` override (a smoke test
    on small data) also shortens the group-inference runs unless `--infer-steps` is given."""
    spec = dataclasses.replace(spec, protocol="paper")
    shorten_inference = spec.steps is not None and spec.inference_steps is None
    results = []
    for regime, method in table1_rows(methods):
        log(f"Table 1, {spec.dataset}: {method} in {regime}")
        row = dataclasses.replace(spec, method=method, regime=regime)
        if shorten_inference and base_plan(row).inferrer is not None:
            row = dataclasses.replace(row, inference_steps=spec.steps)
        results.append((regime, method, tune(row, log=log)))
    table = comparison(results, spec.dataset)
    workdir = resolve_workdir(spec.workdir)
    path = workdir / "reproduce" / f"table1-{spec.dataset}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"# Table 1, {spec.dataset}\n\n{HEADER}\n\nMLflow store: {tracking_uri(workdir)}\n\n"
        f"{table}\n"
    )
    return table, path


HEADER = (
    "Test accuracy in %: measured (mean ± std over seeds, `--protocol paper`) beside the MAT "
    "paper's Table 1, and measured minus published. avg: plain test accuracy; wga: worst-group."
)


def comparison(results: list[tuple[str, str, TuneResult]], dataset: str) -> str:
    """A Markdown table: per row, measured and published avg / wga and their differences."""
    from robustbench_mat.leaderboard.table import published

    paper = published()
    paper = paper[paper.dataset == dataset]
    rows = []
    for regime, method, result in results:
        measured = pd.DataFrame([r.selected for r in result.final_runs]) * 100
        match = paper[(paper.regime == regime) & (paper.method.str.lower() == method)]
        cells = [regime, method, len(result.final_runs)]
        for metric in ("avg", "wga"):
            mean, std = measured[f"test_{metric}"].mean(), measured[f"test_{metric}"].std(ddof=1)
            reference = match[metric].iloc[0] if not match.empty else float("nan")
            cells += [_pm(mean, std), _number(reference), _number(mean - reference, signed=True)]
        rows.append(cells)
    headers = ["regime", "method", "seeds"]
    for metric in ("avg", "wga"):
        headers += [f"{metric}", f"{metric} published", f"{metric} Δ"]
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def _pm(mean: float, std: float) -> str:
    return f"{mean:.1f}" if pd.isna(std) else f"{mean:.1f} ± {std:.1f}"


def _number(value: float, signed: bool = False) -> str:
    if pd.isna(value):
        return "–"
    return f"{value:+.1f}" if signed else f"{value:.1f}"
