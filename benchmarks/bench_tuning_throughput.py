"""Trial throughput of `robustbench-mat tune` with 1 and 2 worker processes.

The trials train a linear head on 512-d in-memory features (the `synthetic` dataset with
n=4000, dim=512: the shape of a cached-feature run), minibatches of 128, 400 steps each. Each
configuration runs as a user runs it, in a fresh work directory, and the time counts from the
command's start to the last trial (final seed runs are excluded: --seeds 1 reuses a trial's run).

    python benchmarks/bench_tuning_throughput.py [--trials 12]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def trials_per_minute(workers: int, trials: int) -> float:
    cli = Path(sys.executable).with_name("robustbench-mat")
    with tempfile.TemporaryDirectory() as workdir:
        command = [str(cli), "tune", "--method", "erm", "--dataset", "synthetic",
                   "--trials", str(trials), "--seeds", "1", "--steps", "400",
                   "--eval-every", "100", "--set", "batch_size=128", "--no-prune", "--quiet",
                   "--workers", str(workers), "--device", "cpu", "--workdir", workdir,
                   "--data", "n=4000", "dim=512"]
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        return trials / (time.perf_counter() - start) * 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    args = parser.parse_args()
    one = trials_per_minute(1, args.trials)
    two = trials_per_minute(2, args.trials)
    print(f"{args.trials} trials: 1 worker {one:.1f} trials/min, 2 workers {two:.1f} trials/min,"
          f" speed-up {two / one:.2f}x")


if __name__ == "__main__":
    main()
