"""MLflow tracking: one experiment per dataset, one MLflow run per training run.

The tracking store defaults to `sqlite:///<workdir>/mlflow.db` with artifacts under
`<workdir>/artifacts`; `MLFLOW_TRACKING_URI` overrides the store. Every run carries the tags in
`TAGS` so that the leaderboard and the UI can query it. Per-evaluation metrics are logged under
`history/<key>` with their step; the selected step's metrics are logged under their plain keys
(`test_wga`, `val_wga`, ...). A run is FINISHED only once its results are complete: an
interrupted run stays RUNNING (or KILLED / FAILED) with `robustbench.state` telling why.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from filelock import FileLock

from robustbench_mat.errors import UserError

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
    # run | trial | final | group-inference | experiment | study | leaderboard
    KIND = "robustbench.kind"
    STATE = "robustbench.state"  # running | finished | failed | killed | pruned
    RUN_KEY = "robustbench.run_key"
    PROTOCOL = "robustbench.protocol"  # default | paper
    FINAL = "robustbench.final"  # "true" on the seed runs of a study's best configuration


def resolve_workdir(workdir: str | Path | None = None) -> Path:
    """`workdir`, else $ROBUSTBENCH_MAT_WORKDIR, else ./robustbench-runs (made absolute),
    checked before any work: it must be a writable directory, or creatable in one."""
    chosen = Path(workdir or os.environ.get(ENV_WORKDIR) or DEFAULT_WORKDIR)
    resolved = chosen.expanduser().resolve()
    existing = next(p for p in (resolved, *resolved.parents) if p.exists())
    fix = f"pass another --workdir (or set ${ENV_WORKDIR})"
    if not existing.is_dir():
        raise UserError(f"work directory {resolved}: {existing} is a file, not a directory; {fix}")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as error:
        raise UserError(
            f"work directory {resolved}: {existing} is not writable ({error.strerror}); {fix}"
        ) from None
    return resolved


def tracking_uri(workdir: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{workdir / 'mlflow.db'}"


def artifact_root(workdir: Path, uri: str) -> str | None:
    """Where new experiments keep their artifacts: under the work directory, unless the store
    is a tracking server, whose own artifact root then applies."""
    if uri.startswith(("http://", "https://", "databricks")):
        return None
    return (workdir / "artifacts").as_uri()


def _sqlite_path(uri: str) -> Path | None:
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri == prefix + ":memory:":
        return None
    return Path(uri[len(prefix) :].split("?")[0])


def ensure_store(uri: str, default_artifact_root: str | None) -> None:
    """Create a new sqlite store atomically: its tables are made in a temporary file under an
    exclusive lock, then renamed into place, so that a process killed half-way (or two first
    commands at once) can never leave a half-migrated database behind."""
    path = _sqlite_path(uri)
    if path is None or path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock"):
        if path.exists():  # created meanwhile by another process
            return
        creating = path.with_name(f".{path.name}.creating")
        _quiet_mlflow_logs()
        _new_store(creating, default_artifact_root or "./mlruns")
        _sync_and_rename(creating, path)  # durable before it takes the store's name


def _sync_and_rename(temporary: Path, path: Path) -> None:
    with open(temporary, "rb+") as file:
        os.fsync(file.fileno())
    os.replace(temporary, path)


def _new_store(path: Path, artifact_root: str) -> None:
    """Make an MLflow store in the file `path`. Its tables come from a copy of `_empty_store()`
    (MLflow's own migrations, run once per MLflow version; they took 0.82 s a store, the copy
    0.036 s: `benchmarks/bench_new_store.py`); MLflow then checks the copy's schema version and
    adds the default experiment, as it does for any store. Where the copy fails or MLflow
    refuses it, the migrations run in `path` itself."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    uri = f"sqlite:///{path}"

    def open_store() -> None:  # MLflow runs its migrations if the file has no tables
        with _unsynced_sqlite(path):
            SqlAlchemyStore(uri, artifact_root).engine.dispose()

    path.unlink(missing_ok=True)
    template = _empty_store()
    try:
        if template is not None:
            shutil.copyfile(template, path)
        open_store()
    except Exception as error:
        if template is None:
            raise
        logging.getLogger(__name__).warning(
            "the cached empty MLflow store %s could not be used (%s); making the tables anew",
            template,
            str(error).splitlines()[0] if str(error) else type(error).__name__,
        )
        # MLflow keeps one engine per URI; the refused one still holds the copy open.
        refused = getattr(SqlAlchemyStore, "_engine_map", {}).pop(uri, None)
        if refused is not None:
            refused.dispose()
        template.unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        open_store()


def _empty_store() -> Path | None:
    """An sqlite file holding MLflow's tables at this MLflow version's schema and nothing else
    (no experiment: the default one names the store's own artifact folder), made once in the
    cache folder (`registry.cache_folder()`). None where that folder cannot be written."""
    import mlflow
    import sqlalchemy

    try:
        from mlflow.store.db.utils import _initialize_tables
    except ImportError:  # another MLflow layout: every store runs the migrations itself
        return None
    from robustbench_mat.registry import cache_folder

    template = cache_folder() / f"mlflow-{mlflow.__version__}-empty.db"
    if _readable_store(template):
        return template
    try:
        template.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{template}.lock"):
            if _readable_store(template):
                return template
            building = template.with_name(f".{template.name}.building")
            building.unlink(missing_ok=True)
            with _unsynced_sqlite(building):
                engine = sqlalchemy.create_engine(f"sqlite:///{building}")
                try:
                    _initialize_tables(engine)
                finally:
                    engine.dispose()
            _sync_and_rename(building, template)
    except OSError:
        return None
    return template


def _readable_store(path: Path) -> bool:
    """Whether `path` is an sqlite file with a schema version (MLflow retries opening a file
    that is not a database for about 100 s before it fails)."""
    if not path.is_file():
        return False
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as database:
            return database.execute("SELECT count(*) FROM alembic_version").fetchone() == (1,)
    except sqlite3.Error:
        return False


@contextlib.contextmanager
def _unsynced_sqlite(path: Path) -> Iterator[None]:
    """While the schema of a new store is made in the temporary file `path`, sqlite neither
    syncs nor journals it to disk: MLflow's migrations commit dozens of times, and each sync
    cost (measured on a 2-core VM) about 60 ms, 2.5 of the 3.3 s of creating a store. The file
    is synced once, whole, before it is renamed into place; a crash before that leaves only the
    temporary file, which the next attempt deletes."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    target = os.path.realpath(path)

    def on_connect(connection: Any, _record: Any) -> None:
        cursor = connection.cursor()
        try:
            files = [row[2] for row in cursor.execute("PRAGMA database_list")]
            if files and files[0] and os.path.realpath(files[0]) == target:
                cursor.execute("PRAGMA synchronous = OFF")
                cursor.execute("PRAGMA journal_mode = MEMORY")
        finally:
            cursor.close()

    event.listen(Engine, "connect", on_connect)
    try:
        yield
    finally:
        event.remove(Engine, "connect", on_connect)


def _quiet_mlflow_logs() -> None:
    for name in ("alembic", "mlflow.store.db.utils", "mlflow.tracking.fluent"):
        logging.getLogger(name).setLevel(logging.WARNING)


@functools.lru_cache(maxsize=8)
def _client(uri: str) -> Any:
    """One client per store and process: opening a SQL store costs about a second."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _is_locked(error: BaseException) -> bool:
    return "database is locked" in str(error)


class PatientClient:
    """An `MlflowClient` whose calls wait out a store that another process has locked, retrying
    with back-off for up to `patience` seconds (${STORE_PATIENCE}, default 120), then failing in
    one line."""

    def __init__(self, client: Any, uri: str, patience: float | None = None) -> None:
        self._client, self._uri = client, uri
        if patience is None:
            patience = float(os.environ.get(STORE_PATIENCE, DEFAULT_PATIENCE))
        self._patience = patience

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute

        @functools.wraps(attribute)
        def call(*args: Any, **kwargs: Any) -> Any:
            delay, deadline = 0.05, time.monotonic() + self._patience
            while True:
                try:
                    return attribute(*args, **kwargs)
                except Exception as error:
                    if not _is_locked(error):
                        raise
                    if time.monotonic() + delay > deadline:
                        raise UserError(
                            f"the MLflow store {self._uri} stayed locked by another process for "
                            f"{self._patience:g} s; wait for that process or raise "
                            f"${STORE_PATIENCE}, then run the same command again"
                        ) from None
                    time.sleep(delay)
                    delay = min(2 * delay, 5.0)

        return call


def _sql_store(client: Any) -> Any:
    """The SQL store behind `client` (a `PatientClient`), or None for any other store."""
    try:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        store = client._client._tracking_client.store
    except Exception:  # another MLflow layout: use the public API
        return None
    return store if isinstance(store, SqlAlchemyStore) else None


def _insert_metrics(client: Any, run_id: str, metrics: list[Any]) -> bool:
    """Insert `metrics` into a SQL store in one statement and one transaction, keeping the
    run's latest values up to date the way `log_batch` does: what MLflow's own `log_batch`
    writes, without building one ORM object per value (about 0.2 ms each, most of the time
    of logging a run's history). Returns False, having written nothing, whenever the public
    `log_batch` must do it instead: another store, a value it would refuse, a duplicate
    (which it skips), a locked store (which `PatientClient` waits out), or an MLflow whose
    internals differ from those of the versions this was written against (2.12 to 3.x)."""
    store = _sql_store(client)
    if store is None:
        return False
    try:
        import sqlalchemy
        from mlflow.store.tracking.dbmodels.models import SqlMetric
        from mlflow.utils.validation import _validate_metric

        rows, seen, latest, valid_keys = [], set(), {}, set()
        for metric in metrics:
            key, step, timestamp = metric.key, metric.step, metric.timestamp
            if not (
                key in valid_keys
                and type(metric.value) is float
                and type(step) is int
                and type(timestamp) is int
                and timestamp >= 0
            ):  # MLflow's check, once per key: it parses the key, the dearest part
                _validate_metric(key, metric.value, timestamp, step)
                valid_keys.add(key)
            is_nan, value = store.sanitize_metric_value(metric.value)
            identity = (key, value, timestamp, step, is_nan)
            if identity in seen:  # log_batch logs a repeated value once
                continue
            seen.add(identity)
            row = {
                "run_uuid": run_id,
                "key": key,
                "value": value,
                "timestamp": timestamp,
                "step": step,
                "is_nan": is_nan,
            }
            rows.append(row)
            order = (step, timestamp, value)
            if key not in latest or order > latest[key][0]:
                latest[key] = (order, row)
        try:
            transaction = store.ManagedSessionMaker(read_only=False)
        except TypeError:  # MLflow before 2.20: every session may write
            transaction = store.ManagedSessionMaker()
        with transaction as session:
            store._check_run_is_active(store._get_run(run_uuid=run_id, session=session))
            session.execute(sqlalchemy.insert(SqlMetric.__table__), rows)  # core: no ORM rows
            newest = [SqlMetric(**row) for _, row in latest.values()]
            store._update_latest_metrics_if_necessary(newest, session)
    except Exception:  # rolled back: nothing was written
        return False
    return True


STORE_PATIENCE = "ROBUSTBENCH_MAT_STORE_PATIENCE"
DEFAULT_PATIENCE = 120.0


class Tracker:
    """A thin wrapper of `MlflowClient` bound to one work directory."""

    def __init__(self, workdir: Path) -> None:
        _quiet_mlflow_logs()
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.uri = tracking_uri(workdir)
        self.artifact_root = artifact_root(workdir, self.uri)
        ensure_store(self.uri, self.artifact_root)
        self.client = PatientClient(_client(self.uri), self.uri)
        self._pending: list[tuple[str, dict[str, Any]]] = []
        self._logged_through: dict[str, int] = {}

    def experiment_id(self, name: str) -> str:
        """The id of experiment `name`, created on first use."""
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        location = None if self.artifact_root is None else f"{self.artifact_root}/{name}"
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
        if len(metrics) > 1 and _insert_metrics(self.client, run_id, metrics):
            return
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

    def end_after_error(self, run_id: str, state: str) -> None:
        """`flush` and `end` on the way out of an error. A store that fails now (a full disk,
        a lock) is not raised over the error being handled: the run then stays RUNNING."""
        with contextlib.suppress(Exception):
            self.flush()
            self.end(run_id, state)

    def end(self, run_id: str, state: str, tags: Mapping[str, Any] | None = None) -> None:
        """End the run: finished -> FINISHED, failed -> FAILED, killed or pruned -> KILLED;
        `tags` are set with the state tag, in the same write."""
        self.set_tags(run_id, {**(tags or {}), TAGS.STATE: state})
        status = {
            "finished": "FINISHED",
            "failed": "FAILED",
            "killed": "KILLED",
            "pruned": "KILLED",
        }[state]
        self.client.set_terminated(run_id, status=status)
