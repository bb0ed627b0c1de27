"""Make the README's screenshot of the MLflow UI: the leaderboard's final runs, opened from the
URL that `robustbench-mat ui` prints, with the test metrics as columns.

    python docs/ui_screenshot.py [--workdir DIR] [--out docs/mlflow-ui.png]

Tunes ERM and MAT on a small `synthetic` task (about a minute on 2 CPU cores) unless DIR already
holds final runs, then drives Debian's chromium with playwright (`apt-get install chromium`,
`pip install playwright`).
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
FINAL_RUNS = "final runs, test metrics as columns: "


def tune_small_sweep(workdir: Path) -> None:
    from robustbench_mat.tuning import TuneSpec, tune

    for method in ("erm", "mat"):
        spec = TuneSpec(
            method=method,
            dataset="synthetic",
            trials=2,
            seeds=3,
            steps=300,
            data_params={"n": 300, "dim": 300},
            workdir=str(workdir),
            prune=False,
        )
        tune(spec, log=lambda line: None)


def final_runs_url(server: subprocess.Popen) -> str:
    deadline = time.time() + 120
    while time.time() < deadline:
        line = server.stdout.readline()
        if not line and server.poll() is not None:
            raise SystemExit("robustbench-mat ui stopped before printing its URLs")
        if FINAL_RUNS in line:
            return line.split(FINAL_RUNS, 1)[1].strip()
    raise SystemExit("robustbench-mat ui printed no final-runs URL within 120 s")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def screenshot(workdir: Path, out: Path) -> None:
    from playwright.sync_api import sync_playwright

    cli = Path(sys.executable).with_name("robustbench-mat")
    server = subprocess.Popen(
        [str(cli), "ui", "--workdir", str(workdir), "--port", str(free_port())],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = final_runs_url(server)
        with sync_playwright() as driver:
            browser = driver.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page(viewport={"width": 1500, "height": 620})
            page.goto(url, timeout=120_000)
            page.get_by_role("columnheader", name="test_wga").first.wait_for(timeout=120_000)
            close = page.get_by_role("button", name="Close")
            if close.count():
                close.last.click()  # the assistant side panel
            page.wait_for_timeout(1500)
            page.screenshot(path=str(out))
            browser.close()
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("mlflow-ui.png"))
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="robustbench-ui-"))
    if not (workdir / "mlflow.db").exists():
        tune_small_sweep(workdir)
    screenshot(workdir, args.out)
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
