"""`robustbench-mat ui`: the MLflow UI on 127.0.0.1 for a work directory's store.

The port is checked free before the server starts, so the server that then answers on it is
ours as long as our child runs. The server runs in its own process group (`mlflow server`
starts uvicorn or gunicorn workers of its own), and the whole group is stopped on Ctrl-C,
SIGTERM or SIGHUP, or when the server fails to come up.

For each experiment with final runs it also prints a ready URL of the leaderboard's runs: the
final, finished runs with the test metrics as columns, sorted by `test_wga`. MLflow 3.17's
runs-table URL carries the filter and the sort (`searchFilter`, `orderByKey`, `orderByAsc`) but
not the columns, which live in the browser's local storage; a shared view carries both. The UI
loads it from the URL parameter `viewStateShareKey=KEY` and the experiment tag
`mlflow.sharedViewState.KEY`, whose value is an envelope `{"name", "createdAt", "updatedAt",
"state"}` with `state` the JSON of the search facets and UI state (`selectedColumns`: column ids
such as ``metrics.`test_wga` ``). The tag is written here, once per experiment.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from robustbench_mat.errors import UserError
from robustbench_mat.tracking import Tracker, tracking_uri

HOST = "127.0.0.1"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)

# The shared view of the final runs (see the module docstring).
VIEW_KEY = "robustbench-final-runs"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
FINAL_FILTER = "tags.`robustbench.final` = 'true' and attributes.status = 'FINISHED'"
FINAL_COLUMNS = (
    *(f"tags.`robustbench.{key}`" for key in ("method", "regime", "seed", "criterion")),
    *(f"metrics.`test_{key}`" for key in ("avg", "wga", "worst_class", "avg_train_weighted")),
)
FINAL_VIEW_STATE = {
    "searchFilter": FINAL_FILTER,
    "orderByKey": "metrics.`test_wga`",
    "orderByAsc": False,
    "selectedColumns": list(FINAL_COLUMNS),
}


class _Stopped(Exception):
    """Raised by the handler of SIGTERM / SIGHUP to unwind into the server's clean-up."""


def _bind(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # As the server does: a connection in TIME_WAIT does not hold a port, a listener does.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((HOST, port))


def free_port(after: int) -> int:
    """The first port above `after` that can be bound now, else one the system picks."""
    for candidate in range(after + 1, min(after + 100, 65535) + 1):
        try:
            _bind(candidate)
        except OSError:
            continue
        return candidate
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def check_port(port: int) -> None:
    """Raise `UserError` unless `port` can be bound on 127.0.0.1 now; name a free one."""
    try:
        _bind(port)
    except OSError as error:
        reason = (
            "is already in use (another server?)"
            if error.errno == errno.EADDRINUSE
            else f"cannot be used ({error.strerror})"
        )
        raise UserError(
            f"port {port} on {HOST} {reason}; choose a free one, e.g. --port {free_port(port)}"
        ) from None


def server_command(uri: str, workdir: Path, port: int) -> list[str]:
    """The MLflow server, lean: one worker (job execution and telemetry are off in its env)."""
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        uri,
        "--default-artifact-root",
        (workdir / "artifacts").as_uri(),
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        "1",
    ]


def _stop(server: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM the server's process group, then SIGKILL whatever is left after `grace` s."""
    group = server.pid  # the server leads its own group (start_new_session)
    try:
        os.killpg(group, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    try:
        server.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass
    server.wait()


def _wait_until_ready(server: subprocess.Popen, port: int, timeout: float) -> bool:
    """True once our server answers on `port`; False (said on stderr) if it stopped or stayed
    silent. The port was free before the server started, so a listener found while the server
    still runs is the server."""
    deadline = time.monotonic() + timeout
    while server.poll() is None:
        try:
            socket.create_connection((HOST, port), timeout=1).close()
        except OSError:
            if time.monotonic() > deadline:
                print(
                    f"robustbench-mat: error: the MLflow server did not answer on port {port} "
                    f"within {timeout:g} s",
                    file=sys.stderr,
                )
                return False
            time.sleep(0.5)
            continue
        if server.poll() is None:
            return True
    print(
        f"robustbench-mat: error: the MLflow server stopped (exit {server.returncode})",
        file=sys.stderr,
    )
    return False


def final_runs_url(base: str, experiment_id: str) -> str:
    """The URL of an experiment's final runs with the test metrics as columns."""
    return f"{base}/#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_KEY}"


def ensure_final_runs_view(client: Any, experiment: Any) -> bool:
    """Write the final-runs view into `experiment`'s tags unless it is there already; False
    (nothing written) when the experiment has no final run."""
    if not client.search_runs([experiment.experiment_id], FINAL_FILTER, max_results=1):
        return False
    current = experiment.tags.get(VIEW_TAG)
    try:
        if current and json.loads(json.loads(current)["state"]) == FINAL_VIEW_STATE:
            return True
    except (ValueError, KeyError, TypeError):
        pass  # written by hand or by another version: replaced
    now = int(time.time() * 1000)
    envelope = {
        "name": "robustbench: final runs",
        "createdAt": now,
        "updatedAt": now,
        "state": json.dumps(FINAL_VIEW_STATE),
    }
    client.set_experiment_tag(experiment.experiment_id, VIEW_TAG, json.dumps(envelope))
    return True


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    raise _Stopped(signal.Signals(signum).name)


def serve_ui(workdir: Path, port: int = 5000, ready_timeout: float = 120.0) -> int:
    """Run the MLflow UI on 127.0.0.1:`port` against the work directory's store, print the
    runs-table URLs, and stop it and its workers cleanly on Ctrl-C, SIGTERM or SIGHUP."""
    check_port(port)
    uri = tracking_uri(workdir)
    client = Tracker(workdir).client
    experiments = [e for e in client.search_experiments() if e.name != "Default"]
    with_view = {e.experiment_id for e in experiments if ensure_final_runs_view(client, e)}
    env = {
        **os.environ,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = {s: signal.getsignal(s) for s in (*STOP_SIGNALS, signal.SIGINT)}
    server, stopped = None, False
    try:
        if in_main_thread:
            for signum in STOP_SIGNALS:
                signal.signal(signum, _raise_stopped)
        server = subprocess.Popen(
            server_command(uri, workdir, port), env=env, start_new_session=True
        )
        if not _wait_until_ready(server, port, ready_timeout):
            return 1
        base = f"http://{HOST}:{port}"
        print(f"MLflow UI at {base} (store {uri}); Ctrl-C stops it", flush=True)
        for experiment in experiments:
            print(
                f"  {experiment.name}: {base}/#/experiments/{experiment.experiment_id}/runs",
                flush=True,
            )
            if experiment.experiment_id in with_view:
                print(
                    "    final runs, test metrics as columns: "
                    + final_runs_url(base, experiment.experiment_id),
                    flush=True,
                )
        return server.wait()
    except (KeyboardInterrupt, _Stopped):
        stopped = True
        return 0
    finally:
        if in_main_thread:  # a second signal must not cut the clean-up short
            for signum in previous:
                signal.signal(signum, signal.SIG_IGN)
        if server is not None:
            _stop(server)
        if stopped:
            print("MLflow UI stopped", flush=True)
        if in_main_thread:
            for signum, handler in previous.items():
                if handler is not None:  # None: set outside Python, cannot be restored
                    signal.signal(signum, handler)
