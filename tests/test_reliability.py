"""Reliability: no stale results, no code run from files, a work directory that survives every
interruption, and one-line errors for a full disk, a locked store or an unusable work directory."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
import torch
from helpers import only_run_dir
from mlflow import MlflowClient

from robustbench_mat.cli import main
from robustbench_mat.errors import RunFailed, UserError
from robustbench_mat.group_inference import InferredGroups
from robustbench_mat.methods.erm import ERM
from robustbench_mat.registry import METHODS
from robustbench_mat.runner import RunSpec, run
from robustbench_mat.tracking import PatientClient, Tracker, resolve_workdir
from robustbench_mat.training import CheckpointStore

PREFIX = "robustbench-mat: error: "
SCRIPT = str(Path(sys.executable).with_name("robustbench-mat"))


def spec(workdir: Path, **overrides) -> RunSpec:
    settings = dict(
        method="erm",
        dataset="synthetic",
        steps=60,
        eval_every=20,
        checkpoint_every=20,
        data_params={"n": 200, "dim": 20},
        show_progress=False,
        workdir=workdir,
    )
    settings.update(overrides)
    return RunSpec(**settings)


def one_line_error(captured) -> str:
    err = captured.err
    assert err.startswith(PREFIX) and err.count("\n") == 1, err
    assert "Traceback" not in captured.out + err
    return err


# --- results are never stale -------------------------------------------------------------------

PLUGIN = '''
from robustbench_mat.methods.erm import ERM
from robustbench_mat.registry import register_method


@register_method("test-edited-loss")
class EditedLoss(ERM):
    """Test-only: ERM whose loss is scaled by a constant that the test edits."""

    def loss(self, batch):
        return {scale} * super().loss(batch)
'''


def load_plugin(path: Path, scale: float) -> None:
    path.write_text(PLUGIN.format(scale=scale))
    module_spec = importlib.util.spec_from_file_location("edited_loss_plugin", path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules["edited_loss_plugin"] = module
    module_spec.loader.exec_module(module)


def test_editing_a_plugin_loss_trains_again_instead_of_reusing(workdir, tmp_path):
    plugin = tmp_path / "edited_loss_plugin.py"
    load_plugin(plugin, 1.0)
    first = run(spec(workdir, method="test-edited-loss"))
    assert run(spec(workdir, method="test-edited-loss")).reused  # same code: reused

    load_plugin(plugin, 0.0)  # the loss no longer trains anything
    second = run(spec(workdir, method="test-edited-loss"))
    assert not second.reused
    assert second.run_key != first.run_key
    assert second.code != first.code
    assert second.final["train_loss"] == 0.0 != first.final["train_loss"]
    METHODS._plugins.pop("test-edited-loss")


def test_a_reused_result_says_when_and_with_which_code(workdir, capsys):
    command = ["run", "--method", "erm", "--dataset", "synthetic", "--workdir", str(workdir)]
    command += ["--steps", "20", "--quiet", "--data", "n=200", "dim=20"]
    assert main(command) == 0
    capsys.readouterr()
    assert main(command) == 0
    out = capsys.readouterr().out
    stored = json.loads((only_run_dir(workdir) / "result.json").read_text())
    assert stored["finished_at"] in out and stored["code"] in out
    assert stored["code"].startswith("robustbench-mat 0.1.0 (code ")


# --- nothing loaded from disk runs code -----------------------------------------------------------


class Payload:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_checkpoint_does_not_run_and_the_run_starts_over(workdir, tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    reference = run(spec(tmp_path / "reference"))
    run_dir = only_run_dir(tmp_path / "reference")
    crafted = spec(workdir)
    target = workdir / "runs" / run_dir.name
    target.mkdir(parents=True)
    torch.save({"step": 40, "method": Payload(marker)}, target / "checkpoint.pt")

    result = run(crafted)
    assert not marker.exists()
    assert "cannot be read" in capsys.readouterr().err
    assert result.final == reference.final


def test_a_crafted_inferred_groups_file_does_not_run(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "inferred_groups.pt"
    torch.save({"version": 1, "inferrer": Payload(marker)}, path)
    with pytest.raises(RunFailed, match="cannot be read as inferred groups"):
        InferredGroups.load(path)
    assert not marker.exists()


@pytest.mark.parametrize("method", ["erm", "groupdro", "jtt", "lff", "lc", "afr", "mat", "rwg"])
def test_every_checkpoint_a_method_writes_loads_as_plain_data(workdir, method, capsys):
    run(spec(workdir, method=method, steps=20, eval_every=10, checkpoint_every=10))
    files = sorted((workdir / "runs").glob("*/*.pt"))
    checkpoints = [
        p for p in files if not p.name.endswith("_model.pt") and "inferred" not in p.name
    ]
    assert checkpoints
    for path in checkpoints:
        assert CheckpointStore(path).load() is not None, path
    for path in (workdir / "runs").glob("*/inferred_groups.pt"):
        InferredGroups.load(path)
    assert "cannot be read" not in capsys.readouterr().err


# --- damaged files: detect, say so, fall back ---------------------------------------------------


def interrupt_at(monkeypatch, step: int) -> None:
    def after_step(self, batch, current):
        if current == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(ERM, "after_step", after_step)


def test_a_truncated_checkpoint_falls_back_to_the_previous_one(workdir, make_workdir, capsys):
    reference = run(spec(make_workdir("reference")))
    with pytest.MonkeyPatch.context() as patch:
        interrupt_at(patch, 50)
        with pytest.raises(KeyboardInterrupt):
            run(spec(workdir))
    run_dir = only_run_dir(workdir)
    checkpoint = run_dir / "checkpoint.pt"
    assert CheckpointStore(checkpoint).load()["step"] == 40
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])  # truncated

    resumed = run(spec(workdir))
    err = capsys.readouterr().err
    assert f"checkpoint {checkpoint} cannot be read" in err and "previous one" in err
    assert resumed.final == reference.final and resumed.selected == reference.selected
    assert not list(run_dir.glob("*.prev.pt"))  # dropped once the run finished


def test_a_truncated_result_is_recorded_again(workdir, capsys):
    first = run(spec(workdir))
    result_file = only_run_dir(workdir) / "result.json"
    result_file.write_text(result_file.read_text()[:50])
    again = run(spec(workdir))
    assert "is unreadable" in capsys.readouterr().err
    assert not again.reused and again.final == first.final
    assert json.loads(result_file.read_text())["final"] == first.final
    assert run(spec(workdir)).reused


# --- a full disk ---------------------------------------------------------------------------------


def test_a_full_disk_fails_in_one_line_and_the_run_resumes(workdir, make_workdir, capsys):
    reference = run(spec(make_workdir("reference")))
    real_save = CheckpointStore.save

    def save_then_fill_the_disk(self, state):
        if state["step"] >= 40:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        real_save(self, state)

    command = ["run", "--method", "erm", "--dataset", "synthetic", "--workdir", str(workdir)]
    command += ["--steps", "60", "--eval-every", "20", "--checkpoint-every", "20", "--quiet"]
    command += ["--data", "n=200", "dim=20"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CheckpointStore, "save", save_then_fill_the_disk)
        assert main(command) == 1
    err = one_line_error(capsys.readouterr())
    assert "no space left on device" in err and "run the same command again" in err
    run_dir = only_run_dir(workdir)
    assert CheckpointStore(run_dir / "checkpoint.pt").load()["step"] == 20
    assert not (run_dir / "checkpoint.tmp").exists()

    assert main(command) == 0
    assert json.loads((run_dir / "result.json").read_text())["final"] == reference.final


def test_a_full_store_fails_in_one_line(workdir, capsys, monkeypatch):
    from sqlalchemy.exc import OperationalError

    def full(*args, **kwargs):
        raise OperationalError("INSERT", {}, sqlite3.OperationalError("database or disk is full"))

    monkeypatch.setattr(Tracker, "flush", full)
    command = ["run", "--method", "erm", "--dataset", "synthetic", "--workdir", str(workdir)]
    assert main(command + ["--steps", "20", "--quiet", "--data", "n=200", "dim=20"]) == 1
    assert "no space left on device" in one_line_error(capsys.readouterr())


def test_checkpoint_save_writes_nothing_on_a_full_disk(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path / "checkpoint.pt")
    store.save({"step": 1})
    real_open = open

    def full_open(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        if "w" in mode:
            handle.write = lambda data: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full"))
        return handle

    monkeypatch.setattr("builtins.open", full_open)
    with pytest.raises(OSError) as caught:
        store.save({"step": 2})
    monkeypatch.undo()
    assert caught.value.errno == errno.ENOSPC
    assert store.load() == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


# --- the MLflow store ---------------------------------------------------------------------------


def test_a_locked_store_is_waited_for_then_fails_in_one_line(workdir, monkeypatch):
    tracker = Tracker(workdir)
    run_id = tracker.start("synthetic", "r", {}, {})
    holder = sqlite3.connect(
        workdir / "mlflow.db", timeout=0, isolation_level=None, check_same_thread=False
    )
    holder.execute("BEGIN EXCLUSIVE")

    patient = PatientClient(tracker.client._client, tracker.uri, patience=1.0)
    started = time.monotonic()
    with pytest.raises(UserError, match="stayed locked by another process for 1 s"):
        patient.set_tag(run_id, "k", "v")
    assert time.monotonic() - started < 30

    threading.Timer(1.0, lambda: holder.execute("COMMIT")).start()
    PatientClient(tracker.client._client, tracker.uri, patience=60).set_tag(run_id, "k", "v")
    assert MlflowClient(tracker.uri).get_run(run_id).data.tags["k"] == "v"


@pytest.mark.parametrize("cache", ["new", "unwritable"])
def test_a_store_killed_while_being_created_is_created_again(tmp_path, monkeypatch, cache):
    """Killed during MLflow's migrations: those of the cached empty store that new stores copy,
    or, where the cache folder cannot be written, those of the store itself."""
    work = tmp_path / "work"
    if cache == "new":
        folder = tmp_path / "cache"
        migrating = folder / f".mlflow-{mlflow.__version__}-empty.db.building"
    else:
        (tmp_path / "file").write_text("")
        folder = tmp_path / "file" / "cache"
        migrating = work / ".mlflow.db.creating"
    monkeypatch.setenv("ROBUSTBENCH_MAT_CACHE_DIR", str(folder))
    code = (
        "import sys; from pathlib import Path; from robustbench_mat.tracking import Tracker; "
        "Tracker(Path(sys.argv[1]))"
    )
    process = subprocess.Popen([sys.executable, "-c", code, str(work)])
    deadline = time.time() + 60
    while not migrating.exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.1)  # part-way through the migrations (they take about 1 s here)
    process.kill()
    process.wait()
    assert not (work / "mlflow.db").exists()  # never a half-made store under the real name
    assert not list(folder.glob("mlflow-*-empty.db"))  # nor a half-made empty store

    tracker = Tracker(work)
    assert tracker.experiment_id("synthetic")
    assert not (work / ".mlflow.db.creating").exists()
    if cache == "new":
        assert {p.name for p in folder.iterdir()} == {
            f"mlflow-{mlflow.__version__}-empty.db",
            f"mlflow-{mlflow.__version__}-empty.db.lock",
        }


def test_two_identical_first_commands_at_once_record_one_run(tmp_path):
    work = tmp_path / "fresh"
    command = [SCRIPT, "run", "--method", "erm", "--dataset", "synthetic", "--workdir", str(work)]
    command += ["--steps", "40", "--quiet", "--data", "n=200", "dim=20"]
    processes = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    assert sum("had already finished" in out for out, _ in outputs) == 1, outputs
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("synthetic")
    assert len(client.search_runs([experiment.experiment_id])) == 1


# --- artifacts stay under the work directory ---------------------------------------------------


def test_artifacts_stay_in_the_workdir_with_a_tracking_uri_set(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'elsewhere.db'}")
    result = run(spec(tmp_path / "work", steps=20))
    assert not (tmp_path / "mlruns").exists()  # the current directory (see conftest)
    uri = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(result.run_id).info.artifact_uri
    assert uri.startswith((tmp_path / "work" / "artifacts").as_uri())
    assert list((tmp_path / "work" / "artifacts").rglob("history.csv"))


# --- the work directory is checked up front ---------------------------------------------------


def test_a_workdir_that_is_a_file_fails_in_one_line(tmp_path, capsys):
    file = tmp_path / "a-file"
    file.write_text("")
    command = ["run", "--method", "erm", "--dataset", "synthetic", "--workdir", str(file / "sub")]
    assert main(command) == 2
    assert "is a file, not a directory" in one_line_error(capsys.readouterr())


def test_a_read_only_workdir_fails_in_one_line(tmp_path, capsys):
    folder = tmp_path / "read-only"
    folder.mkdir()
    mounted = False
    if os.geteuid() == 0:  # root writes through permissions: use a read-only mount
        mount = ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)]
        mounted = subprocess.run(mount, capture_output=True).returncode == 0
        if not mounted:
            pytest.skip("running as root and cannot mount a read-only file system here")
    else:
        folder.chmod(0o555)
    try:
        with pytest.raises(UserError, match="is not writable"):
            resolve_workdir(folder / "work")
        command = ["run", "--method", "erm", "--dataset", "synthetic", "--workdir", str(folder)]
        assert main(command) == 2
        assert "is not writable" in one_line_error(capsys.readouterr())
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], check=True)
        folder.chmod(0o755)


def test_the_leaderboard_leaves_no_stray_mlruns(tmp_path, monkeypatch, capsys):
    from robustbench_mat.tuning import TuneSpec, tune

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'elsewhere.db'}")
    work = tmp_path / "work"
    settings = dict(trials=1, seeds=1, steps=10, eval_every=10, data_params={"n": 200, "dim": 20})
    tune(TuneSpec(method="erm", dataset="synthetic", workdir=str(work), **settings), log=print)
    assert main(["leaderboard", "--workdir", str(work)]) == 0
    assert "erm" in capsys.readouterr().out
    assert not (tmp_path / "mlruns").exists()
    assert (work / "artifacts" / "leaderboard").is_dir()
