"""One stacked training step of K linear heads: recorded once and replayed, against the same
step run through `vmap`, the hooks and autograd every time (`ModelStack.losses_and_gradients`),
alternating in one process on the same random batches. Checks that both give the same losses
and gradients, bit for bit.

    python benchmarks/bench_stacked_step.py [--models 16] [--batch 250] [--dim 2048]
        [--method erm] [--steps 300] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

# isort: off
import robustbench_mat  # noqa: F401 (before torch: idle threads sleep, as in `robustbench-mat tune`)
import torch

# isort: on

from robustbench_mat.hparams import resolve
from robustbench_mat.registry import DATASETS, METHODS
from robustbench_mat.stacking import ModelStack
from robustbench_mat.training import rows


def stack_of(method: str, dataset, models: int) -> ModelStack:
    torch.manual_seed(0)
    specs = METHODS.get(method).hparam_specs(dataset)
    members = [
        METHODS.get(method)(dataset, {**resolve(specs, {}, method), "lr": 0.01 * (k + 1)})
        for k in range(models)
    ]
    return ModelStack(members)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=16)
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--method", default="erm")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dataset = DATASETS.get("synthetic")(n=4795, dim=args.dim)
    train = dataset.split("train")
    replayed = stack_of(args.method, dataset, args.models)
    direct = stack_of(args.method, dataset, args.models)
    direct.replay = False
    if not replayed.replay:
        raise SystemExit(f"{args.method}'s stacked step is not replayable")
    generator = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {"vmap": [], "replayed": []}

    def step(stack: ModelStack, idx: torch.Tensor):
        a = train.a[idx]
        return stack.losses_and_gradients(
            idx, rows(train.inputs, idx), train.y[idx], a, dataset.n_attributes, False
        )

    # Every run's optimiser imports torch's compiler stack (about 1.3 s) before its first step;
    # the recording uses it too, so it is imported here first, as in a run.
    torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1).step()
    start = time.perf_counter()
    step(replayed, torch.arange(args.batch))
    recording = time.perf_counter() - start
    step(direct, torch.arange(args.batch))  # the same first step (GroupDRO's weights move)
    for _ in range(args.steps):
        idx = torch.randint(0, len(train.y), (args.batch,), generator=generator)
        outcomes = []
        for name, stack in (("vmap", direct), ("replayed", replayed)):
            start = time.perf_counter()
            outcomes.append(step(stack, idx))
            times[name].append(time.perf_counter() - start)
        (losses, gradients), (twin_losses, twin_gradients) = outcomes
        assert torch.equal(losses, twin_losses)
        assert all(torch.equal(gradients[k], twin_gradients[k]) for k in gradients)
    direct_ms, replayed_ms = (1e3 * statistics.median(times[k]) for k in ("vmap", "replayed"))
    print(
        f"{args.models} {args.method} heads, {args.dim}-d inputs, batch {args.batch}, "
        f"{args.threads} thread(s), medians of {args.steps} steps:"
    )
    print(
        f"  through vmap {direct_ms:.3f} ms, replayed {replayed_ms:.3f} ms: "
        f"{direct_ms / replayed_ms:.2f}x; recording took {1e3 * recording:.0f} ms"
    )
    print("  losses and gradients identical at every step")


if __name__ == "__main__":
    main()
