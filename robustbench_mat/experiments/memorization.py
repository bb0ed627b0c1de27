"""What a method memorizes, and whose examples: self-influence per training example and group.

The estimator is the subsampled leave-out estimate of Feldman & Zhang 2020 ("What neural
networks memorize and why", NeurIPS): K models per method, model k trained on its own random
subset of round(fraction x n) training examples (drawn without replacement, seed `seed * 100003
+ k`; the model's own seed is `seed + k`). The self-influence of example i is

    score_i = mean accuracy on i of the models that trained on i
              - mean accuracy on i of the models that did not,

and `soft_score` the same with the probability of the true label. Both use each model's final
state. An example held in or left out by fewer than `MIN_MODELS` models gets no score (it is
counted in the summary). Every model is an ordinary cached run (`--workdir`), so a killed
experiment continues with the models already trained; models that can be stacked
(`stacking`) train together.

Methods that consume inferred groups (MAT) use the artifact of the full training set: one XRM
inference run (seed `seed`) on every training example, whose held-out logits cover them all,
shared by the K models; only the
method's own model is trained on the subset. A method's first stage (JTT's ERM model) also sees
the whole training set. The paper measures self-influence with the same estimator.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from robustbench_mat.data import BenchmarkDataset
from robustbench_mat.errors import RunFailed, UserError
from robustbench_mat.evaluation import metric_key, predict
from robustbench_mat.experiments import log_experiment, markdown_table
from robustbench_mat.registry import METHODS
from robustbench_mat.runner import RunResult, RunSpec, plan, random_subset, run_many

MIN_MODELS = 3
SUBSET_SEED_STRIDE = 100_003


@dataclass
class MemorizationSettings:
    """What `experiment memorization` is asked to do."""

    dataset: str
    methods: list[str]
    models: int = 64
    fraction: float = 0.5
    seed: int = 0
    regime: str | None = None
    steps: int | None = None
    hparams: dict[str, Any] | None = None
    data_params: dict[str, Any] | None = None
    data_dir: str | None = None
    device: str = "auto"
    progress: bool = True

    def specs(self, method: str, workdir: Path) -> list[RunSpec]:
        specs = self._specs(method, workdir, None)
        if plan(specs[0]).inferrer is None:
            return specs
        return self._specs(method, workdir, self.seed)  # one inference run serves all K

    def _specs(self, method: str, workdir: Path, inference_seed: int | None) -> list[RunSpec]:
        return [
            RunSpec(
                method=method,
                dataset=self.dataset,
                seed=self.seed + k,
                regime=self.regime,
                steps=self.steps,
                hparams=dict(self.hparams or {}),
                data_params=dict(self.data_params or {}),
                data_dir=self.data_dir,
                workdir=workdir,
                device=self.device,
                kind="experiment",
                tags={"robustbench.experiment": "memorization", "robustbench.model": str(k)},
                show_progress=self.progress,
                train_fraction=self.fraction,
                train_subset_seed=self.seed * SUBSET_SEED_STRIDE + k,
                inference_seed=inference_seed,
                checkpoint_seconds=60.0,
            )
            for k in range(self.models)
        ]


def self_influence(
    correct: torch.Tensor, p_true: torch.Tensor, held_in: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Feldman & Zhang's estimate from K models' results on n examples (each K x n):
    `score` and `soft_score` (NaN where fewer than MIN_MODELS models held the example in, or
    left it out), and the counts `n_in`, `n_out`."""
    held_in = held_in.bool()
    n_in = held_in.sum(0)
    n_out = (~held_in).sum(0)

    def difference(values: torch.Tensor) -> torch.Tensor:
        values = values.double()
        mean_in = (values * held_in).sum(0) / n_in.clamp(min=1)
        mean_out = (values * ~held_in).sum(0) / n_out.clamp(min=1)
        scored = (n_in >= MIN_MODELS) & (n_out >= MIN_MODELS)
        return torch.where(scored, mean_in - mean_out, torch.nan)

    return {
        "score": difference(correct),
        "soft_score": difference(p_true),
        "n_in": n_in,
        "n_out": n_out,
    }


def _final_predictions(
    result: RunResult, spec: RunSpec, dataset: BenchmarkDataset
) -> tuple[torch.Tensor, torch.Tensor]:
    """Correctness and true-label probability of a run's final model on every training example."""
    method = METHODS.get(result.method)(dataset, result.hparams)
    state = torch.load(plan(spec).run_dir / "final_model.pt", weights_only=True)
    method.load_state_dict(state)
    method.eval()
    train = dataset.split("train")
    logits = predict(method.predict, train, torch.device("cpu"), dataset.eval_batch_size)
    probabilities = torch.softmax(logits.float(), dim=1)
    return (logits.argmax(1) == train.y), probabilities.gather(1, train.y[:, None])[:, 0]


def run_memorization(settings: MemorizationSettings, workdir: Path) -> tuple[str, Path]:
    """Train the K subset models of every method, score every training example, and write
    `scores.csv`, `memorization.md` and `memorization.png`; returns the table and the folder."""
    import pandas as pd

    if settings.models < 2 * MIN_MODELS:
        raise UserError(
            f"--models {settings.models}: the estimate needs at least {MIN_MODELS} models that "
            f"trained on an example and {MIN_MODELS} that did not; use --models "
            f"{4 * MIN_MODELS} or more (64 gave the README's synthetic figures)"
        )
    if not 0 < settings.fraction < 1:
        raise UserError(f"--fraction must be strictly between 0 and 1, got {settings.fraction}")
    out = workdir / "experiments" / "memorization" / settings.dataset
    out.mkdir(parents=True, exist_ok=True)
    frames, summaries = [], []
    for method in settings.methods:
        specs = settings.specs(method, workdir)
        outcomes = run_many(specs)
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        if failures:
            raise RunFailed(
                f"{len(failures)} of the {len(specs)} {method} models failed; the first: "
                f"{failures[0]}"
            )
        dataset = plan(specs[0]).dataset
        train = dataset.split("train")
        n = len(train)
        held_in = torch.zeros(len(specs), n, dtype=torch.bool)
        correct = torch.zeros(len(specs), n, dtype=torch.bool)
        p_true = torch.zeros(len(specs), n)
        for k, (spec, result) in enumerate(zip(specs, outcomes, strict=True)):
            held_in[k, random_subset(n, spec.train_fraction, spec.train_subset_seed)] = True
            correct[k], p_true[k] = _final_predictions(result, spec, dataset)
        scores = self_influence(correct, p_true, held_in)
        groups = train.y * dataset.n_attributes + train.a
        names = dataset.group_names()
        frame = pd.DataFrame(
            {
                "method": method,
                "index": range(n),
                "y": train.y.tolist(),
                "a": train.a.tolist(),
                "group": [names[g] for g in groups.tolist()],
                "score": scores["score"].tolist(),
                "soft_score": scores["soft_score"].tolist(),
                "n_in": scores["n_in"].tolist(),
                "n_out": scores["n_out"].tolist(),
            }
        )
        frames.append(frame)
        test_avg = sum(r.final["test_avg"] for r in outcomes) / len(outcomes)
        test_wga = sum(r.final["test_wga"] for r in outcomes) / len(outcomes)
        for group, rows in frame.groupby("group", sort=False):
            scored = rows["score"].dropna()
            summaries.append(
                {
                    "method": method,
                    "group": group,
                    "examples": len(rows),
                    "unscored": int(rows["score"].isna().sum()),
                    "mean score": scored.mean(),
                    "mean soft score": rows["soft_score"].dropna().mean(),
                    "share > 0.5": (scored > 0.5).mean(),
                    "models' test avg": test_avg,
                    "models' test wga": test_wga,
                }
            )
    scores_frame = pd.concat(frames, ignore_index=True)
    scores_path = out / "scores.csv"
    scores_frame.to_csv(scores_path, index=False)
    summary = pd.DataFrame(summaries)
    table = markdown_table(
        [[_cell(v) for v in row] for row in summary.itertuples(index=False)], list(summary.columns)
    )
    table_path = out / "memorization.md"
    table_path.write_text(
        f"Self-influence on {settings.dataset} (Feldman & Zhang's subsampled estimate): "
        f"{settings.models} models per method, each on {settings.fraction:g} of the training "
        f"set, seed {settings.seed}.\n\n{table}\n"
    )
    figure_path = out / "memorization.png"
    plot(scores_frame, settings.methods, figure_path)
    metrics = {
        f"{row['method']}.{metric_key(row['group'])}.mean_score": row["mean score"]
        for row in summaries
        if row["mean score"] == row["mean score"]  # not NaN
    }
    log_experiment(
        workdir,
        f"memorization {settings.dataset}",
        metrics,
        [scores_path, table_path, figure_path],
        {
            "estimator": "subsample",
            "models": settings.models,
            "fraction": settings.fraction,
            "seed": settings.seed,
            "methods": " ".join(settings.methods),
            "dataset": settings.dataset,
        },
    )
    return table, out


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "–" if value != value else f"{value:.3f}"
    return str(value)


def plot(scores, methods: list[str], path: Path) -> None:
    """One panel per group: the distribution of self-influence scores (as shares of the group's
    scored examples, so that small groups read as well as large ones), one outline per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(scores["group"]))
    figure, axes = plt.subplots(
        1, len(groups), figsize=(3.2 * len(groups), 3.0), sharey=True, squeeze=False
    )
    bins = [i / 20 - 1 for i in range(41)]
    for axis, group in zip(axes[0], groups, strict=True):
        for method in methods:
            values = scores[(scores["group"] == group) & (scores["method"] == method)]["score"]
            values = values.dropna()
            weights = [1 / max(len(values), 1)] * len(values)  # shares, comparable across groups
            axis.hist(
                values, bins=bins, weights=weights, histtype="step", linewidth=1.5, label=method
            )
        axis.set(title=f"{group} (n={int((scores['group'] == group).sum() / len(methods))})")
        axis.set_xlabel("self-influence")
        axis.set_xlim(-0.5, 1.05)
    axes[0][0].set_ylabel("share of the group's training examples")
    axes[0][-1].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=150)
    plt.close(figure)
