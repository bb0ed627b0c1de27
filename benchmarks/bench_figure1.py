"""Time `robustbench-mat experiment figure1` (one seed) against a bare torch loop.

The bare loop does the same 4000 full-batch updates on the same tensors (ERM without noise,
ERM with noise, XRM's twins, MAT) with nothing else: no evaluation, no tracking, no plots.
The command is timed as a user runs it, in a fresh work directory (so it includes starting
Python, importing torch and MLflow, creating the MLflow store, evaluating every step and
logging every evaluation), once without plots and once with them.

    python benchmarks/bench_figure1.py [--seed 1234]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from robustbench_mat.methods.mat import calibrated_log_prior
from robustbench_mat.registry import DATASETS


def bare_updates(seed: int) -> float:
    """Wall time of the 4000 updates in plain torch."""
    torch.set_num_threads(torch.get_num_threads())
    start = time.perf_counter()
    for noise, lr in ((0.0, 3e-2), (0.5, 1e-2)):
        train = DATASETS.get("synthetic")(noise_std=noise, seed=seed).split("train")
        model = torch.nn.Linear(train.inputs.shape[1], 2, bias=False)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        for _ in range(1000):
            loss = F.cross_entropy(model(train.inputs), train.y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    x, y = train.inputs, train.y  # noise 0.5: XRM twins, then MAT
    twins = [torch.nn.Linear(x.shape[1], 2, bias=False) for _ in range(2)]
    optimizer = torch.optim.SGD([p for t in twins for p in t.parameters()], lr=1e-2)
    mine = (torch.rand(len(y)) < 0.5)[:, None]
    labels = y.clone()
    for _ in range(1000):
        logits_a, logits_b = twins[0](x), twins[1](x)
        held_in = torch.where(mine, logits_a, logits_b)
        held_out = torch.where(mine, logits_b, logits_a).detach()
        loss = F.cross_entropy(held_in, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        confidence, prediction = F.softmax(held_out, 1).max(1)
        flip = torch.bernoulli((2 * confidence - 1).clamp(0, 1)).bool()
        labels[flip] = prediction[flip]
    with torch.no_grad():
        held_out = torch.where(mine, twins[1](x), twins[0](x))
    shift = calibrated_log_prior(held_out, y, 2, 0.1)
    model = torch.nn.Linear(x.shape[1], 2, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    for _ in range(1000):
        loss = F.cross_entropy(model(x) + shift, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def command_time(seed: int, plot: bool) -> float:
    cli = Path(sys.executable).with_name("robustbench-mat")
    with tempfile.TemporaryDirectory() as workdir:
        args = [
            str(cli),
            "experiment",
            "figure1",
            "--seeds",
            str(seed),
            "--quiet",
            "--device",
            "cpu",
            "--workdir",
            workdir,
        ]
        if not plot:
            args.append("--no-plot")
        start = time.perf_counter()
        subprocess.run(args, check=True, capture_output=True)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    bare = bare_updates(args.seed)
    print(f"bare torch loop, 4000 full-batch updates: {bare:.2f} s")
    for plot in (False, True):
        wall = command_time(args.seed, plot)
        label = "with plots" if plot else "without plots"
        print(
            f"experiment figure1, one seed, {label}: {wall:.2f} s "
            f"(ratio to the bare loop {wall / bare:.1f})"
        )


if __name__ == "__main__":
    main()
