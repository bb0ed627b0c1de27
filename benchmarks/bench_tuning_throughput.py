"""Trial throughput of `robustbench-mat tune` with 1 and 2 worker processes.

The trials train a linear head on 512-d in-memory features (the `synthetic` dataset with
n=4000, dim=512: the shape of a cached-feature run), minibatches of 128, 3000 steps each. Each
configuration runs as a user runs it, in a fresh work directory. Two figures per configuration:

- end to end: trials / wall time of the whole command (start-up of the workers, which import
  torch and MLflow, and the final seed run included);
- trial phase: trials / (last trial's completion - first trial's start), read from the study.

    python benchmarks/bench_tuning_throughput.py [--trials 16]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna


def throughput(workers: int, trials: int) -> tuple[float, float]:
    cli = Path(sys.executable).with_name("robustbench-mat")
    with tempfile.TemporaryDirectory() as workdir:
        command = [
            str(cli),
            "tune",
            "--method",
            "erm",
            "--dataset",
            "synthetic",
            "--trials",
            str(trials),
            "--n-seeds",
            "1",
            "--steps",
            "3000",
            "--eval-every",
            "500",
            "--set",
            "batch_size=128",
            "--no-prune",
            "--quiet",
            "--workers",
            str(workers),
            "--device",
            "cpu",
            "--workdir",
            workdir,
            "--data",
            "n=4000",
            "dim=512",
        ]
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        wall = time.perf_counter() - start
        storage = f"sqlite:///{workdir}/optuna.db"
        (name,) = optuna.get_all_study_names(storage)
        done = [
            t
            for t in optuna.load_study(study_name=name, storage=storage).trials
            if t.state == optuna.trial.TrialState.COMPLETE
        ]
        phase = max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)
        return trials / wall * 60, len(done) / phase.total_seconds() * 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    args = parser.parse_args()
    one, two = throughput(1, args.trials), throughput(2, args.trials)
    for label, index in (("end to end", 0), ("trial phase", 1)):
        print(
            f"{label:>11}: 1 worker {one[index]:.1f} trials/min, 2 workers "
            f"{two[index]:.1f} trials/min, speed-up {two[index] / one[index]:.2f}x"
        )


if __name__ == "__main__":
    main()
