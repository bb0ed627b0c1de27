"""Start-up time of the command line: `--help`, `run --help` and `list`, as a user runs them.

Each command runs in a fresh process (the installed `robustbench-mat` script next to this
Python); the figure is the minimum wall time of `--repeats` runs (default 5), which is the
least disturbed by other work on the machine, with the CPU time (user + system) of that run,
which other work disturbs less. `--help` and `run --help` import no torch, MLflow,
Optuna or transformers; `list` imports the plugins, and with them torch.

    python benchmarks/bench_cli_startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = (("--help",), ("run", "--help"), ("list",))


def timed(command: list[str]) -> tuple[float, float]:
    """(wall, CPU) seconds of one run of `command`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cli = Path(sys.executable).with_name("robustbench-mat")
    for arguments in COMMANDS:
        runs = [timed([str(cli), *arguments]) for _ in range(args.repeats)]
        wall, cpu = min(runs)
        label = " ".join(("robustbench-mat", *arguments))
        every = ", ".join(f"{w:.2f}" for w, _ in runs)
        print(f"{label:<28} min {wall:.2f} s (CPU {cpu:.2f} s); runs: {every}")


if __name__ == "__main__":
    main()
