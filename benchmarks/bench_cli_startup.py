"""Start-up time of the command line: `--help`, `run --help` and `list`, as a user runs them.

Each command runs in a fresh process (the installed `robustbench-mat` script next to this
Python); the figure is the minimum wall time of `--repeats` runs (default 5), which is the
least disturbed by other work on the machine, with the CPU time (user + system) of that run,
which other work disturbs less. `--help` and `run --help` import no torch, MLflow,
Optuna or transformers. `list` is timed twice: with an empty listing cache every time (it
imports the plugins, and with them torch), and with the listing kept by a first call.

    python benchmarks/bench_cli_startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(command: list[str], cache: Path, fresh: bool) -> tuple[float, float]:
    """(wall, CPU) seconds of one run of `command`, its listing cache emptied first if `fresh`."""
    if fresh:
        shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "ROBUSTBENCH_MAT_CACHE_DIR": str(cache)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cli = Path(sys.executable).with_name("robustbench-mat")
    with tempfile.TemporaryDirectory() as folder:
        cache = Path(folder) / "cache"
        for arguments, fresh, note in (
            (("--help",), False, ""),
            (("run", "--help"), False, ""),
            (("list",), True, " (no cache)"),
            (("list",), False, " (kept)"),
        ):
            runs = [timed([str(cli), *arguments], cache, fresh) for _ in range(args.repeats)]
            wall, cpu = min(runs)
            label = " ".join(("robustbench-mat", *arguments)) + note
            every = ", ".join(f"{w:.2f}" for w, _ in runs)
            print(f"{label:<34} min {wall:.2f} s (CPU {cpu:.2f} s); runs: {every}")


if __name__ == "__main__":
    main()
