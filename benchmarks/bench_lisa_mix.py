"""LISA's selective mixup: the on-device table of rounds against a per-cell Python loop.

`methods.mixing.selective_mix` draws every round of pairs a minibatch could need at once, as
tensors, with no value read back from the device. The loop below is the way SubpopBench's
`_lisa_mixup_data` (and this harness before) does it: per round, per class (or attribute
value), `unique`, `nonzero` and boolean indexing, each a host read on a GPU. Side by side, in
one run:

1. time per call at several batch sizes (binary labels, the attribute agreeing with the label
   for 90 % of the examples);
2. the same distribution: over many draws of a batch of 24 whose examples are one-hot rows
   (so a mixture shows its two sources) and whose cells differ in size (so that rounds mix
   different numbers of pairs), the frequency of every unordered pair of sources,
   compared by total variation distance between the two implementations, and between two
   independent runs of the loop (the noise floor).

    python benchmarks/bench_lisa_mix.py [--draws 4000]
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import torch
import torch.nn.functional as F

import robustbench_mat  # noqa: F401  (sets the thread settings before torch starts)
from robustbench_mat.methods.mixing import beta, selective_mix


def loop_mix(values, y, a, n_classes, same_label, alpha):
    """The per-cell loop: rounds of pairs until len(values) mixtures, shuffled, cut."""
    targets = F.one_hot(y, n_classes).float()
    within, varying = (y, a) if same_label else (a, y)
    if len(torch.unique(varying)) < 2:
        return values, targets
    mixed_values, mixed_targets, total = [], [], 0
    while total < len(values):
        before = total
        for key in torch.unique(within):
            members = torch.nonzero(within == key)[:, 0]
            options = torch.unique(varying[members])
            if len(options) < 2:
                continue
            first, second = options[torch.randperm(len(options))[:2]]
            side1 = members[varying[members] == first]
            side2 = members[varying[members] == second]
            k = min(len(side1), len(side2))
            ratio = beta(alpha, k)
            mixed_values.append(
                ratio[:, None] * values[side1[:k]] + (1 - ratio[:, None]) * values[side2[:k]]
            )
            mixed_targets.append(
                ratio[:, None] * targets[side1[:k]] + (1 - ratio[:, None]) * targets[side2[:k]]
            )
            total += k
        if total == before:
            return values, targets
    order = torch.randperm(total)[: len(values)]
    return torch.cat(mixed_values)[order], torch.cat(mixed_targets)[order]


def batch(n: int, attributes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    y = torch.randint(2, (n,), generator=generator)
    agree = torch.rand(n, generator=generator) < 0.9
    a = torch.where(agree, y, torch.randint(attributes, (n,), generator=generator))
    return y, a


def per_call(function, n: int, dim: int, repeats: int) -> float:
    y, a = batch(n, 2, seed=n)
    x = torch.randn(n, dim)
    for _ in range(3):
        function(x, y, a)
    start = time.perf_counter()
    for _ in range(repeats):
        function(x, y, a)
    return (time.perf_counter() - start) / repeats


def pair_counts(function, draws: int, seed: int) -> Counter:
    """How often each unordered pair of sources is mixed, over `draws` draws (alternately
    intra-label and intra-domain) of one batch of 24: per class, cells of 6, 4 and 2 (class 0)
    and 2, 4 and 6 (class 1) examples over 3 attribute values, in a scrambled order."""
    torch.manual_seed(seed)
    order = torch.randperm(24, generator=torch.Generator().manual_seed(7))
    y = torch.tensor([0] * 12 + [1] * 12)[order]
    a = torch.tensor([0] * 6 + [1] * 4 + [2] * 2 + [0] * 2 + [1] * 4 + [2] * 6)[order]
    counts: Counter = Counter()
    for draw in range(draws):
        mixed, _ = function(torch.eye(24), y, a, draw % 2 == 0)
        for row in mixed:
            counts[tuple(torch.nonzero(row)[:, 0].tolist())] += 1
    return counts


def distance(one: Counter, other: Counter) -> float:
    total_one, total_other = sum(one.values()), sum(other.values())
    keys = set(one) | set(other)
    return 0.5 * sum(abs(one[k] / total_one - other[k] / total_other) for k in keys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=4000)
    args = parser.parse_args()
    print("| batch | per-cell loop (ms) | on-device table (ms) | ratio |")
    print("|---|---|---|---|")
    for n, repeats in ((32, 200), (128, 100), (1000, 20)):
        loop = per_call(lambda x, y, a: loop_mix(x, y, a, 2, True, 2.0), n, 512, repeats)
        table = per_call(lambda x, y, a: selective_mix(x, y, a, 2, 2, True, 2.0), n, 512, repeats)
        print(f"| {n} | {loop * 1e3:.2f} | {table * 1e3:.2f} | {loop / table:.1f}x |")
    loop_a = pair_counts(lambda x, y, a, s: loop_mix(x, y, a, 2, s, 2.0), args.draws, 0)
    loop_b = pair_counts(lambda x, y, a, s: loop_mix(x, y, a, 2, s, 2.0), args.draws, 1)
    table = pair_counts(lambda x, y, a, s: selective_mix(x, y, a, 2, 3, s, 2.0), args.draws, 2)
    print(
        f"pairs of sources over {args.draws} draws of 24 examples (3 attribute values): total "
        f"variation distance table vs loop {distance(table, loop_a):.4f}, loop vs loop "
        f"{distance(loop_b, loop_a):.4f}; {len(set(table) | set(loop_a))} distinct pairs"
    )


if __name__ == "__main__":
    main()
