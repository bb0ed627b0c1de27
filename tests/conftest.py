"""Shared fixtures: an isolated environment and a work directory with a migrated MLflow store."""

from __future__ import annotations

import os

# Before anything imports MLflow or Hugging Face: no telemetry, never the network.
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# Idle OpenMP threads sleep instead of spinning. Performance only: on small VMs the default
# spinning makes the first seconds of every process's CPU training ~50x slower. It must be set
# before torch starts its OpenMP runtime, and subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The plugin listing's cache lives in a folder of the test session, not the user's.
os.environ["ROBUSTBENCH_MAT_CACHE_DIR"] = __import__("tempfile").mkdtemp(prefix="rbm-cache-")

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

_ISOLATED_VARIABLES = ("MLFLOW_TRACKING_URI", "ROBUSTBENCH_MAT_WORKDIR")


def pytest_configure(config: pytest.Config) -> None:
    # MLflow's sqlite store triggers this SQLAlchemy deprecation; it is not ours to fix.
    config.addinivalue_line("filterwarnings", "ignore:The ``noload`` loader strategy is deprecated")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every test uses the default sqlite store under its work directory, and runs in its own
    temporary directory so that nothing can land in the repository."""
    for name in _ISOLATED_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow sqlite store created (and migrated, 5-8 s) once for the whole session."""
    from robustbench_mat.tracking import Tracker

    directory = tmp_path_factory.mktemp("mlflow-template")
    with pytest.MonkeyPatch.context() as patch:
        for name in _ISOLATED_VARIABLES:
            patch.delenv(name, raising=False)
        tracker = Tracker(directory)
        tracker.experiment_id("warmup")
    database = directory / "mlflow.db"
    assert database.is_file()
    return database


@pytest.fixture
def workdir(tmp_path: Path, mlflow_template: Path) -> Path:
    """A fresh work directory whose mlflow.db is a copy of the migrated template."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copyfile(mlflow_template, work / "mlflow.db")
    return work


@pytest.fixture
def make_workdir(tmp_path: Path, mlflow_template: Path):
    """A factory of further fresh work directories (for comparing two runs)."""

    def make(name: str) -> Path:
        work = tmp_path / name
        work.mkdir()
        shutil.copyfile(mlflow_template, work / "mlflow.db")
        return work

    return make


@pytest.fixture
def mlflow_uri(workdir: Path) -> str:
    """The tracking URI of the workdir's store (what the runner uses by default)."""
    return f"sqlite:///{workdir / 'mlflow.db'}"
