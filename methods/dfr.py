"""DFR: Deep Feature Reweighting."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from optuna.distributions import FloatDistribution
from torch import nn

from robustbench_mat.backbones import check_head_split, split_head
from robustbench_mat.data import BenchmarkDataset, GroupedSplit
from robustbench_mat.errors import UserError
from robustbench_mat.evaluation import predict
from robustbench_mat.hparams import HParam
from robustbench_mat.method import Batch, Method
from robustbench_mat.methods.afr import subset_split
from robustbench_mat.methods.balancing import balanced_subset
from robustbench_mat.methods.jtt import ERMStage, stage_steps
from robustbench_mat.registry import register_method

if TYPE_CHECKING:
    from robustbench_mat.runner import RunContext


@register_method("dfr")
class DFR(Method):
    """DFR (Kirichenko et al. 2023): ℓ1 logistic regression of the last layer on balanced val.

    Stage 1 trains ERM on the whole training split for `first_stage_frac` x (the run's steps)
    steps. The validation split is cut at random in two halves: the fitting half, subsampled so
    that every group has as many examples as the smallest one, and the selection half. Stage 2,
    the run's main loop, freezes the stage-1 features (the model up to its last nn.Linear,
    `split_head`) and fits a fresh last layer (with bias, started at zero) on the balanced
    fitting half by full-batch gradient descent on mean CE + `l1` |W|_1, on features
    standardised with the fitting set's mean and standard deviation (`standardize`, as the
    paper's code). All val_* metrics, hence the selected step and any tuning of `l1`, are
    measured on the selection half only. Needs validation group labels (DFR^Tr_Val); training
    group labels are not used. The paper's averaging of the weights over several balanced
    subsets is not implemented.
    """

    paper = (
        "Kirichenko et al. 2023, Last Layer Re-Training is Sufficient for Robustness to "
        "Spurious Correlations (ICLR)"
    )
    needs_val_groups = True
    hparams = {
        "l1": HParam(
            0.1,
            "strength of the ℓ1 penalty on the last layer's weights",
            search=FloatDistribution(1e-3, 3.0, log=True),
            ge=0,
        ),
        "first_stage_frac": HParam(
            1.0,
            "stage-1 ERM length as a fraction of the run's steps (stage 2 runs them all)",
            gt=0,
        ),
        "standardize": HParam(True, "standardise the features with the fitting set's statistics"),
    }

    def __init__(self, dataset: BenchmarkDataset, hparams: dict[str, Any]) -> None:
        super().__init__(dataset, hparams)
        self.stage1_hp = hparams
        # The last layer is fitted full batch, on a fitting set already balanced by group.
        self.hp = {**hparams, "batch_size": 0, "class_balanced": False}
        val = self.dataset.split("val")
        if len(val) < 2:
            raise UserError("dfr needs at least two validation examples (fit and select halves)")
        # Drawn with the global RNG, which the runner seeds: the same halves on resume.
        order = torch.randperm(len(val))
        fit_half = order[: len(val) // 2]
        balanced = fit_half[balanced_subset(val.g[fit_half], self.dataset.n_groups)]
        self.register_buffer("fit_indices", torch.sort(balanced).values)
        self.register_buffer("select_indices", torch.sort(order[len(val) // 2 :]).values)
        self.features, stage1_head = split_head(self.model)
        check_head_split(self.model, self.features, stage1_head, val.probe_inputs())
        width = stage1_head.in_features
        self.dfr_head = nn.Linear(width, self.dataset.n_classes)
        nn.init.zeros_(self.dfr_head.weight)
        nn.init.zeros_(self.dfr_head.bias)
        self.register_buffer("feature_mean", torch.zeros(width))
        self.register_buffer("feature_std", torch.ones(width))
        self.fit_split: GroupedSplit | None = None

    def prepare(self, context: RunContext) -> None:
        stage1 = ERMStage(self.dataset, self.stage1_hp, self.model)
        context.train_stage(
            "stage1", stage1, stage_steps(self.hp["first_stage_frac"], context.settings.steps)
        )
        self.model.requires_grad_(False)
        self.eval()
        fit = subset_split(self.dataset.split("val"), self.fit_indices.cpu())
        embeddings = predict(self.features, fit, context.plan.device, self.dataset.eval_batch_size)
        if self.hp["standardize"]:
            self.feature_mean.copy_(embeddings.mean(0))
            self.feature_std.copy_(embeddings.std(0, unbiased=False).clamp(min=1e-6))
        inputs = (embeddings - self.feature_mean.cpu()) / self.feature_std.cpu()
        self.fit_split = dataclasses.replace(fit, name="val-fit", inputs=inputs)

    def train(self, mode: bool = True) -> DFR:
        super().train(mode)
        self.model.eval()  # frozen: batch-norm statistics stay those of stage 1
        self.features.eval()  # its own copies of the modules on the way to the stage-1 head
        return self

    def train_split(self) -> GroupedSplit:
        if self.fit_split is None:
            raise RuntimeError("DFR.prepare must run before training (it embeds the fitting set)")
        return self.fit_split

    def fit_groups(self) -> torch.Tensor:
        """The group of every example of the (balanced) fitting set."""
        return self.dataset.split("val").g[self.fit_indices.cpu()]

    def eval_split(self, split: GroupedSplit) -> GroupedSplit:
        if split.name == "val":
            return subset_split(split, self.select_indices.cpu())
        return split

    def configure_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.dfr_head.parameters(), lr=self.hp["lr"], momentum=0.0)

    def loss(self, batch: Batch) -> torch.Tensor:
        ce = F.cross_entropy(self.dfr_head(batch.x).float(), batch.y)
        return ce + self.hp["l1"] * self.dfr_head.weight.float().abs().sum()

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.dfr_head((self.features(x) - self.feature_mean) / self.feature_std)
