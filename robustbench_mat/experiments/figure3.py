"""Figure 3 of the MAT paper: good, bad and ugly memorisation in a 1-d regression.

An MLP (31 -> 300 -> 300 -> 1, tanh) is trained by full-batch Adam (lr 1e-3) on the
`good-bad-ugly` dataset until the training MSE falls below 1e-6 (at most 1e5 steps), once per
strength of the example-specific features. Good memorisation (1e-4) absorbs only the label
noise; bad (1e-3) memorises everything, the true wiggle included; ugly (0) has nothing to
memorise with and overfits through x itself.
"""

from __future__ import annotations

from pathlib import Path

import torch

from robustbench_mat.experiments import log_experiment, markdown_table, mean_std
from robustbench_mat.experiments.figure1 import name_experiment_run
from robustbench_mat.registry import DATASETS, METHODS
from robustbench_mat.runner import RunSpec, plan, run

SETTINGS = (("good", 1e-4), ("bad", 1e-3), ("ugly", 0.0))
STOP_LOSS = 1e-6
MAX_STEPS = 100_000


def spec_for(feature_std: float, seed: int, workdir: Path, device: str, progress: bool):
    return RunSpec(
        method="erm",
        dataset="good-bad-ugly",
        seed=seed,
        steps=MAX_STEPS,
        eval_every=1000,
        checkpoint_every=5000,
        device=device,
        stop_loss=STOP_LOSS,
        data_params={"feature_std": feature_std, "seed": seed},
        workdir=workdir,
        kind="experiment",
        tags={"robustbench.experiment": "figure3"},
        show_progress=progress,
    )


def sweep_prediction(dataset, run_dir: Path, hparams: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The final model's prediction on the whole sweep: the extra features are zero except at
    the training points, which keep theirs."""
    method = METHODS.get("erm")(dataset, hparams)
    method.load_state_dict(
        torch.load(run_dir / "final_model.pt", map_location="cpu", weights_only=True)
    )
    xs, train_idx = dataset.sweep()
    inputs = torch.zeros(len(xs), 1 + dataset.config["extra_dims"])
    inputs[:, 0] = xs
    inputs[train_idx] = dataset.split("train").inputs
    with torch.no_grad():
        return xs, method.predict(inputs).squeeze(1)


Panel = tuple[str, float, object, Path, dict, float]


def panel_title(name: str, std: float, test_mse: float) -> str:
    """A panel's title: the setting, its feature strength and the run's test MSE."""
    return f"{name}: σ_ε = {std:g}\ntest MSE = {test_mse:.4f}"


def draw_figure(panels: list[Panel]):
    """The figure: one panel per (name, std, dataset, run_dir, hparams, test_mse), the true
    function, the final prediction over the sweep and the training points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from robustbench_mat.datasets.good_bad_ugly import true_function

    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), sharey=True)
    for axis, (name, std, dataset, run_dir, hparams, test_mse) in zip(axes, panels, strict=True):
        xs, prediction = sweep_prediction(dataset, run_dir, hparams)
        train = dataset.split("train")
        axis.plot(xs, true_function(xs), "k--", linewidth=1, label="true f")
        axis.plot(xs, prediction, color="tab:red", linewidth=1.2, label="prediction")
        axis.scatter(
            train.inputs[:, 0], train.y, s=14, color="tab:blue", zorder=3, label="training points"
        )
        axis.set(
            xlim=(-1.2, 1.2), ylim=(-0.5, 0.5), title=panel_title(name, std, test_mse), xlabel="x"
        )
    axes[0].legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    return figure


def plot(panels: list[Panel], path: Path) -> None:
    """Draw the panels and save them to `path`."""
    import matplotlib.pyplot as plt

    figure = draw_figure(panels)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run_figure3(
    seeds: list[int], workdir: Path, device: str = "auto", draw: bool = True, progress: bool = True
) -> tuple[str, Path]:
    """Train the three settings for every seed; returns the table (Markdown) and the folder."""
    out = workdir / "experiments" / "figure3"
    out.mkdir(parents=True, exist_ok=True)
    mse: dict[str, list[float]] = {name: [] for name, _ in SETTINGS}
    steps: dict[str, list[int]] = {name: [] for name, _ in SETTINGS}
    files = []
    for seed in seeds:
        panels = []
        for name, std in SETTINGS:
            spec = spec_for(std, seed, workdir, device, progress)
            result = run(spec)
            name_experiment_run(workdir, result.run_id, f"figure3 {name} seed {seed}")
            mse[name].append(result.final["test_mse"])
            steps[name].append(result.final["step"])
            dataset = DATASETS.get("good-bad-ugly")(feature_std=std, seed=seed)
            panels.append(
                (name, std, dataset, plan(spec).run_dir, result.hparams, result.final["test_mse"])
            )
        if draw:
            path = out / f"good_bad_ugly_seed{seed}.png"
            plot(panels, path)
            files.append(path)
    rows = [
        [name, f"{std:g}", mean_std(steps[name], 0), mean_std(mse[name], 4)]
        for name, std in SETTINGS
    ]
    table = markdown_table(
        rows, ["setting", "σ_ε", "steps to loss < 1e-6", "MSE to the true f (unseen x)"]
    )
    table_path = out / "figure3.md"
    table_path.write_text(f"Seeds {', '.join(map(str, seeds))}.\n\n{table}\n")
    metrics = {f"{name}.test_mse": sum(mse[name]) / len(seeds) for name, _ in SETTINGS}
    log_experiment(
        workdir,
        "figure3",
        metrics,
        [table_path, *files],
        {"seeds": " ".join(map(str, seeds)), "stop_loss": STOP_LOSS},
    )
    return table, out
