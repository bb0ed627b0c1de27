"""Figure 1 of the MAT paper: ERM memorises the minority through example-specific noise; MAT
does not.

Three runs per seed, each 1000 full-batch gradient-descent updates of a bias-free linear model on
the `synthetic` dataset: ERM without noise (lr 3e-2), ERM with noise std 0.5 (lr 1e-2), and MAT
with noise std 0.5 and temperature 0.1, whose first phase is XRM with the plain mean held-in
loss and one global calibration, as in the paper's script. Accuracies are read at the last step.

The data of seed s are the authors' tensors bit for bit, and the networks start from the
authors' random stream (`init=authors`, see `synthetic`): ERM then repeats their run update for
update; MAT's networks and draws follow that stream in our order (XRM's twins first, with their
own split and label flips, then MAT's network), which is not theirs. Their "test" curves
and numbers are their va split (50/50, data seed s + 1), which is our val split: the figure
reports it as "va", next to our test split ("te", seed s + 2, which their script never uses).
Nothing is selected on va here: every number is the last step's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from robustbench_mat.evaluation import metric_key
from robustbench_mat.experiments import log_experiment, markdown_table, mean_std
from robustbench_mat.registry import DATASETS, METHODS
from robustbench_mat.runner import RunResult, RunSpec, plan, run
from robustbench_mat.tracking import Tracker


@dataclass(frozen=True)
class Setting:
    """One panel of the figure."""

    label: str
    slug: str
    method: str
    noise_std: float
    hparams: dict[str, Any]
    inference_hparams: dict[str, Any] = field(default_factory=dict)


SETTINGS = (
    Setting("ERM, σ=0", "erm_noise0", "erm", 0.0, {"lr": 3e-2}),
    Setting("ERM, σ=0.5", "erm_noise0.5", "erm", 0.5, {"lr": 1e-2}),
    Setting(
        "MAT, σ=0.5, τ=0.1",
        "mat_noise0.5",
        "mat",
        0.5,
        {"lr": 1e-2, "temperature": 0.1, "calibration": "global"},
        {"lr": 1e-2, "held_in_loss": "mean"},
    ),
)
STEPS = 1000
CHECKPOINT_SECONDS = 60.0
# Our splits and the names the figure gives them: the authors' tr, va and te are our train,
# val and test splits.
SPLITS = (("train", "train"), ("val", "va"), ("test", "te"))
COLUMNS = tuple(f"{part} {name}" for _, name in SPLITS for part in ("majority", "minority"))
SPLIT_LEGEND = (
    "train: the 90/10 training split (data seed s); va: the 50/50 split the authors plot and "
    'report as "test" (their va, seed s + 1, our val split); te: a second 50/50 split (their '
    "te, seed s + 2, our test split), which their script never uses"
)


def data_params(setting: Setting, seed: int) -> dict[str, Any]:
    """The authors' data for `seed`, and their networks' initial weights (see `synthetic`)."""
    return {"noise_std": setting.noise_std, "seed": seed, "init": "authors"}


def spec_for(setting: Setting, seed: int, workdir: Path, device: str, progress: bool) -> RunSpec:
    return RunSpec(
        method=setting.method,
        dataset="synthetic",
        seed=seed,
        regime="val-only",
        steps=STEPS,
        eval_every=1,
        checkpoint_every=STEPS // 4,
        # A run takes seconds: a checkpoint at most every minute (the last step always writes
        # one), as for tuning trials; each costs a save and an MLflow flush.
        checkpoint_seconds=CHECKPOINT_SECONDS,
        device=device,
        hparams={
            "batch_size": 0,
            "optimizer": "sgd",
            "momentum": 0.0,
            "weight_decay": 0.0,
            **setting.hparams,
        },
        data_params=data_params(setting, seed),
        inference_hparams=dict(setting.inference_hparams),
        workdir=workdir,
        kind="experiment",
        tags={"robustbench.experiment": "figure1"},
        show_progress=progress,
    )


def majority_minority_curves(history: pd.DataFrame, dataset) -> pd.DataFrame:
    """Accuracy on the majority (a == y) and minority (a != y) examples per step and split, in
    columns named as in `COLUMNS` (va is our val split, te our test split)."""
    curves = pd.DataFrame({"step": history["step"]})
    for split, name in SPLITS:
        data = dataset.split(split)
        for part, keep in (("majority", data.a == data.y), ("minority", data.a != data.y)):
            total = torch.zeros(len(history), dtype=torch.float64)
            count = 0
            for g, group_name in enumerate(data.eval_groups.names):
                members = data.eval_groups.membership[:, g] & keep
                n = int(members.sum())
                if n == 0:
                    continue
                column = f"{split}_group_acc.{metric_key(group_name)}"
                total += torch.tensor(history[column].to_numpy()) * n
                count += n
            curves[f"{part} {name}"] = (total / count).numpy()
    return curves


CURVE_STYLES = {
    "majority train": ("k", "-", 1.5, "majority train"),
    "minority train": ("k", "--", 1.5, "minority train"),
    "majority va": ("r", "-", 1.5, 'majority va (authors\' "test", seed+1)'),
    "minority va": ("r", "--", 1.5, 'minority va (authors\' "test", seed+1)'),
    "minority te": ("tab:gray", ":", 1.0, "minority te (unused by authors, seed+2)"),
}
PLANE = ((-2.0, 2.0), (-10.0, 10.0))  # (x_y, 5·x_a) shown under the curves
PLANE_POINTS = 200
COMBINED = "figure1_combined.png"
BAND = "min–max over seeds"


def boundary_surface(result: RunResult, dataset, run_dir: Path) -> torch.Tensor:
    """The final model's sharpened P(y=1) on the (x_y, x_a) plane, noise dimensions at 0, as a
    PLANE_POINTS x PLANE_POINTS grid (rows: x_a, columns: x_y)."""
    method = METHODS.get(result.method)(dataset, result.hparams)
    method.load_state_dict(
        torch.load(run_dir / "final_model.pt", map_location="cpu", weights_only=True)
    )
    grid_x, grid_y = _plane_grid()
    logits = _plane_logits(method, grid_x.flatten(), grid_y.flatten(), dataset.config["dim"])
    return torch.sigmoid(10 * (logits[:, 1] - logits[:, 0])).reshape(grid_x.shape)


def _plane_grid() -> tuple[torch.Tensor, torch.Tensor]:
    (x0, x1), (y0, y1) = PLANE
    xs, ys = torch.linspace(x0, x1, PLANE_POINTS), torch.linspace(y0, y1, PLANE_POINTS)
    return torch.meshgrid(xs, ys, indexing="xy")


def _draw_curves(axis, step, columns: dict[str, np.ndarray], title: str) -> None:
    """One line per column; a 2-d column (seeds x steps) is drawn as its mean and a min–max
    band."""
    for column, (color, style, width, label) in CURVE_STYLES.items():
        values = np.atleast_2d(columns[column])
        axis.plot(step, values.mean(0), color=color, linestyle=style, linewidth=width, label=label)
        if len(values) > 1:
            axis.fill_between(
                step, values.min(0), values.max(0), color=color, alpha=0.15, linewidth=0
            )
    axis.set(xlabel="update", ylabel="accuracy", ylim=(-0.02, 1.02), title=title)


def _draw_boundary(axis, surface: torch.Tensor, dataset, title: str) -> None:
    """The P(y=1) surface as filled contours, and `dataset`'s training points (x: minority)."""
    grid_x, grid_y = _plane_grid()
    axis.contourf(grid_x, grid_y, surface, levels=20, cmap="RdBu_r", alpha=0.6)
    train = dataset.split("train")
    minority = train.a != train.y
    for cls, color in ((0, "tab:blue"), (1, "tab:red")):
        for mask, marker in ((~minority, "o"), (minority, "x")):
            chosen = (train.y == cls) & mask
            axis.scatter(
                train.inputs[chosen, 0],
                train.inputs[chosen, 1],
                s=8,
                c=color,
                marker=marker,
                linewidths=0.8,
            )
    axis.set(
        xlabel="core feature x_y",
        ylabel="spurious feature 5·x_a",
        xlim=PLANE[0],
        ylim=PLANE[1],
        title=title,
    )


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_setting(
    setting: Setting, curves: pd.DataFrame, surface: torch.Tensor, dataset, path: Path
) -> None:
    """One seed's panel: accuracy curves on top, the decision boundary in the (x_y, x_a) plane
    below."""
    plt = _pyplot()
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(5, 7))
    columns = {c: curves[c].to_numpy() for c in CURVE_STYLES}
    _draw_curves(top, curves["step"].to_numpy(), columns, setting.label)
    top.legend(loc="lower right", fontsize=7)
    _draw_boundary(bottom, surface, dataset, "decision boundary (noise at 0); x: minority")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def combined_figure(
    panels: list[tuple[Setting, list[pd.DataFrame], list[torch.Tensor], object]], seeds: list[int]
):
    """The three settings side by side: per-group accuracy curves (mean over seeds, min–max
    band) on top, the decision boundary below (the surface averaged over seeds, each seed's
    P=0.5 line, the first seed's training points). `panels` holds (setting, per-seed curves,
    per-seed surfaces, first seed's dataset); returns the matplotlib figure."""
    plt = _pyplot()
    figure, axes = plt.subplots(
        2, len(panels), figsize=(4.6 * len(panels), 8.2), squeeze=False, layout="constrained"
    )
    grid_x, grid_y = _plane_grid()
    for column, (setting, curves, surfaces, dataset) in enumerate(panels):
        step = curves[0]["step"].to_numpy()
        stacked = {c: np.stack([seed[c].to_numpy() for seed in curves]) for c in CURVE_STYLES}
        _draw_curves(axes[0, column], step, stacked, setting.label)
        bottom = axes[1, column]
        _draw_boundary(
            bottom,
            torch.stack(surfaces).mean(0),
            dataset,
            f"boundary: mean over seeds, lines per seed;\npoints: seed {seeds[0]}, x: minority",
        )
        for surface in surfaces:
            bottom.contour(grid_x, grid_y, surface, levels=[0.5], colors="k", linewidths=0.6)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=3, fontsize=8)
    band = f"; band: {BAND}" if len(seeds) > 1 else ""
    figure.suptitle(
        f"Figure 1: mean over seeds {', '.join(map(str, seeds))}{band}; {STEPS} full-batch updates",
        fontsize=10,
    )
    return figure


def _plane_logits(method, xs: torch.Tensor, ys: torch.Tensor, dim: int) -> torch.Tensor:
    """Logits of the inputs that are zero but for (x_y, x_a) = (xs, ys), in chunks that reuse
    one zeroed buffer: the whole 40000 x dim grid would be a 290 MB allocation per plot."""
    chunk = 4096
    inputs = torch.zeros(min(chunk, len(xs)), dim)
    parts = []
    with torch.no_grad():
        for start in range(0, len(xs), chunk):
            stop = min(start + chunk, len(xs))
            block = inputs[: stop - start]
            block[:, 0], block[:, 1] = xs[start:stop], ys[start:stop]
            parts.append(method.predict(block))
    return torch.cat(parts)


def name_experiment_run(workdir: Path, run_id: str, name: str) -> None:
    """Give an experiment's training run its own MLflow name (the runner names every run
    `<method> <regime> seed <s>`, as tuning runs are named) and, if it inferred groups, tag its
    group-inference run with the experiment too."""
    tracker = Tracker(workdir)
    tags = tracker.client.get_run(run_id).data.tags
    tracker.set_tags(run_id, {"mlflow.runName": name})
    inference = tags.get("robustbench.inferred_groups.run_id")
    experiment = tags.get("robustbench.experiment")
    if inference and experiment:
        tracker.set_tags(
            inference,
            {"mlflow.runName": f"{name} (group inference)", "robustbench.experiment": experiment},
        )


def run_figure1(
    seeds: list[int], workdir: Path, device: str = "auto", plot: bool = True, progress: bool = True
) -> tuple[str, Path]:
    """Train every setting for every seed; returns the table (Markdown) and the output folder."""
    out = workdir / "experiments" / "figure1"
    final: dict[str, list[dict[str, float]]] = {s.label: [] for s in SETTINGS}
    all_curves: dict[str, list[pd.DataFrame]] = {s.label: [] for s in SETTINGS}
    surfaces: dict[str, list[torch.Tensor]] = {s.label: [] for s in SETTINGS}
    datasets: dict[str, object] = {}
    files = []
    for seed in seeds:
        for setting in SETTINGS:
            spec = spec_for(setting, seed, workdir, device, progress)
            result = run(spec)
            name_experiment_run(workdir, result.run_id, f"figure1 {setting.slug} seed {seed}")
            run_dir = plan(spec).run_dir
            dataset = DATASETS.get("synthetic")(**data_params(setting, seed))
            datasets.setdefault(setting.label, dataset)
            curves = majority_minority_curves(pd.read_csv(run_dir / "history.csv"), dataset)
            final[setting.label].append(curves.iloc[-1][list(COLUMNS)].to_dict())
            if plot:
                all_curves[setting.label].append(curves)
                surface = boundary_surface(result, dataset, run_dir)
                surfaces[setting.label].append(surface)
                folder = out / f"seed{seed}"
                folder.mkdir(parents=True, exist_ok=True)
                path = folder / f"{setting.slug}.png"
                plot_setting(setting, curves, surface, dataset, path)
                files.append(path)
    if plot:
        out.mkdir(parents=True, exist_ok=True)
        figure = combined_figure(
            [(s, all_curves[s.label], surfaces[s.label], datasets[s.label]) for s in SETTINGS],
            seeds,
        )
        combined = out / COMBINED
        figure.savefig(combined, dpi=110)
        _pyplot().close(figure)
        files.insert(0, combined)
    rows = [
        [label] + [mean_std([r[c] for r in records]) for c in COLUMNS]
        for label, records in final.items()
    ]
    table = markdown_table(rows, ["setting", *COLUMNS])
    per_seed = markdown_table(
        [
            [label] + [f"{r['minority va']:.3f}" for r in records]
            for label, records in final.items()
        ],
        ["minority va (authors' test) per seed", *map(str, seeds)],
    )
    table = f"{table}\n\n{per_seed}"
    if files:
        listing = "\n".join(f"- `{path.relative_to(out)}`" for path in files)
        table += (
            f"\n\nFigures (under {out}): `{COMBINED}` has the three settings side by side, "
            f"mean over seeds with a {BAND} band, decision boundaries below; the others are "
            f"the per-seed panels.\n\n{listing}"
        )
    out.mkdir(parents=True, exist_ok=True)
    table_path = out / "figure1.md"
    table_path.write_text(
        f"Final accuracy after {STEPS} full-batch updates, mean ± std over seeds "
        f"{', '.join(map(str, seeds))}.\n\n{table}\n\n{SPLIT_LEGEND}.\n"
    )
    metrics = {
        f"{s.slug}.{c.replace(' ', '_')}": sum(r[c] for r in final[s.label]) / len(seeds)
        for s in SETTINGS
        for c in COLUMNS
    }
    log_experiment(
        workdir,
        "figure1",
        metrics,
        [table_path, *files],
        {"seeds": " ".join(map(str, seeds)), "steps": STEPS},
    )
    return f"{table}\n\n{SPLIT_LEGEND}.", out
