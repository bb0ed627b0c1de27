"""Time the shared training loop (ERM) against a bare hand-written torch loop.

Both do the same updates on the same tensors: the synthetic dataset's training split, the
same initial weights, SGD with the same settings, the same batches. The shared loop runs with
evaluation only at the last step and no checkpoints or tracking, so the ratio measures the
loop's own per-step overhead (hooks, batch assembly, the finite-loss check, the progress bar).

    python benchmarks/bench_erm_loop.py [--steps 1000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from robustbench_mat.data import BatchSchedule
from robustbench_mat.registry import DATASETS, METHODS
from robustbench_mat.training import LoopSettings, train


def shared_loop(dataset, hparams: dict, steps: int) -> tuple[float, torch.Tensor]:
    torch.manual_seed(0)
    method = METHODS.get("erm")(dataset, hparams)
    settings = LoopSettings(
        steps=steps,
        eval_every=steps,
        seed=0,
        device=torch.device("cpu"),
        criterion="val_wga",
        train_groups_visible=True,
        show_progress=False,
    )
    start = time.perf_counter()
    train(method, dataset, settings)
    return time.perf_counter() - start, method.model.weight.detach().clone()


def bare_loop(dataset, hparams: dict, steps: int) -> tuple[float, torch.Tensor]:
    torch.manual_seed(0)
    model = dataset.build_model()
    train_split = dataset.split("train")
    x, y = train_split.inputs, train_split.y
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=hparams["lr"],
        momentum=hparams["momentum"],
        weight_decay=hparams["weight_decay"],
    )
    schedule = BatchSchedule(len(y), hparams["batch_size"], seed=0)
    start = time.perf_counter()
    for step in range(steps):
        if schedule.full_batch:
            xb, yb = x, y
        else:
            idx = schedule.indices(step)
            xb, yb = x[idx], y[idx]
        loss = F.cross_entropy(model(xb), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start, model.weight.detach().clone()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    dataset = DATASETS.get("synthetic")()
    erm = METHODS.get("erm")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps, "
        f"median of {args.repeats}"
    )
    for batch_size in (0, 100):
        hparams = {name: spec.default for name, spec in erm.hparam_specs(dataset).items()}
        hparams["batch_size"] = batch_size
        shared, bare = [], []
        for _ in range(args.repeats):
            t_bare, w_bare = bare_loop(dataset, hparams, args.steps)
            t_shared, w_shared = shared_loop(dataset, hparams, args.steps)
            assert torch.equal(w_bare, w_shared), "the two loops did different updates"
            bare.append(t_bare)
            shared.append(t_shared)
        b, s = statistics.median(bare), statistics.median(shared)
        label = "full batch" if batch_size == 0 else f"batch {batch_size}"
        print(
            f"{label:>10}: bare {b:.3f} s, shared loop {s:.3f} s, ratio {s / b:.3f} "
            f"(same final weights: yes)"
        )


if __name__ == "__main__":
    main()
