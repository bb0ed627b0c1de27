"""Tuning throughput with stacked trials: `tune --parallel-trials K` against K = 1, same trials.

Each configuration runs `robustbench.tuning.tune` as `robustbench-mat tune` does, one worker, in
a fresh work directory, on a study into which the same trials (lr, weight decay and batch size
drawn once, with a fixed seed) are enqueued, so both runs train exactly the same 32
configurations. Two workloads:

- features: a linear head on 2048-d in-memory features of Waterbirds' size (the `synthetic`
  dataset with n=4795, dim=2048: the shape of a cached-feature run), minibatches of 100 or 250 (the
  `--steps` steps each;
- synthetic: the paper's synthetic task with its defaults (full batch, 1000 steps).

Prints trials per minute for K = 1 and K = 32 and their ratio, and checks that every trial's
selected and final metrics are the same in both runs (to 1e-5).

    python benchmarks/bench_parallel_trials.py [--trials 32] [--steps 2000] [--only features]
        [--stacked-only]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import time
from pathlib import Path

# isort: off
import robustbench_mat  # noqa: F401 (before torch: idle threads sleep, as in `robustbench-mat tune`)
import torch

# isort: on

from robustbench_mat.tuning import TuneSpec, base_plan, open_study, tune

WORKLOADS = {
    "features": {"data": {"n": 4795, "dim": 2048}, "batch_sizes": (100, 250)},
    "synthetic": {"data": {}, "batch_sizes": (0,)},
}


def configurations(trials: int, batch_sizes: tuple[int, ...]) -> list[dict]:
    rng = random.Random(0)
    return [
        {
            "lr": 10 ** rng.uniform(-3, -1),
            "weight_decay": 10 ** rng.uniform(-6, -3),
            "batch_size": rng.choice(batch_sizes),
        }
        for _ in range(trials)
    ]


def timed_tune(workload: str, parallel: int, trials: int, steps: int | None, workdir: Path):
    setup = WORKLOADS[workload]
    spec = TuneSpec(
        method="erm",
        dataset="synthetic",
        trials=trials,
        seeds=1,
        steps=steps,
        eval_every=None if steps is None else max(1, steps // 10),
        device="cpu",
        data_params=dict(setup["data"]),
        workdir=str(workdir),
        prune=False,
        parallel_trials=parallel,
        show_progress=False,
    )
    study = open_study(spec, base_plan(spec))
    for config in configurations(trials, setup["batch_sizes"]):
        study.enqueue_trial(config)
    start = time.perf_counter()
    tune(spec, log=lambda line: None)
    return time.perf_counter() - start


def trial_results(workdir: Path) -> dict[str, dict]:
    results = {}
    for path in (workdir / "runs").glob("*/result.json"):
        result = json.loads(path.read_text())
        results[path.parent.name] = {
            **result["selected"],
            **{f"final.{k}": v for k, v in result["final"].items()},
        }
    return results


def largest_difference(one: dict[str, dict], other: dict[str, dict]) -> float:
    assert one.keys() == other.keys(), "the two runs trained different configurations"
    worst = 0.0
    for name, metrics in one.items():
        for key, value in metrics.items():
            worst = max(worst, abs(value - other[name][key]))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2000, help="steps per features trial")
    parser.add_argument("--only", choices=sorted(WORKLOADS))
    parser.add_argument(
        "--stacked-only",
        action="store_true",
        help="time only K = trials, after a 2-trial warm-up (to compare two commits quickly)",
    )
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.trials} trials")
    for workload in [args.only] if args.only else list(WORKLOADS):
        steps = args.steps if workload == "features" else None
        if args.stacked_only:
            with tempfile.TemporaryDirectory() as warm, tempfile.TemporaryDirectory() as many:
                timed_tune(workload, 1, 2, steps and 20, Path(warm))  # imports, cached store
                stacked = timed_tune(workload, args.trials, args.trials, steps, Path(many))
            print(f"{workload}: K={args.trials} {stacked:.2f} s")
            continue
        with tempfile.TemporaryDirectory() as one, tempfile.TemporaryDirectory() as many:
            alone = timed_tune(workload, 1, args.trials, steps, Path(one))
            stacked = timed_tune(workload, args.trials, args.trials, steps, Path(many))
            difference = largest_difference(trial_results(Path(one)), trial_results(Path(many)))
        goal = 10 if workload == "features" else 5
        ratio = alone / stacked
        print(
            f"{workload}: K=1 {alone:.1f} s ({60 * args.trials / alone:.1f} trials/min), "
            f"K={args.trials} {stacked:.1f} s ({60 * args.trials / stacked:.1f} trials/min): "
            f"{ratio:.1f}x (goal >= {goal}x); largest metric difference {difference:.2g}"
        )
        assert math.isfinite(difference) and difference <= 1e-5, difference


if __name__ == "__main__":
    main()
