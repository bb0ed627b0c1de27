"""`robustbench-mat ui`: the port is checked before the server starts, the readiness check only
trusts our own server, and the server's whole process group stops with the command (Ctrl-C,
SIGTERM, SIGHUP)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import robustbench_mat.tracking as tracking
import robustbench_mat.ui as ui
from robustbench_mat.cli import main
from robustbench_mat.errors import UserError

PREFIX = "robustbench-mat: error: "
PROC = Path("/proc")
needs_proc = pytest.mark.skipif(not (PROC / "self" / "stat").exists(), reason="needs Linux /proc")

# A stand-in for `mlflow server`: it listens on the port and starts a worker of its own that it
# never stops, as `mlflow server` starts uvicorn; it records both process ids.
FAKE_SERVER = """
import http.server, os, subprocess, sys
port, record = int(sys.argv[1]), sys.argv[2]
worker = subprocess.Popen(
    [sys.executable, "-c", "import time; time.sleep(600)"],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
)
with open(record + ".tmp", "w") as out:
    out.write(f"{os.getpid()} {worker.pid}")
os.replace(record + ".tmp", record)
http.server.HTTPServer(("127.0.0.1", port), http.server.BaseHTTPRequestHandler).serve_forever()
"""

# `robustbench-mat ui` with the stand-in in place of `mlflow server`.
UI_WITH_FAKE_SERVER = """
import sys
from pathlib import Path
import robustbench_mat.ui as ui
fake, record, workdir, port = sys.argv[1:]
ui.server_command = lambda uri, work, port: [sys.executable, fake, str(port), record]
sys.exit(ui.serve_ui(Path(workdir), int(port)))
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _can_bind(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, process group) of a process, None once it is gone."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    state, parent, group = text.rsplit(")", 1)[1].split()[:3]
    return state, int(parent), int(group)


def _running(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")  # a zombie no longer runs


def _processes() -> dict[int, tuple[str, int, int]]:
    found = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            found[int(entry.name)] = stat
    return found


def _wait_for_line(process: subprocess.Popen, fragment: str, timeout: float) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            break
        lines.append(line)
        if fragment in line:
            return lines
    raise AssertionError(f"no {fragment!r} in {lines}")


def _stop_quietly(process: subprocess.Popen, *pids: int) -> None:
    """Kill what a failed test may leave behind."""
    if process.poll() is None:
        process.kill()
        process.wait()
    for pid in pids:
        if _running(pid):
            os.kill(pid, signal.SIGKILL)


# --- the port -------------------------------------------------------------------------------------


@pytest.mark.parametrize("port", ["70000", "0", "-1", "65536", "http"])
def test_port_outside_1_to_65535_is_a_one_line_error(port, workdir, capsys):
    code = main(["ui", "--workdir", str(workdir), "--port", port])
    err = capsys.readouterr().err
    assert code == 2
    assert err == (
        f"{PREFIX}argument --port: must be a port from 1 to 65535, got {port!r} "
        "(see `robustbench-mat ui --help`)\n"
    )


def test_port_held_by_another_server_names_a_free_one_and_starts_nothing(
    workdir, capsys, monkeypatch
):
    def no_server(*args, **kwargs):
        raise AssertionError("the MLflow server must not start")

    monkeypatch.setattr(ui.subprocess, "Popen", no_server)
    with socket.socket() as other_server:
        other_server.bind(("127.0.0.1", 0))
        other_server.listen()
        port = other_server.getsockname()[1]
        code = main(["ui", "--workdir", str(workdir), "--port", str(port)])
        captured = capsys.readouterr()
        assert code == 2
        assert captured.out == ""
        err = captured.err
        assert err.startswith(
            f"{PREFIX}port {port} on 127.0.0.1 is already in use (another server?); "
            "choose a free one, e.g. --port "
        )
        assert err.count("\n") == 1 and "Traceback" not in err
        suggested = int(err.rsplit("--port ", 1)[1])
        assert suggested != port and _can_bind(suggested)


def test_check_port_accepts_a_free_port_and_free_port_finds_one():
    port = _free_port()
    ui.check_port(port)
    with socket.socket() as held:
        held.bind(("127.0.0.1", port))
        held.listen()
        with pytest.raises(UserError, match=f"port {port} on 127.0.0.1 is already in use"):
            ui.check_port(port)
        suggested = ui.free_port(port)
        assert suggested != port and _can_bind(suggested)


def test_serve_ui_lives_in_the_ui_module():
    assert callable(ui.serve_ui)
    assert not hasattr(tracking, "serve_ui")


# --- readiness ------------------------------------------------------------------------------------


def test_a_server_that_stops_before_answering_is_an_error(workdir, capsys, monkeypatch):
    command = [sys.executable, "-c", "import sys; sys.exit(3)"]
    monkeypatch.setattr(ui, "server_command", lambda uri, work, port: command)
    assert ui.serve_ui(workdir, _free_port(), ready_timeout=30) == 1
    captured = capsys.readouterr()
    assert "the MLflow server stopped (exit 3)" in captured.err
    assert "MLflow UI at" not in captured.out


def test_a_listener_is_not_taken_for_our_server_once_our_server_stopped(monkeypatch):
    """Another process took the port after the check: our server fails to bind and exits."""
    server = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(1)"])
    server.wait()
    with socket.socket() as intruder:
        intruder.bind(("127.0.0.1", 0))
        intruder.listen()
        assert not ui._wait_until_ready(server, intruder.getsockname()[1], timeout=5)


# --- stopping -------------------------------------------------------------------------------------


@needs_proc
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_stops_the_server_and_its_workers(stop, workdir, tmp_path):
    fake, record, port = tmp_path / "fake_server.py", tmp_path / "pids", _free_port()
    fake.write_text(FAKE_SERVER)
    command = [sys.executable, "-c", UI_WITH_FAKE_SERVER, str(fake), str(record), str(workdir)]
    command.append(str(port))
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server = worker = 0
    try:
        _wait_for_line(process, f"MLflow UI at http://127.0.0.1:{port}", timeout=120)
        server, worker = map(int, record.read_text().split())
        assert _running(server) and _running(worker)
        assert _stat(server)[2] == server  # the server leads a process group of its own
        assert _stat(worker)[2] == server
        process.send_signal(stop)
        assert process.wait(timeout=30) == 0
        assert "MLflow UI stopped" in process.communicate(timeout=10)[0]
        deadline = time.monotonic() + 10
        while (_running(server) or _running(worker)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(server) and not _running(worker)
        assert _can_bind(port)
    finally:
        _stop_quietly(process, *(pid for pid in (server, worker) if pid))


@pytest.mark.slow
@needs_proc
def test_sigterm_stops_the_real_mlflow_server_and_frees_the_port(workdir):
    port = _free_port()
    cli = Path(sys.executable).with_name("robustbench-mat")
    process = subprocess.Popen(
        [str(cli), "ui", "--workdir", str(workdir), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    group: list[int] = []
    try:
        _wait_for_line(process, f"MLflow UI at http://127.0.0.1:{port}", timeout=120)
        (server,) = [pid for pid, stat in _processes().items() if stat[1] == process.pid]
        group = [pid for pid, stat in _processes().items() if stat[2] == server]
        assert len(group) >= 2  # mlflow server and its uvicorn/gunicorn worker
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        deadline = time.monotonic() + 10
        while any(_running(pid) for pid in group) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_running(pid) for pid in group)
        assert _can_bind(port)
    finally:
        _stop_quietly(process, *group)


# --- the ready URL of the final runs ------------------------------------------------------------


def _mlflow_ui_bundle() -> str:
    import mlflow

    folder = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    return "".join(path.read_text(errors="replace") for path in sorted(folder.glob("*.js")))


def _runs(workdir: Path) -> tuple[object, str, str]:
    """A store with a final and a trial run in `synthetic`, and no final run in `colored-digits`:
    (client, synthetic's id, colored-digits' id)."""
    tracker = tracking.Tracker(workdir)
    client = tracker.client
    synthetic = tracker.experiment_id("synthetic")
    other = tracker.experiment_id("colored-digits")
    for experiment, final in ((synthetic, "true"), (synthetic, "false"), (other, "false")):
        tags = {"robustbench.final": final, "robustbench.method": f"erm-final-{final}"}
        run = client.create_run(experiment, tags=tags)
        client.log_metric(run.info.run_id, "test_wga", 0.5)
        client.log_metric(run.info.run_id, "test_avg", 0.75)
        client.set_terminated(run.info.run_id, "FINISHED")
    return client, synthetic, other


def test_the_final_runs_view_uses_what_the_installed_mlflow_ui_reads():
    """The URL parameter, tag prefix, envelope fields and state keys are the installed MLflow
    UI's (its shared-view loader and column ids), not guesses."""
    bundle = _mlflow_ui_bundle()
    assert '"viewStateShareKey"' in bundle and '"mlflow.sharedViewState."' in bundle
    assert "?viewStateShareKey=${n}" in bundle  # its own route to a shared view
    assert "expected an object with a string `name`, number `createdAt`, and string `state`" in (
        bundle
    )
    facets = '["searchFilter","orderByKey","orderByAsc","startTime","lifecycleFilter"'
    assert facets in bundle
    assert '["selectedColumns","columnOrder",' in bundle  # the UI state a view carries
    assert '+".`"+t+"`"' in bundle  # column ids: metrics.`test_wga`
    assert 'ATTRIBUTES:"attributes",PARAMS:"params",METRICS:"metrics",TAGS:"tags"' in bundle
    assert '"/experiments/:experimentId/runs"' in bundle
    assert ui.VIEW_TAG == "mlflow.sharedViewState." + ui.VIEW_KEY
    assert set(ui.FINAL_VIEW_STATE) == {
        "searchFilter",
        "orderByKey",
        "orderByAsc",
        "selectedColumns",
    }


def test_the_final_runs_view_is_written_once_per_experiment_with_final_runs(workdir):
    client, synthetic, other = _runs(workdir)
    experiments = {e.experiment_id: e for e in client.search_experiments()}
    assert ui.ensure_final_runs_view(client, experiments[synthetic])
    assert not ui.ensure_final_runs_view(client, experiments[other])
    tags = client.get_experiment(synthetic).tags
    envelope = json.loads(tags[ui.VIEW_TAG])
    assert set(envelope) == {"name", "createdAt", "updatedAt", "state"}
    state = json.loads(envelope["state"])
    assert state["orderByKey"] == "metrics.`test_wga`" and state["orderByAsc"] is False
    assert "metrics.`test_avg`" in state["selectedColumns"]
    assert "metrics.`test_wga`" in state["selectedColumns"]
    assert "tags.`robustbench.method`" in state["selectedColumns"]
    (final,) = client.search_runs([synthetic], state["searchFilter"])  # a filter MLflow accepts
    assert final.data.tags["robustbench.final"] == "true"
    assert ui.VIEW_TAG not in client.get_experiment(other).tags
    assert ui.ensure_final_runs_view(client, client.get_experiment(synthetic))
    assert client.get_experiment(synthetic).tags[ui.VIEW_TAG] == tags[ui.VIEW_TAG]  # unchanged


def test_ui_prints_the_ready_url_of_the_final_runs(workdir, capsys, monkeypatch):
    _, synthetic, other = _runs(workdir)
    port = _free_port()
    # A server that answers for a moment, then exits, so that serve_ui returns.
    server = (
        "import socket, sys, time; s = socket.socket(); "
        "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
        "s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(); time.sleep(2)"
    )
    command = [sys.executable, "-c", server, str(port)]
    monkeypatch.setattr(ui, "server_command", lambda uri, work, port: command)
    assert ui.serve_ui(workdir, port, ready_timeout=30) == 0
    out = capsys.readouterr().out
    base = f"http://127.0.0.1:{port}"
    assert f"  synthetic: {base}/#/experiments/{synthetic}/runs\n" in out
    expected = f"{base}/#/experiments/{synthetic}/runs?viewStateShareKey=robustbench-final-runs"
    assert f"    final runs, test metrics as columns: {expected}\n" in out
    assert f"  colored-digits: {base}/#/experiments/{other}/runs\n" in out
    assert out.count("viewStateShareKey") == 1  # none for an experiment without final runs


@pytest.mark.slow
@needs_proc
def test_the_ready_url_opens_the_final_runs_with_the_test_metrics_in_a_browser(workdir, tmp_path):
    """In headless Chromium (skipped without it or Playwright): the printed URL shows only the
    final run, with the test metrics and the method as columns, without touching the UI."""
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(chromium).exists():
        pytest.skip("no chromium browser (apt-get install chromium)")
    _runs(workdir)
    port = _free_port()
    cli = Path(sys.executable).with_name("robustbench-mat")
    process = subprocess.Popen(
        [str(cli), "ui", "--workdir", str(workdir), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        line = _wait_for_line(process, "final runs, test metrics as columns: ", timeout=120)[-1]
        url = line.split("columns: ", 1)[1].strip()
        with sync_api.sync_playwright() as driver:
            browser = driver.chromium.launch(
                executable_path=chromium, args=["--no-sandbox", "--disable-gpu"]
            )
            page = browser.new_page(viewport={"width": 1600, "height": 900})
            page.goto(url, timeout=120_000)
            page.get_by_text("erm-final-true").first.wait_for(timeout=120_000)
            for column in ("test_avg", "test_wga", "robustbench.method"):
                page.get_by_role("columnheader", name=column).first.wait_for(timeout=30_000)
            text = page.inner_text("body")
            page.screenshot(path=str(tmp_path / "final_runs_view.png"))
            browser.close()
        assert "erm-final-false" not in text  # filtered out: not a final run
        assert "1 matching run" in text
        assert "robustbench: final runs" in text  # the shared view is active
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
