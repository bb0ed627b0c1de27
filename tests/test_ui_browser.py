"""`robustbench-mat ui` in a real browser: the runs table shows the methods and the worst-group
metric. Needs Debian's chromium and the playwright package (.ci/run installs both)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from robustbench_mat.tuning import TuneSpec, tune

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _reason() -> str | None:
    if not Path(CHROMIUM).exists():
        return "no chromium browser (apt-get install chromium)"
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install playwright)"
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _runs_url(server: subprocess.Popen) -> str:
    deadline = time.time() + 120
    while time.time() < deadline:
        line = server.stdout.readline()
        if not line and server.poll() is not None:
            raise AssertionError("the UI stopped")
        if "synthetic: http://" in line:
            return line.split(": ", 1)[1].strip()
    raise AssertionError("the UI did not start")


@pytest.mark.slow
@pytest.mark.skipif(_reason() is not None, reason=str(_reason()))
def test_runs_table_shows_methods_and_worst_group_accuracy(workdir: Path) -> None:
    from playwright.sync_api import sync_playwright

    result = tune(
        TuneSpec(
            method="erm",
            dataset="synthetic",
            trials=1,
            seeds=2,
            steps=20,
            eval_every=10,
            data_params={"n": 100, "dim": 10},
            workdir=str(workdir),
            prune=False,
        ),
        log=lambda line: None,
    )
    mean_wga = sum(r.selected["test_wga"] for r in result.final_runs) / 2
    cli = Path(sys.executable).with_name("robustbench-mat")
    server = subprocess.Popen(
        [str(cli), "ui", "--workdir", str(workdir), "--port", str(_free_port())],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = _runs_url(server)
        with sync_playwright() as driver:
            browser = driver.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page(viewport={"width": 1600, "height": 900})
            page.goto(url, timeout=120_000)
            page.get_by_text("tune erm.synthetic", exact=False).first.wait_for(timeout=120_000)
            page.get_by_role("button", name="Close").last.click()  # the assistant side panel
            page.get_by_test_id("column-selection-dropdown").first.click()
            page.get_by_text("test_wga", exact=True).first.click()
            page.keyboard.press("Escape")
            page.get_by_role("columnheader", name="test_wga").first.wait_for(timeout=30_000)
            headers = page.get_by_role("columnheader").all_inner_texts()
            text = page.inner_text("body")
            shot = Path(os.environ.get("ROBUSTBENCH_TEST_ARTIFACTS", workdir)) / "mlflow_ui.png"
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot))
            browser.close()
        assert "test_wga" in headers
        assert "tune erm.synthetic" in text  # the study's row: method, dataset, regime
        assert str(mean_wga)[:6] in text  # its test_wga cell: the mean of the final runs
        assert shot.stat().st_size > 10_000
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
