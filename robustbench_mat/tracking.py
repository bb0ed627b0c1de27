"""MLflow tracking: one experiment per dataset, one MLflow run per training run.

The tracking store defaults to `sqlite:///<workdir>/mlflow.db` with artifacts under
`<workdir>/artifacts`; `MLFLOW_TRACKING_URI` overrides the store. Every run carries the tags in
`TAGS` so that the leaderboard and the UI can query it. Per-evaluation metrics are logged under
`history/<key>` with their step; the selected step's metrics are logged under their plain keys
(`test_wga`, `val_wga`, ...). A run is FINISHED only once its results are complete: an
interrupted run stays RUNNING (or KILLED / FAILED) with `robustbench.state` telling why.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

ENV_WORKDIR = "ROBUSTBENCH_MAT_WORKDIR"
DEFAULT_WORKDIR = "robustbench-runs"
HISTORY_PREFIX = "history/"
# MLflow's SQL store takes ~0.2 ms per metric value: a run sends at most this many evaluations
# to it (evenly spaced, the last one included); history.csv keeps every evaluation.
MAX_HISTORY_POINTS = 100


class TAGS:
    """Names of the tags every run carries."""

    METHOD = "robustbench.method"
    DATASET = "robustbench.dataset"
    REGIME = "robustbench.regime"
    SEED = "robustbench.seed"
    CRITERION = "robustbench.criterion"
    KIND = "robustbench.kind"  # run | trial | final | leaderboard
    STATE = "robustbench.state"  # running | finished | failed | killed | pruned
    RUN_KEY = "robustbench.run_key"
    FINAL = "robustbench.final"  # "true" on the seed runs of a study's best configuration


def resolve_workdir(workdir: str | Path | None = None) -> Path:
    """`workdir`, else $ROBUSTBENCH_MAT_WORKDIR, else ./robustbench-runs (made absolute)."""
    chosen = workdir or os.environ.get(ENV_WORKDIR) or DEFAULT_WORKDIR
    return Path(chosen).expanduser().resolve()


def tracking_uri(workdir: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{workdir / 'mlflow.db'}"


def _quiet_mlflow_logs() -> None:
    for name in ("alembic", "mlflow.store.db.utils", "mlflow.tracking.fluent"):
        logging.getLogger(name).setLevel(logging.WARNING)


@functools.lru_cache(maxsize=8)
def _client(uri: str) -> Any:
    """One client per store and process: opening a SQL store costs about a second."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


class Tracker:
    """A thin wrapper of `MlflowClient` bound to one work directory."""

    def __init__(self, workdir: Path) -> None:
        _quiet_mlflow_logs()
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.uri = tracking_uri(workdir)
        self.client = _client(self.uri)
        self._pending: list[tuple[str, dict[str, Any]]] = []
        self._logged_through: dict[str, int] = {}

    def experiment_id(self, name: str) -> str:
        """The id of experiment `name`, created on first use."""
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        location = None
        if self.uri.startswith("sqlite:///") and "MLFLOW_TRACKING_URI" not in os.environ:
            location = (self.workdir / "artifacts" / name).as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except MlflowException:  # created meanwhile by another process
            return self.client.get_experiment_by_name(name).experiment_id

    def start(
        self,
        experiment: str,
        run_name: str,
        tags: Mapping[str, Any],
        params: Mapping[str, Any],
        run_id: str | None = None,
    ) -> str:
        """Start a run, or mark the existing `run_id` running again (resume)."""
        from mlflow.entities import Param

        if run_id is not None and self._exists(run_id):
            self.client.update_run(run_id, status="RUNNING")
            self.set_tags(run_id, {TAGS.STATE: "running"})
            logged = self.client.get_metric_history(run_id, HISTORY_PREFIX + "train_loss")
            self._logged_through[run_id] = max((m.step for m in logged), default=0)
            return run_id
        run = self.client.create_run(
            self.experiment_id(experiment),
            run_name=run_name,
            tags={**{k: str(v) for k, v in tags.items()}, TAGS.STATE: "running"},
        )
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(run.info.run_id, params=items[start : start + 100])
        return run.info.run_id

    def _exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
        except MlflowException:
            return False
        return True

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(
        self, run_id: str, metrics: Mapping[str, float], step: int = 0, prefix: str = ""
    ) -> None:
        self.log_many(run_id, [(step, metrics)], prefix)

    def log_many(
        self, run_id: str, records: Iterable[tuple[int, Mapping[str, Any]]], prefix: str = ""
    ) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(prefix + key, float(value), now, int(step))
            for step, record in records
            for key, value in record.items()
            if isinstance(value, (int, float)) and key != "step"
        ]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(run_id, metrics=metrics[start : start + 1000])

    @staticmethod
    def history_stride(n_evaluations: int) -> int:
        """Log every k-th evaluation so that a run sends at most `MAX_HISTORY_POINTS`."""
        return max(1, math.ceil(n_evaluations / MAX_HISTORY_POINTS))

    def buffer_history(self, run_id: str, record: dict[str, Any]) -> None:
        """Hold one evaluation record until `flush` (called at each checkpoint). A resumed run
        re-evaluates the steps after its last checkpoint: those already logged are skipped."""
        if record["step"] > self._logged_through.get(run_id, 0):
            self._pending.append((run_id, record))

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        by_run: dict[str, list[tuple[int, dict[str, Any]]]] = {}
        for run_id, record in pending:
            by_run.setdefault(run_id, []).append((record["step"], record))
        for run_id, records in by_run.items():
            self.log_many(run_id, records, HISTORY_PREFIX)

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def end(self, run_id: str, state: str) -> None:
        """End the run: finished -> FINISHED, failed -> FAILED, killed or pruned -> KILLED."""
        self.set_tags(run_id, {TAGS.STATE: state})
        status = {
            "finished": "FINISHED",
            "failed": "FAILED",
            "killed": "KILLED",
            "pruned": "KILLED",
        }[state]
        self.client.set_terminated(run_id, status=status)


def serve_ui(workdir: Path, port: int = 5000, ready_timeout: float = 120.0) -> int:
    """Run the MLflow UI on 127.0.0.1 against the work directory's store, lean (one worker,
    job execution and telemetry off), print the runs-table URLs and stop cleanly on Ctrl-C."""
    import socket
    import subprocess
    import sys

    uri = tracking_uri(workdir)
    experiments = Tracker(workdir).client.search_experiments()
    env = {
        **os.environ,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        uri,
        "--default-artifact-root",
        (workdir / "artifacts").as_uri(),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    server = subprocess.Popen(command, env=env)
    try:
        deadline = time.time() + ready_timeout
        while True:
            if server.poll() is not None:
                print(
                    f"robustbench-mat: the MLflow server stopped (exit {server.returncode})",
                    file=sys.stderr,
                )
                return 1
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline:
                    server.terminate()
                    print(
                        f"robustbench-mat: the MLflow server did not answer on port {port}",
                        file=sys.stderr,
                    )
                    return 1
                time.sleep(0.5)
        base = f"http://127.0.0.1:{port}"
        print(f"MLflow UI at {base} (store {uri}); Ctrl-C stops it", flush=True)
        for experiment in experiments:
            if experiment.name != "Default":
                print(
                    f"  {experiment.name}: {base}/#/experiments/{experiment.experiment_id}/runs",
                    flush=True,
                )
        server.wait()
        return server.returncode
    except KeyboardInterrupt:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
        print("MLflow UI stopped")
        return 0
