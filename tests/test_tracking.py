"""What a run records in MLflow: tags, params, final and per-evaluation metrics, artifacts."""

from __future__ import annotations

import json
import logging
import math
import sqlite3

import mlflow
import mlflow.store.db.utils
import pandas as pd
import pytest
import sqlalchemy
from helpers import only_run_dir
from mlflow import MlflowClient
from mlflow.entities import Metric

from robustbench_mat import tracking
from robustbench_mat.provenance import package_version
from robustbench_mat.runner import RunSpec, run
from robustbench_mat.tracking import TAGS, Tracker, resolve_workdir, tracking_uri

STEPS, EVAL_EVERY = 100, 20
EVAL_STEPS = list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))


def spec(workdir, **overrides):
    settings = dict(
        method="erm",
        dataset="synthetic",
        steps=STEPS,
        eval_every=EVAL_EVERY,
        show_progress=False,
        workdir=workdir,
        hparams={"lr": "0.02"},
    )
    settings.update(overrides)
    return RunSpec(**settings)


@pytest.fixture
def finished(workdir, mlflow_uri):
    """One finished run, and the MLflow client of its store."""
    result = run(spec(workdir))
    return result, MlflowClient(tracking_uri=mlflow_uri)


def search_erm_runs(uri):
    """`mlflow.search_runs` through the global tracking URI, reset afterwards."""
    mlflow.set_tracking_uri(uri)
    try:
        return mlflow.search_runs(
            experiment_names=["synthetic"], filter_string="tags.`robustbench.method` = 'erm'"
        )
    finally:
        mlflow.set_tracking_uri(None)


def test_run_is_found_by_its_tags_with_status_finished(finished, workdir, mlflow_uri):
    result, _ = finished
    assert result.tracking_uri == mlflow_uri == tracking_uri(workdir)
    runs = search_erm_runs(mlflow_uri)
    assert len(runs) == 1
    row = runs.iloc[0]
    assert row["run_id"] == result.run_id
    assert row["status"] == "FINISHED"
    assert row[f"tags.{TAGS.STATE}"] == "finished"
    assert row[f"tags.{TAGS.DATASET}"] == "synthetic"
    assert row[f"tags.{TAGS.REGIME}"] == "val-only"
    assert row[f"tags.{TAGS.SEED}"] == "0"
    assert row[f"tags.{TAGS.CRITERION}"] == "val_wga"
    assert row[f"tags.{TAGS.KIND}"] == "run"
    assert row[f"tags.{TAGS.RUN_KEY}"] == result.run_key
    assert row["tags.robustbench.selected_step"] == str(result.selected_step)
    assert row["tags.mlflow.runName"] == "erm val-only seed 0"
    assert (only_run_dir(workdir) / "mlflow_run_id").read_text() == result.run_id


def test_params_describe_the_run(finished):
    result, client = finished
    params = client.get_run(result.run_id).data.params
    assert params["lr"] == "0.02"
    assert params["batch_size"] == "0"
    assert params["optimizer"] == "sgd"
    assert params["method"] == "erm"
    assert params["dataset"] == "synthetic"
    assert params["regime"] == "val-only"
    assert params["seed"] == "0"
    assert params["criterion"] == "val_wga"
    assert params["steps"] == str(STEPS)
    assert params["eval_every"] == str(EVAL_EVERY)
    assert params["device"] == "cpu"
    assert params["package_version"] == package_version() == "0.1.0"
    assert params["data.noise_std"] == "0.5"
    assert params["data.n"] == "1000"


def test_final_metrics_are_the_selected_step(finished):
    result, client = finished
    metrics = client.get_run(result.run_id).data.metrics
    for key in ("test_wga", "test_avg", "val_wga", "val_avg", "train_wga", "val_worst_class"):
        assert metrics[key] == result.selected[key], key
    assert metrics["selected_step"] == result.selected_step == result.selected["step"]
    history = client.get_metric_history(result.run_id, "test_wga")
    assert [(m.step, m.value) for m in history] == [(STEPS, result.selected["test_wga"])]
    assert "step" not in metrics


def test_history_metrics_have_one_entry_per_evaluation(finished, workdir):
    result, client = finished
    csv = pd.read_csv(only_run_dir(workdir) / "history.csv")
    assert csv["step"].tolist() == EVAL_STEPS
    for key in ("val_wga", "test_wga", "train_loss", "val_group_acc.y1-a0"):
        history = client.get_metric_history(result.run_id, f"history/{key}")
        assert sorted(m.step for m in history) == EVAL_STEPS, key
        by_step = {m.step: m.value for m in history}
        assert [by_step[s] for s in EVAL_STEPS] == pytest.approx(csv[key].tolist(), rel=1e-12)
    final = client.get_metric_history(result.run_id, "history/val_wga")
    assert {m.step: m.value for m in final}[STEPS] == result.final["val_wga"]


def test_artifacts_hold_the_models_and_the_history(finished, workdir):
    result, client = finished
    top = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"checkpoints", "history.csv"} <= top
    checkpoints = {a.path for a in client.list_artifacts(result.run_id, "checkpoints")}
    assert checkpoints == {"checkpoints/selected_model.pt", "checkpoints/final_model.pt"}
    # Artifacts live under the work directory, next to the store.
    local = client.download_artifacts(result.run_id, "history.csv")
    assert open(local).read() == (only_run_dir(workdir) / "history.csv").read_text()
    experiment = client.get_experiment_by_name("synthetic")
    assert experiment.artifact_location == (workdir / "artifacts" / "synthetic").as_uri()
    assert (workdir / "artifacts" / "synthetic").is_dir()


def test_result_json_matches_the_returned_result(finished, workdir):
    result, _ = finished
    stored = json.loads((only_run_dir(workdir) / "result.json").read_text())
    assert stored["run_id"] == result.run_id
    assert stored["selected"] == result.selected
    assert stored["final"] == result.final
    assert stored["reused"] is False
    assert stored["hparams"]["lr"] == 0.02


def test_identical_second_run_is_reused_without_a_new_mlflow_run(finished, workdir, mlflow_uri):
    result, client = finished
    again = run(spec(workdir))
    assert again.reused is True
    assert again.run_id == result.run_id
    assert again.selected == result.selected
    assert again.final == result.final
    assert len(search_erm_runs(mlflow_uri)) == 1
    assert client.get_run(result.run_id).info.status == "FINISHED"


def test_a_different_seed_is_a_second_run(finished, workdir, mlflow_uri):
    result, _ = finished
    other = run(spec(workdir, seed=1))
    assert not other.reused
    assert other.run_id != result.run_id
    runs = search_erm_runs(mlflow_uri)
    assert sorted(runs["run_id"]) == sorted([result.run_id, other.run_id])
    assert sorted(runs[f"tags.{TAGS.SEED}"]) == ["0", "1"]


def test_extra_tags_and_kind_are_recorded(workdir, mlflow_uri):
    result = run(spec(workdir, kind="trial", tags={"study": "s1"}, steps=20))
    tags = MlflowClient(tracking_uri=mlflow_uri).get_run(result.run_id).data.tags
    assert tags[TAGS.KIND] == "trial"
    assert tags["study"] == "s1"


def test_tracker_reuses_experiments_and_ends_runs(workdir):
    tracker = Tracker(workdir)
    first = tracker.experiment_id("toy")
    assert tracker.experiment_id("toy") == first
    run_id = tracker.start("toy", "a run", {TAGS.METHOD: "x"}, {"p": 1})
    assert tracker.start("toy", "ignored", {}, {}, run_id=run_id) == run_id
    tracker.end(run_id, "killed")
    ended = tracker.client.get_run(run_id)
    assert ended.info.status == "KILLED"
    assert ended.data.tags[TAGS.STATE] == "killed"
    assert ended.data.params == {"p": "1"}
    # A stale run id (e.g. from another store) starts a new run.
    assert tracker.start("toy", "new", {}, {}, run_id="0" * 32) != run_id


def test_tracker_buffers_history_until_flush(workdir):
    tracker = Tracker(workdir)
    run_id = tracker.start("toy", "buffered", {}, {})
    tracker.buffer_history(run_id, {"step": 5, "val_wga": 0.25, "note": "text"})
    assert tracker.client.get_metric_history(run_id, "history/val_wga") == []
    tracker.flush()
    history = tracker.client.get_metric_history(run_id, "history/val_wga")
    assert [(m.step, m.value) for m in history] == [(5, 0.25)]
    assert "history/note" not in tracker.client.get_run(run_id).data.metrics
    tracker.flush()  # nothing pending: nothing logged twice
    assert len(tracker.client.get_metric_history(run_id, "history/val_wga")) == 1


def _stored_metrics(tracker):
    """Every metric row and latest value of the store, without the timestamps."""
    store = tracker.client._client._tracking_client.store
    with store.ManagedSessionMaker() as session:
        return [
            sorted(session.execute(sqlalchemy.text(f"SELECT {columns} FROM {table}")).all())
            for table, columns in (
                ("metrics", "run_uuid, key, value, step, is_nan"),
                ("latest_metrics", "run_uuid, key, value, step, is_nan"),
            )
        ]


def test_history_is_inserted_in_one_statement_as_log_batch_would(tmp_path, monkeypatch):
    def history(first, last):
        return [
            (step, {"val_wga": step % 7 / 7, "nan": math.nan, "inf": math.inf, "text": "t"})
            for step in range(first, last)
        ]

    stored = []
    for fast in (True, False):
        if not fast:
            monkeypatch.setattr(tracking, "_insert_metrics", lambda *args: False)
        tracker = Tracker(tmp_path / str(fast))
        run_id = tracker.start("toy", "history", {}, {}, run_id=None)
        tracker.log_many(run_id, history(1, 60), "history/")
        tracker.log_many(run_id, history(20, 30), "history/")  # older steps: latest stays
        tracker.log_many(run_id, [(3, {"a": 1.0}), (3, {"a": 1.0})])  # logged once
        tracker.log_metrics(run_id, {"val_wga": 0.5}, step=100)
        rows = _stored_metrics(tracker)
        stored.append([[(r[1:]) for r in table] for table in rows])  # run ids differ
        last = tracker.client.get_run(run_id).data.metrics
        assert last["history/val_wga"] == 59 % 7 / 7 and last["a"] == 1.0
    assert stored[0] == stored[1]
    assert len(stored[0][0]) == (59 + 10) * 3 + 1 + 1


def test_history_falls_back_to_log_batch_on_a_duplicate(workdir, monkeypatch):
    tracker = Tracker(workdir)
    run_id = tracker.start("toy", "duplicate", {}, {})
    monkeypatch.setattr(tracking.time, "time", lambda: 1000.0)  # the same timestamps twice
    records = [(step, {"val_wga": 0.5}) for step in range(1, 11)]
    tracker.log_many(run_id, records, "history/")
    assert not tracking._insert_metrics(
        tracker.client, run_id, [Metric("history/val_wga", 0.5, 1_000_000, 1)] * 2
    )  # an exact duplicate of a stored value: left to log_batch, which skips it
    tracker.log_many(run_id, records, "history/")
    assert len(tracker.client.get_metric_history(run_id, "history/val_wga")) == 10


def test_a_new_store_is_made_unsynced_then_synced_and_renamed(tmp_path, monkeypatch):
    listened = []
    real_listen = sqlalchemy.event.listen

    def listen(target, name, function, *args, **kwargs):
        if target is sqlalchemy.engine.Engine and name == "connect":
            listened.append(function)
        real_listen(target, name, function, *args, **kwargs)

    monkeypatch.setattr(sqlalchemy.event, "listen", listen)
    tracker = Tracker(tmp_path / "work")
    assert tracker.experiment_id("toy")
    assert not (tmp_path / "work" / ".mlflow.db.creating").exists()
    # The creation's connection hook is gone: the store itself syncs and journals as usual.
    assert listened
    assert not any(
        sqlalchemy.event.contains(sqlalchemy.engine.Engine, "connect", f) for f in listened
    )
    with sqlite3.connect(tmp_path / "work" / "mlflow.db") as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("delete",)
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
    assert {"runs", "metrics", "latest_metrics", "alembic_version"} <= tables


def _store_contents(path):
    """Every table's schema and rows of the sqlite store `path`, timestamps left out. Each
    statement's lines are sorted: MLflow's migrations write a table's constraints in an order
    that varies from one run to the next."""
    with sqlite3.connect(path) as connection:
        schema = sorted(
            (kind, name, sorted(line.strip(" \t,") for line in (sql or "").splitlines()))
            for kind, name, sql in connection.execute("SELECT type, name, sql FROM sqlite_master")
        )
        tables = [name for kind, name, _ in schema if kind == "table"]
        rows = {
            table: sorted(map(repr, connection.execute(f'SELECT * FROM "{table}"')))
            for table in tables
            if table != "experiments"
        }
        rows["experiments"] = list(
            connection.execute(
                "SELECT experiment_id, name, artifact_location, lifecycle_stage FROM experiments"
            )
        )
    return schema, rows


def test_new_stores_copy_one_empty_store_that_mlflow_made(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUSTBENCH_MAT_CACHE_DIR", str(tmp_path / "cache"))
    migrations = []
    real = mlflow.store.db.utils._initialize_tables
    monkeypatch.setattr(
        mlflow.store.db.utils, "_initialize_tables", lambda e: (migrations.append(e), real(e))
    )
    for name in ("one", "two", "three"):
        tracking.ensure_store(f"sqlite:///{tmp_path / name}.db", str(tmp_path / f"art-{name}"))
    assert len(migrations) == 1  # the cached empty store's; each new store is its copy
    assert len(list((tmp_path / "cache").glob("mlflow-*-empty.db"))) == 1

    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    direct = tmp_path / "direct.db"  # what MLflow itself makes of an empty file
    SqlAlchemyStore(f"sqlite:///{direct}", str(tmp_path / "art-two")).engine.dispose()
    assert len(migrations) == 2
    schema, rows = _store_contents(direct)
    assert rows["experiments"] == [(0, "Default", str(tmp_path / "art-two" / "0"), "active")]
    assert _store_contents(tmp_path / "two.db") == (schema, rows)
    assert _store_contents(tmp_path / "three.db")[1]["experiments"] == [
        (0, "Default", str(tmp_path / "art-three" / "0"), "active")
    ]


def test_a_damaged_or_unwritable_cached_empty_store_still_gives_a_store(
    tmp_path, monkeypatch, caplog
):
    monkeypatch.setenv("ROBUSTBENCH_MAT_CACHE_DIR", str(tmp_path / "cache"))
    first = tmp_path / "first.db"
    tracking.ensure_store(f"sqlite:///{first}", str(tmp_path / "art"))
    (template,) = (tmp_path / "cache").glob("mlflow-*-empty.db")
    schema = _store_contents(first)[0]
    template.write_bytes(b"not a database")  # made again before use
    assert Tracker(tmp_path / "work").experiment_id("toy")
    assert _store_contents(tmp_path / "work" / "mlflow.db")[0] == schema
    assert _store_contents(template)[0] == schema

    with sqlite3.connect(template) as connection:  # a database MLflow refuses when it opens it
        connection.execute("UPDATE alembic_version SET version_num = 'elsewhere'")
    with caplog.at_level(logging.WARNING, logger="robustbench_mat.tracking"):
        assert Tracker(tmp_path / "refused").experiment_id("toy")
    assert "cached empty MLflow store" in caplog.text and "could not be used" in caplog.text
    assert "out-of-date database schema" in caplog.text  # MLflow's reason
    assert _store_contents(tmp_path / "refused" / "mlflow.db")[0] == schema
    assert not template.exists()  # made again by the next new store
    tracking.ensure_store(f"sqlite:///{tmp_path / 'next.db'}", str(tmp_path / "art"))
    assert _store_contents(template)[0] == schema

    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("ROBUSTBENCH_MAT_CACHE_DIR", str(tmp_path / "not-a-folder"))
    assert Tracker(tmp_path / "other").experiment_id("toy")


def test_workdir_resolution(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert resolve_workdir() == tmp_path.resolve() / "robustbench-runs"
    monkeypatch.setenv("ROBUSTBENCH_MAT_WORKDIR", str(tmp_path / "env"))
    assert resolve_workdir() == tmp_path / "env"
    assert resolve_workdir(tmp_path / "given") == tmp_path / "given"
    assert tracking_uri(tmp_path) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    assert tracking_uri(tmp_path) == "sqlite:///elsewhere.db"
