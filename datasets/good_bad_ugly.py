"""The regression task of the MAT paper's Figure 3: good, bad and ugly memorisation."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from robustbench_mat.backbones import mlp
from robustbench_mat.data import BenchmarkDataset, EvalGroups, GroupedSplit, SplitArrays
from robustbench_mat.evaluation import regression_metrics
from robustbench_mat.hparams import MAX_SEED, HParam
from robustbench_mat.registry import register_dataset


def true_function(x: torch.Tensor) -> torch.Tensor:
    """f(x) = tanh(x) + 0.5 tanh(-5x): a trend plus a wiggle near 0."""
    return torch.tanh(x) + 0.5 * torch.tanh(-5 * x)


@register_dataset("good-bad-ugly")
class GoodBadUgly(BenchmarkDataset):
    """Figure 3 of the MAT paper: 20 noisy samples of a 1-d function plus per-example features.

    Inputs are [x, e] with e in R^`extra_dims`. The training set holds `n_train` evenly spaced
    points of a sweep of `n_sweep` points over [-1.5, 1.5], with labels f(x) + 0.08 N(0, 1) and
    e = `feature_std` * N(0, I): the example-specific features a network can memorise with
    (good: 1e-4, bad: 1e-3, ugly: 0). Val and test are the other sweep points with e = 0 and
    labels f(x), so their error is the distance to the true function on unseen inputs.

    The training set equals, bit for bit, the authors' `get_data(seed, 'tr', ...)` in
    good_bad_ugly_memorization.py (facebookresearch/Pitfalls-of-Memorization) on the same torch
    version: the training indices are numpy's float64 linspace truncated to integers, the
    features e are drawn before the label noise from a generator that reproduces the stream of
    `torch.manual_seed(seed)` (the global RNG is left untouched), and f is evaluated on the whole
    sweep before the training points are taken from it. Their script has no val or test split: it
    only plots the prediction on the sweep, so both of ours are the sweep points it does not train
    on (the same for every seed). Their labels have a trailing dimension of 1, squeezed here.
    """

    paper = "Bayat, Pezeshki et al. 2024, The Pitfalls of Memorization (arXiv 2412.07684)"
    task = "regression"
    n_classes = 1
    n_attributes = 1
    class_names = ("f",)
    attribute_names = ("all",)
    default_steps = 100_000
    default_eval_every = 1000
    default_criterion = "val_mse"
    evaluate_train = True
    params = {
        "feature_std": HParam(
            1e-4, "std of the example-specific features of training points", ge=0
        ),
        "extra_dims": HParam(30, "number of example-specific feature dimensions", ge=0),
        "n_train": HParam(20, "training points, evenly spaced over the sweep", ge=1),
        "n_sweep": HParam(1000, "points of the sweep over [-1.5, 1.5]", ge=1),
        "label_noise": HParam(0.08, "std of the label noise on training points", ge=0),
        "seed": HParam(123, "seed of the features and label noise", ge=0, le=MAX_SEED),
    }

    def sweep(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The sweep's x values and the indices of the training points in it."""
        c = self.config
        xs = torch.linspace(-1.5, 1.5, c["n_sweep"])
        # numpy's float64 linspace, truncated: the authors' indices, whatever the sizes.
        chosen = np.linspace(0, c["n_sweep"] - 1, c["n_train"]).astype(np.int64)
        return xs, torch.from_numpy(chosen)

    def training_features(self) -> torch.Tensor:
        c = self.config
        generator = torch.Generator().manual_seed(c["seed"])
        features = c["feature_std"] * torch.randn(
            c["n_train"], c["extra_dims"], generator=generator
        )
        noise = c["label_noise"] * torch.randn(c["n_train"], generator=generator)
        return torch.cat([features, noise[:, None]], dim=1)

    def load_split(self, split: str) -> SplitArrays:
        xs, train_idx = self.sweep()
        # f over the whole sweep, then indexed, as the authors do (a vectorised tanh need not
        # give the same last bit on a shorter tensor).
        fs = true_function(xs)
        if split == "train":
            drawn = self.training_features()
            features, noise = drawn[:, :-1], drawn[:, -1]
            x = xs[train_idx]
            return SplitArrays(
                torch.cat([x[:, None], features], 1), fs[train_idx] + noise, torch.zeros(len(x))
            )
        unseen = torch.ones(len(xs), dtype=torch.bool)
        unseen[train_idx] = False
        x = xs[unseen]
        inputs = torch.cat([x[:, None], torch.zeros(len(x), self.config["extra_dims"])], 1)
        return SplitArrays(inputs, fs[unseen], torch.zeros(len(x)))

    def build_model(self) -> nn.Module:
        return mlp(1 + self.config["extra_dims"], 1, hidden=(300, 300), activation=nn.Tanh)

    def loss(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(outputs.squeeze(1), y)

    def metrics(
        self, split: GroupedSplit, outputs: torch.Tensor, train_weights: torch.Tensor | None
    ) -> dict[str, float]:
        return regression_metrics(split, outputs)

    def eval_groups(self, split: str, y: torch.Tensor, a: torch.Tensor) -> EvalGroups:
        return EvalGroups.from_ids(torch.zeros(len(y), dtype=torch.long), ("all",))

    def default_hparams(self) -> dict[str, Any]:
        return {"optimizer": "adam", "lr": 1e-3, "batch_size": 0, "weight_decay": 0.0}
