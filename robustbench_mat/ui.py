"""`robustbench-mat ui`: the MLflow UI on 127.0.0.1 for a work directory's store.

The port is checked free before the server starts, so the server that then answers on it is
ours as long as our child runs. The server runs in its own process group (`mlflow server`
starts uvicorn or gunicorn workers of its own), and the whole group is stopped on Ctrl-C,
SIGTERM or SIGHUP, or when the server fails to come up.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType

from robustbench_mat.errors import UserError
from robustbench_mat.tracking import Tracker, tracking_uri

HOST = "127.0.0.1"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


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


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    raise _Stopped(signal.Signals(signum).name)


def serve_ui(workdir: Path, port: int = 5000, ready_timeout: float = 120.0) -> int:
    """Run the MLflow UI on 127.0.0.1:`port` against the work directory's store, print the
    runs-table URLs, and stop it and its workers cleanly on Ctrl-C, SIGTERM or SIGHUP."""
    check_port(port)
    uri = tracking_uri(workdir)
    experiments = Tracker(workdir).client.search_experiments()
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
            if experiment.name != "Default":
                print(
                    f"  {experiment.name}: {base}/#/experiments/{experiment.experiment_id}/runs",
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
