"""The issue's acceptance figures on the synthetic task, and resuming after a real SIGKILL."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import only_run_dir, run_dirs
from mlflow import MlflowClient

from robustbench_mat.runner import RunSpec, run
from robustbench_mat.tracking import TAGS
from robustbench_mat.training import CheckpointStore

SCRIPT = shutil.which("robustbench-mat") or str(Path(sys.executable).with_name("robustbench-mat"))
GROUP_KEYS = [f"train_group_acc.y{y}-a{a}" for y in (0, 1) for a in (0, 1)]


def test_erm_memorises_the_minority_and_fails_on_the_worst_group(workdir):
    """With noise dimensions to memorise, ERM fits every training example (train accuracy 1 on
    every group) while relying on the spurious feature: its test worst-group accuracy is low."""
    result = run(RunSpec("erm", "synthetic", workdir=workdir, show_progress=False))
    assert result.final["step"] == 1000
    assert [result.final[key] for key in GROUP_KEYS] == [1.0, 1.0, 1.0, 1.0]
    assert result.final["train_wga"] == 1.0
    assert result.selected["test_wga"] < 0.4
    assert result.selected["test_avg"] > result.selected["test_wga"]


def test_erm_without_noise_learns_the_core_feature(workdir):
    """Without noise dimensions ERM cannot memorise the minority and must learn the core
    feature, which separates the classes perfectly."""
    result = run(
        RunSpec(
            "erm", "synthetic", workdir=workdir, show_progress=False, data_params={"noise_std": 0}
        )
    )
    assert result.hparams["lr"] == 3e-2  # the dataset's default without noise
    assert result.selected["test_wga"] >= 0.98


def _command(workdir: Path) -> list[str]:
    return [
        SCRIPT,
        "run",
        "--method",
        "erm",
        "--dataset",
        "synthetic",
        "--steps",
        "3000",
        "--checkpoint-every",
        "100",
        "--workdir",
        str(workdir),
        "--quiet",
    ]


def _finish(workdir: Path) -> list[str]:
    completed = subprocess.run(_command(workdir), capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert "Traceback" not in completed.stderr
    return completed.stdout.splitlines()


def _wait_for_checkpoint(workdir: Path, process: subprocess.Popen, timeout: float) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(workdir.glob("runs/*/checkpoint.pt"))
        if found:
            return found[0]
        assert process.poll() is None, "the run ended before writing a checkpoint"
        time.sleep(0.05)
    pytest.fail(f"no checkpoint after {timeout} s")


@pytest.mark.slow
def test_sigkill_then_rerun_gives_exactly_the_uninterrupted_result(make_workdir, tmp_path):
    killed_dir, reference_dir = make_workdir("killed"), make_workdir("reference")

    log = (tmp_path / "killed.log").open("w")
    process = subprocess.Popen(_command(killed_dir), stdout=log, stderr=subprocess.STDOUT)
    try:
        checkpoint = _wait_for_checkpoint(killed_dir, process, timeout=120)
        time.sleep(1.0)
        assert process.poll() is None, "the run finished before it could be killed"
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()

    run_dir = checkpoint.parent
    assert not (run_dir / "result.json").exists()
    interrupted_at = CheckpointStore(checkpoint).load()["step"]
    assert 100 <= interrupted_at < 3000 and interrupted_at % 100 == 0
    run_id = (run_dir / "mlflow_run_id").read_text().strip()

    resumed_lines = _finish(killed_dir)
    reference_lines = _finish(reference_dir)

    assert run_dirs(killed_dir) == [run_dir]
    resumed = json.loads((run_dir / "result.json").read_text())
    reference = json.loads((only_run_dir(reference_dir) / "result.json").read_text())
    assert resumed["run_key"] == reference["run_key"]
    assert resumed["selected"] == reference["selected"]
    assert resumed["final"] == reference["final"]
    assert resumed["final"]["step"] == 3000
    assert (run_dir / "history.csv").read_text() == (
        only_run_dir(reference_dir) / "history.csv"
    ).read_text()
    # The printed tables agree too (the last line names each run's own MLflow run).
    assert resumed_lines[:-1] == reference_lines[:-1]

    # The killed MLflow run was resumed, not replaced by a second one.
    assert resumed["run_id"] == run_id
    client = MlflowClient(tracking_uri=f"sqlite:///{killed_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("synthetic")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    assert runs[0].info.status == "FINISHED"
    assert runs[0].data.tags[TAGS.STATE] == "finished"
