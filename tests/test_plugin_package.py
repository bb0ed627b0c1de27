"""A method in a separately installed package appears in `list` and runs, with no edit here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import pip_install_offline

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "robustbench-mat-example-plugin"
CLI = Path(sys.executable).with_name("robustbench-mat")


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("plugin-site")
    pip_install_offline(EXAMPLE, target)
    return target


def _cli(args: list[str], plugin_path: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(plugin_path)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([str(CLI), *args], env=env, cwd=cwd, capture_output=True, text=True)


def test_installed_plugin_is_listed_with_its_package(plugin_path: Path, tmp_path: Path) -> None:
    listing = _cli(["list"], plugin_path, tmp_path)
    assert listing.returncode == 0, listing.stderr
    line = next(row for row in listing.stdout.splitlines() if row.startswith("label-smoothing"))
    assert "ERM with label smoothing" in line
    assert "package robustbench-mat-example-plugin 0.1.0" in line


def test_installed_plugin_runs_with_its_own_hyperparameter(plugin_path: Path, tmp_path: Path):
    done = _cli(
        [
            "run",
            "--method",
            "label-smoothing",
            "--dataset",
            "synthetic",
            "--steps",
            "30",
            "--eval-every",
            "10",
            "--set",
            "smoothing=0.2",
            "--quiet",
            "--workdir",
            str(tmp_path / "w"),
        ],
        plugin_path,
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "MLflow run" in done.stdout
    (result,) = (tmp_path / "w" / "runs").glob("*/result.json")
    assert '"smoothing": 0.2' in result.read_text()


def test_plugin_is_absent_without_the_package(tmp_path: Path) -> None:
    listing = subprocess.run([str(CLI), "list"], capture_output=True, text=True, cwd=tmp_path)
    assert listing.returncode == 0
    assert "label-smoothing" not in listing.stdout
