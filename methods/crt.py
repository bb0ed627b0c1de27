"""CRT: classifier re-training on frozen ERM features, as SubpopBench runs it."""

from __future__ import annotations

import copy
import dataclasses
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from robustbench_mat.backbones import check_head_split, split_head
from robustbench_mat.data import BenchmarkDataset, GroupedSplit, balanced_weights
from robustbench_mat.evaluation import predict
from robustbench_mat.hparams import HParam
from robustbench_mat.method import Batch, Method
from robustbench_mat.methods.jtt import ERMStage, stage_steps
from robustbench_mat.methods.reweighting import inverse_size_weights
from robustbench_mat.registry import register_method

if TYPE_CHECKING:
    from robustbench_mat.runner import RunContext

SUBPOPBENCH = (
    "Yang et al. 2023, Change is Hard: A Closer Look at Subpopulation Shift (ICML); "
    "Kang et al. 2020, Decoupling Representation and Classifier for Long-Tailed Recognition "
    "(ICLR)"
)


@register_method("crt")
class CRT(Method):
    """CRT (Kang et al. 2020, as in SubpopBench): a fresh last layer on frozen ERM features.

    Stage 1 trains ERM on the whole training split for `first_stage_frac` x (the run's steps)
    steps (SubpopBench: a separate ERM run of the full budget, the `model.pkl` of its last
    step). Stage 2, the run's main loop of the run's steps, keeps the feature extractor
    (`split_head`: everything before the last nn.Linear) frozen, starts the last layer afresh
    (SubpopBench drops the classifier's weights from the stage-1 checkpoint) and trains only it,
    with the run's optimiser settings, on group-balanced minibatches: drawn with weights
    1 / (group size) (their `group_balanced`). Needs training group labels.

    Differences from SubpopBench: the frozen features are computed once, in eval mode, and
    stage 2 trains on them (theirs run the frozen featurizer in train mode at every step, so
    batch-norm layers keep normalising by batch statistics and updating their running ones);
    each seed trains its own stage 1 (theirs reuse seed 0's stage-1 model for every seed);
    without training group labels theirs balance the classes, which this harness leaves to
    `rwy` and refuses here.
    """

    paper = SUBPOPBENCH
    needs_train_groups = True
    hparams = {
        "first_stage_frac": HParam(
            1.0, "stage-1 ERM length as a fraction of the run's steps", gt=0
        ),
    }

    def __init__(self, dataset: BenchmarkDataset, hparams: dict[str, Any]) -> None:
        super().__init__(dataset, hparams)
        self.features, self.head = split_head(self.model)
        check_head_split(
            self.model, self.features, self.head, self.dataset.split("train").probe_inputs()
        )
        fresh = copy.deepcopy(self.head)
        fresh.reset_parameters()  # the runner seeds the global RNG: the same head on resume
        self.fresh_head = {name: p.detach().clone() for name, p in fresh.named_parameters()}
        self.embedded: GroupedSplit | None = None

    def prepare(self, context: RunContext) -> None:
        stage1 = ERMStage(self.dataset, self.hp, self.model)
        context.train_stage(
            "stage1", stage1, stage_steps(self.hp["first_stage_frac"], context.plan.steps)
        )
        self.features.requires_grad_(False)
        self.eval()
        with torch.no_grad():
            for name, parameter in self.head.named_parameters():
                parameter.copy_(self.fresh_head[name])
        train = self.dataset.split("train")
        embeddings = predict(
            self.features, train, context.plan.device, self.dataset.eval_batch_size
        ).clone()  # not an inference tensor
        self.embedded = dataclasses.replace(train, name="train-features", inputs=embeddings)

    def train(self, mode: bool = True) -> CRT:
        super().train(mode)
        self.features.eval()  # frozen: batch-norm statistics stay those of stage 1
        return self

    def train_split(self) -> GroupedSplit:
        if self.embedded is None:
            return self.dataset.split("train")  # before `prepare`, which stage 1 trains on
        return self.embedded

    def train_weights(self, train: GroupedSplit) -> torch.Tensor | None:
        return balanced_weights(train.g)

    def loss(self, batch: Batch) -> torch.Tensor:
        return self.dataset.loss(self.head(batch.x), batch.y)


@register_method("reweightcrt")
class ReWeightCRT(CRT):
    """ReWeightCRT (SubpopBench): CRT's fresh last layer with loss weights 1 / (group size).

    The last layer is trained on uniform minibatches with each cross-entropy weighted by its
    group's weight, instead of on group-balanced minibatches.

    The weights are SubpopBench's ReWeight weights (`reweighting.inverse_size_weights`,
    normalised to sum to the number of groups); everything else is `crt`'s, with the same
    differences from SubpopBench.
    """

    def __init__(self, dataset: BenchmarkDataset, hparams: dict[str, Any]) -> None:
        super().__init__(dataset, hparams)
        counts = torch.bincount(dataset.split("train").g, minlength=dataset.n_groups)
        weights = inverse_size_weights(counts, 1.0).float()
        self.register_buffer("group_weights", weights, persistent=False)

    def train_weights(self, train: GroupedSplit) -> torch.Tensor | None:
        return None

    def loss(self, batch: Batch) -> torch.Tensor:
        losses = F.cross_entropy(self.head(batch.x).float(), batch.y, reduction="none")
        return (self.group_weights[batch.g] * losses).mean()
