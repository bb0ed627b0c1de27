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

`estimator="tracin"` is the cheaper approximation of Pruthi et al. 2020 ("Estimating Training
Data Influence by Tracing Gradient Descent", NeurIPS), for networks too large to train K times:
K models (default 1) on the whole training set, each saving `checkpoints` evenly spaced snapshots
w_t with their learning rates lr_t, and

    score_i = mean over models of  sum_t lr_t * || grad_w loss(f_{w_t}(x_i), y_i) ||^2,

the gradient taken over every trained parameter, of the dataset's loss (cross-entropy) of the
network's output: a method's own reweighting or logit shifts are not part of it, so it does not
measure a method that trains shifted logits (MAT: the shift fits the majority examples, whose
raw-network loss and gradients stay large; see the README's synthetic comparison). It approximates
self-influence up to a scale that differs between methods (their learning rates and
trajectories differ), so compare methods by the groups' ranks (`mean percentile`) and check it
against the subsampled estimate by rank correlation, which the summary reports when that
estimate exists for the same settings. Its output goes to the folder's `tracin/` subfolder;
`soft_score` is empty, `n_in` is K and `n_out` 0.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from robustbench_mat.data import BenchmarkDataset, GroupedSplit
from robustbench_mat.errors import RunFailed, UserError
from robustbench_mat.evaluation import metric_key, predict
from robustbench_mat.experiments import log_experiment, markdown_table
from robustbench_mat.method import Method
from robustbench_mat.registry import METHODS
from robustbench_mat.runner import RunResult, RunSpec, plan, random_subset, run_many

ESTIMATORS = ("subsample", "tracin")
DEFAULT_MODELS = {"subsample": 64, "tracin": 1}
MIN_MODELS = 3
SUBSET_SEED_STRIDE = 100_003
GRADIENT_CHUNK_FLOATS = 50_000_000  # per-example gradients held at once (200 MB in float32)


@dataclass
class MemorizationSettings:
    """What `experiment memorization` is asked to do."""

    dataset: str
    methods: list[str]
    models: int | None = None  # DEFAULT_MODELS[estimator] when None
    fraction: float = 0.5
    seed: int = 0
    regime: str | None = None
    steps: int | None = None
    hparams: dict[str, Any] | None = None
    data_params: dict[str, Any] | None = None
    data_dir: str | None = None
    device: str = "auto"
    progress: bool = True
    estimator: str = "subsample"
    checkpoints: int = 10  # TracIn's snapshots per model

    @property
    def n_models(self) -> int:
        return DEFAULT_MODELS[self.estimator] if self.models is None else self.models

    def check(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise UserError(f"unknown estimator {self.estimator!r}; known: {', '.join(ESTIMATORS)}")
        if self.estimator == "tracin":
            if self.checkpoints < 1:
                raise UserError(f"--checkpoints must be 1 or more, got {self.checkpoints}")
            return
        if self.n_models < 2 * MIN_MODELS:
            raise UserError(
                f"--models {self.n_models}: the estimate needs at least {MIN_MODELS} models that "
                f"trained on an example and {MIN_MODELS} that did not; use --models "
                f"{4 * MIN_MODELS} or more (64 gave the README's synthetic figures)"
            )
        if not 0 < self.fraction < 1:
            raise UserError(f"--fraction must be strictly between 0 and 1, got {self.fraction}")

    def comparable(self) -> dict[str, Any]:
        """The settings two estimates must share to be compared."""
        kept = ("dataset", "seed", "regime", "steps", "hparams", "data_params")
        return {k: v for k, v in asdict(self).items() if k in kept}

    def specs(self, method: str, workdir: Path) -> list[RunSpec]:
        specs = self._specs(method, workdir, None)
        if plan(specs[0]).inferrer is None:
            return specs
        return self._specs(method, workdir, self.seed)  # one inference run serves all K

    def _specs(self, method: str, workdir: Path, inference_seed: int | None) -> list[RunSpec]:
        tracin = self.estimator == "tracin"
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
                name=f"memorization {method} seed {self.seed + k} (tracin snapshots)"
                if tracin
                else f"memorization {method} model {k} ({self.fraction:g} subset)",
                tags={
                    "robustbench.experiment": "memorization",
                    "robustbench.estimator": self.estimator,
                    "robustbench.model": str(k),
                },
                show_progress=self.progress,
                train_fraction=None if tracin else self.fraction,
                train_subset_seed=0 if tracin else self.seed * SUBSET_SEED_STRIDE + k,
                snapshots=self.checkpoints if tracin else None,
                inference_seed=inference_seed,
                checkpoint_seconds=60.0,
            )
            for k in range(self.n_models)
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


def squared_gradient_norms(
    method: Method,
    split: GroupedSplit,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device: torch.device,
) -> torch.Tensor:
    """|| grad_w loss(f_w(x_i), y_i) ||^2 for every example i of `split`, over the method's
    trained parameters, in its current (eval-mode) state; float64, on the CPU."""
    from torch.func import functional_call, grad, vmap

    from robustbench_mat.stacking import MethodHook

    hook = MethodHook(method)
    params = {n: p.detach() for n, p in hook.named_parameters() if p.requires_grad}
    fixed = {
        **{n: p.detach() for n, p in hook.named_parameters() if not p.requires_grad},
        **dict(hook.named_buffers()),
    }

    def example_loss(trained: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor):
        outputs = functional_call(hook, (trained, fixed), ("predict", x[None]))
        return loss(outputs.float(), y[None])

    def vectorised(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        grads = vmap(grad(example_loss), in_dims=(None, 0, 0))(params, x, y)
        return sum(g.flatten(1).double().pow(2).sum(1) for g in grads.values())

    def one_by_one(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # hooks vmap cannot run
        trained = {n: p.requires_grad_() for n, p in params.items()}
        norms = []
        for xi, yi in zip(x, y, strict=True):
            grads = torch.autograd.grad(example_loss(trained, xi, yi), list(trained.values()))
            norms.append(sum(g.double().pow(2).sum() for g in grads))
        return torch.stack(norms)

    size = sum(p.numel() for p in params.values())
    chunk = max(1, min(1024, GRADIENT_CHUNK_FLOATS // max(size, 1)))
    compute, norms = vectorised, []
    for start in range(0, len(split), chunk):
        indices = torch.arange(start, min(start + chunk, len(split)))
        x, y = split.fetch(indices).to(device), split.y[indices].to(device)
        try:
            norms.append(compute(x, y).cpu())
        except RuntimeError as error:
            if compute is one_by_one or "vmap" not in str(error):
                raise
            compute = one_by_one
            norms.append(compute(x, y).cpu())
    return torch.cat(norms)


def tracin_scores(
    result: RunResult, spec: RunSpec, dataset: BenchmarkDataset, device: torch.device
) -> torch.Tensor:
    """TracIn self-influence of every training example: sum over the run's snapshots of
    lr_t * || grad loss ||^2."""
    folder = plan(spec).run_dir / "snapshots"
    paths = sorted(folder.glob("step-*.pt"))
    if not paths:
        raise RunFailed(f"run {result.run_id} saved no snapshots in {folder}")
    method = METHODS.get(result.method)(dataset, result.hparams).to(device)
    method.eval()
    train = dataset.split("train")
    total = torch.zeros(len(train), dtype=torch.float64)
    for path in paths:
        snapshot = torch.load(path, map_location="cpu", weights_only=True)
        method.load_state_dict(snapshot["method"])
        total += snapshot["lr"] * squared_gradient_norms(method, train, dataset.loss, device)
    return total


def _final_predictions(
    result: RunResult, spec: RunSpec, dataset: BenchmarkDataset
) -> tuple[torch.Tensor, torch.Tensor]:
    """Correctness and true-label probability of a run's final model on every training example."""
    method = METHODS.get(result.method)(dataset, result.hparams)
    state = torch.load(plan(spec).run_dir / "final_model.pt", map_location="cpu", weights_only=True)
    method.load_state_dict(state)
    method.eval()
    train = dataset.split("train")
    logits = predict(method.predict, train, torch.device("cpu"), dataset.eval_batch_size)
    probabilities = torch.softmax(logits.float(), dim=1)
    return (logits.argmax(1) == train.y), probabilities.gather(1, train.y[:, None])[:, 0]


def subsample_columns(
    specs: list[RunSpec], outcomes: list[RunResult], dataset: BenchmarkDataset
) -> dict[str, torch.Tensor]:
    """Feldman & Zhang's columns from the K subset models' final states."""
    n = len(dataset.split("train"))
    held_in = torch.zeros(len(specs), n, dtype=torch.bool)
    correct = torch.zeros(len(specs), n, dtype=torch.bool)
    p_true = torch.zeros(len(specs), n)
    for k, (spec, result) in enumerate(zip(specs, outcomes, strict=True)):
        held_in[k, random_subset(n, spec.train_fraction, spec.train_subset_seed)] = True
        correct[k], p_true[k] = _final_predictions(result, spec, dataset)
    return self_influence(correct, p_true, held_in)


def tracin_columns(
    specs: list[RunSpec], outcomes: list[RunResult], dataset: BenchmarkDataset
) -> dict[str, torch.Tensor]:
    """TracIn's columns: the mean score of the K models, each trained on every example."""
    device = plan(specs[0]).device
    score = sum(
        tracin_scores(result, spec, dataset, device)
        for spec, result in zip(specs, outcomes, strict=True)
    ) / len(specs)
    n = len(score)
    return {
        "score": score,
        "soft_score": torch.full((n,), torch.nan, dtype=torch.float64),
        "n_in": torch.full((n,), len(specs)),
        "n_out": torch.zeros(n, dtype=torch.long),
    }


def _train(settings: MemorizationSettings, method: str, workdir: Path):
    specs = settings.specs(method, workdir)
    outcomes = run_many(specs)
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    if failures:
        raise RunFailed(
            f"{len(failures)} of the {len(specs)} {method} models failed; the first: {failures[0]}"
        )
    return specs, outcomes, plan(specs[0]).dataset


def _scores_frame(method: str, dataset: BenchmarkDataset, columns: dict[str, torch.Tensor]):
    import pandas as pd

    train = dataset.split("train")
    names = dataset.group_names()
    groups = train.y * dataset.n_attributes + train.a
    return pd.DataFrame(
        {
            "method": method,
            "index": range(len(train)),
            "y": train.y.tolist(),
            "a": train.a.tolist(),
            "group": [names[g] for g in groups.tolist()],
            **{name: columns[name].tolist() for name in ("score", "soft_score", "n_in", "n_out")},
        }
    )


def _summary_rows(frame, outcomes: list[RunResult], estimator: str) -> list[dict[str, Any]]:
    """Per group of one method: mean score, and the share above 0.5 (subsample) or the mean
    percentile of the group's examples among all of the method's (tracin)."""
    test_avg = sum(r.final["test_avg"] for r in outcomes) / len(outcomes)
    test_wga = sum(r.final["test_wga"] for r in outcomes) / len(outcomes)
    percentile = frame["score"].rank(pct=True)
    rows = []
    for group, rows_of_group in frame.groupby("group", sort=False):
        scored = rows_of_group["score"].dropna()
        row = {
            "method": frame["method"].iloc[0],
            "group": group,
            "examples": len(rows_of_group),
            "unscored": int(rows_of_group["score"].isna().sum()),
            "mean score": scored.mean(),
        }
        if estimator == "subsample":
            row["mean soft score"] = rows_of_group["soft_score"].dropna().mean()
            row["share > 0.5"] = (scored > 0.5).mean()
        else:
            row["mean percentile"] = percentile[rows_of_group.index].mean()
        rows.append({**row, "models' test avg": test_avg, "models' test wga": test_wga})
    return rows


def rank_correlation(one, other) -> float:
    """Spearman's rank correlation of two equally indexed series (NaNs dropped pairwise)."""
    both = one.to_frame("one").join(other.to_frame("other")).dropna()
    return both["one"].rank().corr(both["other"].rank())


def _compare_with_subsample(settings: MemorizationSettings, scores, out: Path) -> str:
    """One line per method: TracIn's rank correlation with the subsampled estimate, when one
    was computed with the same settings in `out`'s parent folder."""
    import pandas as pd

    folder = out.parent
    saved = folder / "settings.json"
    if not saved.exists():
        return "No subsampled estimate to compare with (run the command without --estimator)."
    if json.loads(saved.read_text()) != _comparable_json(settings):
        return f"The subsampled estimate in {folder} used other settings: not compared."
    subsample = pd.read_csv(folder / "scores.csv")
    lines = []
    for method in settings.methods:
        ours = scores[scores["method"] == method].set_index("index")["score"]
        theirs = subsample[subsample["method"] == method].set_index("index")["score"]
        if theirs.empty:
            continue
        lines.append(
            f"- {method}: Spearman rank correlation with the subsampled estimate "
            f"{rank_correlation(ours, theirs):.3f} ({theirs.notna().sum()} scored examples)"
        )
    return "\n".join(lines) or "The subsampled estimate holds none of these methods."


def _comparable_json(settings: MemorizationSettings) -> dict[str, Any]:
    return json.loads(json.dumps(settings.comparable(), sort_keys=True, default=str))


def run_memorization(settings: MemorizationSettings, workdir: Path) -> tuple[str, Path]:
    """Train every method's models, score every training example with the settings' estimator,
    and write `scores.csv`, `memorization.md` and `memorization.png`; returns the table and the
    folder."""
    import pandas as pd

    settings.check()
    tracin = settings.estimator == "tracin"
    out = workdir / "experiments" / "memorization" / settings.dataset
    out = out / "tracin" if tracin else out
    out.mkdir(parents=True, exist_ok=True)
    columns_of = tracin_columns if tracin else subsample_columns
    frames, summaries = [], []
    for method in settings.methods:
        specs, outcomes, dataset = _train(settings, method, workdir)
        frame = _scores_frame(method, dataset, columns_of(specs, outcomes, dataset))
        frames.append(frame)
        summaries.extend(_summary_rows(frame, outcomes, settings.estimator))
    scores = pd.concat(frames, ignore_index=True)
    scores_path = out / "scores.csv"
    scores.to_csv(scores_path, index=False)
    summary = pd.DataFrame(summaries)
    table = markdown_table(
        [[_cell(v) for v in row] for row in summary.itertuples(index=False)], list(summary.columns)
    )
    if tracin:
        table += "\n\n" + _compare_with_subsample(settings, scores, out)
    table_path = out / "memorization.md"
    table_path.write_text(f"{_title(settings)}\n\n{table}\n")
    (out / "settings.json").write_text(json.dumps(_comparable_json(settings), indent=2))
    figure_path = out / "memorization.png"
    plot(scores, settings.methods, figure_path, settings.estimator)
    metrics = {
        f"{row['method']}.{metric_key(row['group'])}.mean_score": row["mean score"]
        for row in summaries
        if row["mean score"] == row["mean score"]  # not NaN
    }
    log_experiment(
        workdir,
        f"memorization {settings.dataset} ({settings.estimator})",
        metrics,
        [scores_path, table_path, figure_path],
        {
            "estimator": settings.estimator,
            "models": settings.n_models,
            **_estimator_params(settings),
            "seed": settings.seed,
            "methods": " ".join(settings.methods),
            "dataset": settings.dataset,
        },
        {
            "robustbench.experiment": "memorization",
            "robustbench.estimator": settings.estimator,
            "robustbench.models": str(settings.n_models),
        },
    )
    return table, out


def _estimator_params(settings: MemorizationSettings) -> dict[str, Any]:
    if settings.estimator == "tracin":
        return {"checkpoints": settings.checkpoints}
    return {"fraction": settings.fraction}


def _title(settings: MemorizationSettings) -> str:
    if settings.estimator == "tracin":
        return (
            f"Self-influence on {settings.dataset} (TracIn, Pruthi et al. 2020): "
            f"{settings.n_models} model(s) per method on the whole training set, "
            f"{settings.checkpoints} snapshots each, seed {settings.seed}."
        )
    return (
        f"Self-influence on {settings.dataset} (Feldman & Zhang's subsampled estimate): "
        f"{settings.n_models} models per method, each on {settings.fraction:g} of the training "
        f"set, seed {settings.seed}."
    )


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value != value:
            return "–"
        return f"{value:.3g}" if value and not 1e-3 <= abs(value) < 1e3 else f"{value:.3f}"
    return str(value)


def plot(scores, methods: list[str], path: Path, estimator: str = "subsample") -> None:
    """One panel per group: the distribution of self-influence scores (as shares of the group's
    scored examples, so that small groups read as well as large ones), one outline per method.
    TracIn's scores, positive and spread over decades, are shown on a log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(scores["group"]))
    figure, axes = plt.subplots(
        1, len(groups), figsize=(3.2 * len(groups), 3.0), sharey=True, squeeze=False
    )
    values_of = scores["score"]
    if estimator == "tracin":
        values_of = values_of.clip(lower=1e-12).apply(math.log10)
        low, high = math.floor(values_of.min()), math.ceil(values_of.max())
        bins = [low + (high - low) * i / 40 for i in range(41)]
        label, limits = "TracIn self-influence (log10)", (low, high)
    else:
        bins = [i / 20 - 1 for i in range(41)]
        label, limits = "self-influence", (-0.5, 1.05)
    for axis, group in zip(axes[0], groups, strict=True):
        for method in methods:
            chosen = (scores["group"] == group) & (scores["method"] == method)
            values = values_of[chosen].dropna()
            weights = [1 / max(len(values), 1)] * len(values)  # shares, comparable across groups
            axis.hist(
                values, bins=bins, weights=weights, histtype="step", linewidth=1.5, label=method
            )
        axis.set(title=f"{group} (n={int((scores['group'] == group).sum() / len(methods))})")
        axis.set_xlabel(label)
        axis.set_xlim(*limits)
    axes[0][0].set_ylabel("share of the group's training examples")
    axes[0][-1].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=150)
    plt.close(figure)
