"""The leaderboard's bar chart: bars coloured by regime, value labels, seed counts, published
markers beside the measured bars, and zero bars that stay visible."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import pandas as pd
import pytest
from matplotlib.colors import to_rgba

from robustbench_mat.leaderboard.table import (
    BAR_WIDTH,
    MIN_VISIBLE,
    REGIME_COLOURS,
    Leaderboard,
    bar_chart,
    chart_figure,
    published,
)

matplotlib.use("Agg")

# (regime, method, wga, wga_std, seeds) of the measured rows, the same on both datasets.
ROWS = [
    ("val-only", "erm", 70.0, 2.0, 3),
    ("val-only", "mat", 86.0, 1.0, 3),
    ("full", "groupdro", 0.0, 0.0, 2),
    ("none", "erm", 60.0, float("nan"), 1),
    ("none", "mat [paper]", 80.0, 3.0, 3),
]


def _board() -> Leaderboard:
    """Measured rows on waterbirds (which has published numbers) and synthetic (which has none)."""
    cells = pd.DataFrame(
        [
            {
                "regime": regime,
                "method": method,
                "dataset": dataset,
                "protocol": "default",
                "avg": 90.0,
                "avg_std": 1.0,
                "wga": wga,
                "wga_std": std,
                "seeds": seeds,
                "criterion": "val_wga",
                "source": "measured",
            }
            for dataset in ("waterbirds", "synthetic")
            for regime, method, wga, std, seeds in ROWS
        ]
    )
    return Leaderboard(cells, ["waterbirds", "synthetic"], "plain")


def _by_gid(artists, prefix: str) -> dict[str, object]:
    return {a.get_gid(): a for a in artists if (a.get_gid() or "").startswith(prefix)}


@pytest.fixture
def figure():
    figure = chart_figure(_board())
    yield figure
    matplotlib.pyplot.close(figure)


def test_one_bar_per_method_and_regime_coloured_by_regime(figure) -> None:
    waterbirds, synthetic = figure.axes
    for axis in (waterbirds, synthetic):
        bars = _by_gid(axis.patches, "bar:")
        assert sorted(bars) == sorted(f"bar:{m}:{r}" for r, m, *_ in ROWS)
        for regime, method, wga, *_ in ROWS:
            bar = bars[f"bar:{method}:{regime}"]
            assert bar.get_facecolor() == pytest.approx(to_rgba(REGIME_COLOURS[regime]))
            assert bar.get_height() == pytest.approx(wga)
    # Regimes in the table's order: full, val-only, none.
    ticks = [t.get_text() for t in waterbirds.get_xticklabels()]
    assert ticks == ["groupdro\nn=2", "erm\nn=3", "mat\nn=3", "erm\nn=1", "mat [paper]\nn=3"]
    legend = [t.get_text() for t in figure.legends[0].get_texts()]
    assert legend == [
        "regime full",
        "regime val-only",
        "regime none",
        "published (MAT paper Table 1)",
    ]


def test_value_labels_and_zero_bar_visible(figure) -> None:
    axis = figure.axes[0]
    labels = {gid: text.get_text() for gid, text in _by_gid(axis.texts, "value:").items()}
    assert labels == {f"value:{m}:{r}": f"{w:.1f}" for r, m, w, *_ in ROWS}
    # The zero bar has no height of its own, so a hatched stub marks it.
    stubs = _by_gid(axis.patches, "stub:")
    assert list(stubs) == ["stub:groupdro:full"]
    assert stubs["stub:groupdro:full"].get_height() == pytest.approx(MIN_VISIBLE)
    assert _by_gid(axis.patches, "bar:")["bar:groupdro:full"].get_height() == 0


def test_published_values_as_markers_beside_measured_bars(figure) -> None:
    waterbirds, synthetic = figure.axes
    table = published()
    markers = _by_gid(waterbirds.lines, "published:")
    bars = _by_gid(waterbirds.patches, "bar:")
    assert sorted(markers) == sorted(f"published:{m}:{r}" for r, m, *_ in ROWS)
    for regime, method, *_ in ROWS:
        base = method.split(" [")[0]
        (expected,) = table[
            (table.regime == regime)
            & (table.method.str.lower() == base)
            & (table.dataset == "waterbirds")
        ].wga
        marker = markers[f"published:{method}:{regime}"]
        assert marker.get_ydata()[0] == pytest.approx(expected)
        bar = bars[f"bar:{method}:{regime}"]
        centre = bar.get_x() + BAR_WIDTH / 2
        assert centre + BAR_WIDTH / 2 < marker.get_xdata()[0] < centre + 0.5  # beside, not on
    assert _by_gid(synthetic.lines, "published:") == {}  # no published numbers for synthetic


def test_bar_chart_writes_the_file(tmp_path: Path) -> None:
    path = tmp_path / "chart.png"
    bar_chart(_board(), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not matplotlib.pyplot.get_fignums()  # the figure was closed


def test_the_legend_lists_only_the_regimes_shown() -> None:
    board = _board()
    board.cells = board.cells[board.cells.regime == "val-only"]
    figure = chart_figure(board)
    try:
        legend = [t.get_text() for t in figure.legends[0].get_texts()]
    finally:
        matplotlib.pyplot.close(figure)
    assert [entry for entry in legend if entry.startswith("regime")] == ["regime val-only"]
