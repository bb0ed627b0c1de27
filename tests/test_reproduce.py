"""`reproduce table1`: every implemented Table 1 row under --protocol paper, beside the paper."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from upstream_fixtures import write_waterbirds

from robustbench_mat.cli import main
from robustbench_mat.errors import UserError
from robustbench_mat.reproduce import TABLE1_ROWS, comparison, table1_rows


def test_the_rows_are_the_tables_implemented_ones_in_its_regimes():
    assert table1_rows() == list(TABLE1_ROWS)
    assert ("full", "groupdro") in TABLE1_ROWS and ("none", "xrm") in TABLE1_ROWS
    assert table1_rows(["mat"]) == [("val-only", "mat"), ("none", "mat")]
    assert table1_rows(["ula"]) == [("none", "ula")]
    with pytest.raises(UserError, match="no row for cvardro"):
        table1_rows(["cvardro"])


def test_the_comparison_subtracts_the_published_numbers():
    def finals(*pairs):
        runs = [SimpleNamespace(selected={"test_avg": a, "test_wga": w}) for a, w in pairs]
        return SimpleNamespace(final_runs=runs)

    results = [
        ("val-only", "mat", finals((0.90, 0.86), (0.92, 0.88))),  # published 90.4 / 88.1
        ("val-only", "lc", finals((0.80, 0.70))),  # published – / 90.5
    ]
    lines = comparison(results, "waterbirds").splitlines()
    mat = [cell.strip() for cell in lines[2].split("|")[1:-1]]
    assert mat == [
        "val-only",
        "mat",
        "2",
        "91.0 ± 1.4",
        "90.4",
        "+0.6",
        "87.0 ± 1.4",
        "88.1",
        "-1.1",
    ]
    lc = [cell.strip() for cell in lines[3].split("|")[1:-1]]
    assert lc[3:] == ["80.0", "–", "–", "70.0", "90.5", "-20.5"]


@pytest.mark.slow
def test_table1_runs_end_to_end_on_the_waterbirds_fixture(tmp_path: Path, capsys) -> None:
    from robustbench_mat.datasets.waterbirds import Waterbirds
    from robustbench_mat.download import prepare_dataset

    write_waterbirds(tmp_path / "data" / "waterbirds")
    prepare_dataset(Waterbirds, tmp_path / "data", show_progress=False)
    command = ["reproduce", "table1", "--dataset", "waterbirds", "--n-seeds", "2", "--steps", "2"]
    command += ["--data", "weights=none", "image_size=32", "--data-dir", str(tmp_path / "data")]
    command += ["--workdir", str(tmp_path / "work"), "--quiet"]
    assert main(command) == 0
    out = capsys.readouterr().out
    for regime, method in TABLE1_ROWS:
        assert f"| {regime:<8} | {method:<8} | 2 " in out, (regime, method)
    written = tmp_path / "work" / "reproduce" / "table1-waterbirds.md"
    assert "| full     | groupdro | 2 " in written.read_text()
    assert main(command) == 0  # resumed: every study finished, nothing trained again
