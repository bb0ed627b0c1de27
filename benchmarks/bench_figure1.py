"""Time `robustbench-mat experiment figure1` (one seed) against a stand-in for the authors'
script and against a bare torch loop, side by side.

- The command is timed as a user runs it, in a fresh process and a fresh work directory (so it
  includes starting Python, importing torch and MLflow, creating the MLflow store, evaluating
  every step, logging, checkpointing and the three plots).
- The stand-in re-implements, in plain torch, what the authors' Figure-1 script
  (interpretable_experiment.py in facebookresearch/Pitfalls-of-Memorization) does for the same
  three runs, also in a fresh process: the same data (drawn as their `problem_1`), the same 4000
  full-batch updates (ERM σ=0 lr 3e-2, ERM σ=0.5 lr 1e-2, XRM's twins for 1000 steps, then MAT
  for 1000 steps), before each ERM and MAT update the accuracy of the majority and the minority
  of train and of va (their "test") as they compute it (forward passes with autograd on, one
  `.item()` per number), and their three plots saved at 300 dpi with matplotlib.
- The bare loop does only the 4000 updates on the same tensors (ERM without noise, ERM with
  noise, XRM's twins, MAT), in this process: no evaluation, no tracking, no plots.

Each repetition times the three one after the other; the medians over `--repeats` are printed,
with the two ratios the project aims at (issue 13 §2): the command at most 0.5x the stand-in and
at most 1.5x the bare loop.

    python benchmarks/bench_figure1.py [--seed 1234] [--repeats 3] [--no-plot-too]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

STEPS = 1000
N_EXAMPLES, DIM = 1000, 1800


def bare_updates(seed: int) -> float:
    """Wall time of the 4000 updates in plain torch."""
    from robustbench_mat.methods.mat import calibrated_log_prior
    from robustbench_mat.registry import DATASETS

    torch.set_num_threads(torch.get_num_threads())
    # The first optimiser step imports torch._dynamo (seconds), the first use of a dataset its
    # plugin module: neither is part of the updates.
    DATASETS.get("synthetic")
    warm = torch.nn.Linear(2, 2)
    torch.optim.SGD(warm.parameters(), lr=0.1).step()
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


# The stand-in for the authors' script: torch and matplotlib only, no robustbench_mat import.


def draw_split(seed: int, split: str, noise_std: float):
    """One split of the authors' synthetic task, drawn in their order from the global RNG:
    (inputs, labels, majority mask)."""
    torch.manual_seed(seed + {"tr": 0, "va": 1, "te": 2}[split])
    majority = 0.9 if split == "tr" else 0.5
    y = torch.zeros(N_EXAMPLES, 1).bernoulli_(0.5)
    sign = 2 * y - 1
    core = (torch.randn(N_EXAMPLES, 1) * 0.12 - 1) * sign
    spurious = (torch.randn(N_EXAMPLES, 1) * 0.12 - 1) * sign
    spurious[torch.randperm(N_EXAMPLES)[: int((1 - majority) * N_EXAMPLES)]] *= -1
    noise = noise_std * torch.randn(N_EXAMPLES, DIM - 2)
    x = torch.cat((core, 5 * spurious, noise), 1)
    return x, y.squeeze(1).long(), x[:, :2].prod(1) > 0


def group_accuracies(net, x, y, majority) -> tuple[float, float]:
    """Majority and minority accuracy as the authors read them: a forward pass with autograd on,
    one `.item()` per number."""
    hits = net(x).argmax(1).eq(y)
    return hits[majority].float().mean().item(), hits[~majority].float().mean().item()


def evaluate_into(curves: dict[str, list], step: int, net, splits) -> None:
    curves["step"].append(step)
    for name, (x, y, majority) in splits:
        majority_acc, minority_acc = group_accuracies(net, x, y, majority)
        curves[f"maj_{name}"].append(majority_acc)
        curves[f"min_{name}"].append(minority_acc)


def new_curves() -> dict[str, list]:
    return {k: [] for k in ("step", "maj_tr", "min_tr", "maj_va", "min_va", "loss")}


def stand_in_erm(seed: int, noise_std: float, lr: float):
    torch.manual_seed(seed)
    train = draw_split(seed, "tr", noise_std)
    val = draw_split(seed, "va", noise_std)
    net = torch.nn.Linear(DIM, 2, bias=False)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.0)
    curves = new_curves()
    for step in range(1, STEPS + 1):
        evaluate_into(curves, step, net, (("va", val), ("tr", train)))
        optimizer.zero_grad()
        loss = F.cross_entropy(net(train[0]), train[1])
        loss.backward()
        curves["loss"].append(loss.item())
        optimizer.step()
    return curves, net, train


def stand_in_mat(seed: int, noise_std: float, lr: float, temperature: float):
    torch.manual_seed(seed)
    train = draw_split(seed, "tr", noise_std)
    val = draw_split(seed, "va", noise_std)
    x, y, _ = train
    nets = [torch.nn.Linear(DIM, 2, bias=False) for _ in range(3)]
    optimizers = [torch.optim.SGD(n.parameters(), lr=lr, momentum=0.0) for n in nets]
    first = torch.randint(2, (N_EXAMPLES, 1))  # 1: the example is twin a's
    labels = y.clone()
    for _ in range(STEPS):  # XRM: each twin learns its half, labels flip to the other's guess
        logits_a, logits_b = nets[0](x), nets[1](x)
        held_in = logits_a * first + logits_b * (1 - first)
        held_out = logits_a * (1 - first) + logits_b * first
        for optimizer in optimizers[:2]:
            optimizer.zero_grad()
        F.cross_entropy(held_in, labels).backward()
        for optimizer in optimizers[:2]:
            optimizer.step()
        confidence, guess = held_out.detach().softmax(1).max(1)
        flip = torch.bernoulli((confidence - 0.5) * 2).long()
        labels = flip * guess + (1 - flip) * labels
    # MAT: a calibrated log prior of the held-out predictions shifts the third network's logits.
    p_guess = (held_out.detach() / temperature).softmax(1)
    joint = torch.stack([p_guess[y == k].sum(0) / len(y) for k in y.unique()], 1)
    shift = torch.log(p_guess @ (joint / joint.sum(1, keepdim=True)) + 1e-6)
    net, optimizer, curves = nets[2], optimizers[2], new_curves()
    for step in range(1, STEPS + 1):
        evaluate_into(curves, step, net, (("va", val), ("tr", train)))
        optimizer.zero_grad()
        loss = F.cross_entropy(net(x) + shift, y)
        loss.backward()
        curves["loss"].append(loss.item())
        optimizer.step()
    return curves, net, train


def stand_in_plot(curves, net, train, path: Path, title: str) -> None:
    """Accuracy curves above, the decision boundary in the (x_y, x_a) plane below, at 300 dpi."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LinearSegmentedColormap

    plt.rcParams["font.family"] = "serif"
    plt.rcParams["mathtext.fontset"] = "cm"
    background = LinearSegmentedColormap.from_list("bg", ["#5CA0D4", "white", "#F6B66A"], N=100)
    figure, (top, bottom) = plt.subplots(
        2, 1, gridspec_kw={"height_ratios": [2, 3]}, figsize=(4.8, 8)
    )
    for key, label, color, style, width in (
        ("maj_tr", "Majority Train", "k", "-", 2.5),
        ("min_tr", "Minority Train", "k", "--", 2.5),
        ("maj_va", "Majority Test", "#DF3000", "-", 2),
        ("min_va", "Minority Test", "#DF3000", "--", 2),
    ):
        top.plot(curves["step"], curves[key], label=label, c=color, ls=style, lw=width, alpha=0.75)
    top.set_xlabel("Epochs", fontsize=13)
    top.set_ylabel("Accuracy", fontsize=13)
    top.set_title(title, fontsize=16)
    top.legend(frameon=False, fontsize=12)
    top.grid(color="gray", linestyle="--", linewidth=0.5, alpha=0.6)
    top.set_xlim(-10, STEPS + 10)
    top.set_ylim(-0.01, 1.01)

    x, y, _ = train
    grid_x, grid_y = np.meshgrid(np.linspace(-2, 2, 100), np.linspace(-10, 10, 100))
    plane = torch.zeros(grid_x.size, DIM)
    plane[:, 0], plane[:, 1] = torch.from_numpy(grid_x.ravel()), torch.from_numpy(grid_y.ravel())
    logits = net(plane)
    surface = torch.sigmoid(10 * (logits[:, 1] - logits[:, 0])).reshape(100, 100)
    surface = surface.detach().numpy()
    bottom.contourf(
        grid_x,
        grid_y,
        surface,
        np.linspace(0, 1, 20),
        cmap=background,
        alpha=0.8,
        vmin=0,
        vmax=1,
        extend="both",
    )
    bottom.contour(grid_x, grid_y, surface, [0.5], linewidths=1.0, colors="white")
    bottom.scatter(x[:, 0], x[:, 1], c="white", s=60, edgecolor="none", zorder=1)
    bottom.scatter(
        x[:, 0],
        x[:, 1],
        c=np.array(["#3A7BC2", "#EE944F"])[y.numpy()],
        s=50,
        edgecolor="white",
        linewidth=0.5,
        zorder=2,
        alpha=0.8,
    )
    bottom.axhline(0, ls="--", lw=1, color="white", alpha=0.5)
    bottom.axvline(0, ls="--", lw=1, color="white", alpha=0.5)
    bottom.set_xlim(-2, 2)
    bottom.set_ylim(-10, 10)
    bottom.grid(color="white", linestyle="--", lw=0.5, alpha=0.5)
    bottom.set_xlabel(r"$x_y$", fontsize=16, labelpad=0)
    bottom.set_ylabel(r"$x_a$", fontsize=16, labelpad=-5, rotation=0)
    plt.tight_layout()
    figure.savefig(path, dpi=300)
    plt.close(figure)


def stand_in(seed: int, out: Path) -> None:
    """The three runs and plots of the authors' Figure-1 script, in plain torch."""
    for name, title, (curves, net, train) in (
        ("ERM_0.png", r"ERM - $\sigma$ = 0", stand_in_erm(seed, 0.0, 3e-2)),
        ("ERM_1.png", r"ERM - $\sigma$ = 0.5", stand_in_erm(seed, 0.5, 1e-2)),
        ("MAT_1.png", r"MAT - $\sigma$ = 0.5", stand_in_mat(seed, 0.5, 1e-2, 0.1)),
    ):
        stand_in_plot(curves, net, train, out / name, title)


def stand_in_time(seed: int) -> float:
    """The stand-in as a user runs a script: a fresh Python process."""
    with tempfile.TemporaryDirectory() as out:
        args = [sys.executable, __file__, "--stand-in", out, "--seed", str(seed)]
        start = time.perf_counter()
        subprocess.run(args, check=True, capture_output=True)
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
    parser.add_argument("--repeats", type=int, default=3, help="side-by-side repetitions")
    parser.add_argument(
        "--no-plot-too", action="store_true", help="also time the command with --no-plot"
    )
    parser.add_argument("--stand-in", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stand_in:  # the child process of `stand_in_time`
        stand_in(args.seed, Path(args.stand_in))
        return
    times: dict[str, list[float]] = {"command": [], "stand-in": [], "bare": []}
    if args.no_plot_too:
        times["command --no-plot"] = []
    for repeat in range(args.repeats):
        times["command"].append(command_time(args.seed, plot=True))
        if args.no_plot_too:
            times["command --no-plot"].append(command_time(args.seed, plot=False))
        times["stand-in"].append(stand_in_time(args.seed))
        times["bare"].append(bare_updates(args.seed))
        print(
            f"repetition {repeat + 1}: "
            + ", ".join(f"{name} {values[-1]:.2f} s" for name, values in times.items())
            + f"; command / stand-in {times['command'][-1] / times['stand-in'][-1]:.2f}, "
            f"command / bare {times['command'][-1] / times['bare'][-1]:.2f}",
            flush=True,
        )
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"medians of {args.repeats} (seed {args.seed}, {torch.get_num_threads()} threads):")
    print(f"  experiment figure1, one seed, with plots: {median['command']:.2f} s")
    if args.no_plot_too:
        print(f"  experiment figure1 --no-plot:            {median['command --no-plot']:.2f} s")
    print(f"  stand-in for the authors' script:         {median['stand-in']:.2f} s")
    print(f"  bare torch loop, 4000 updates:            {median['bare']:.2f} s")
    print(
        f"  command / stand-in: {median['command'] / median['stand-in']:.2f} (goal <= 0.5); "
        f"command / bare loop: {median['command'] / median['bare']:.2f} (goal <= 1.5)"
    )
    # Other work on the machine slows whichever timing it overlaps: the ratios within each
    # repetition, taken side by side, are the steadier figures.
    pairs = list(zip(times["command"], times["stand-in"], times["bare"], strict=True))
    print(
        "  median of the repetitions' own ratios: command / stand-in "
        f"{statistics.median(c / s for c, s, _ in pairs):.2f}, command / bare loop "
        f"{statistics.median(c / b for c, _, b in pairs):.2f}"
    )


if __name__ == "__main__":
    main()
