"""JTT: Just Train Twice, and the first-stage ERM that the two-stage methods share."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from optuna.distributions import FloatDistribution, IntDistribution
from torch import nn

from robustbench_mat.data import BenchmarkDataset, GroupedSplit
from robustbench_mat.errors import UserError
from robustbench_mat.evaluation import predict
from robustbench_mat.hparams import HParam
from robustbench_mat.method import Method
from robustbench_mat.registry import register_method

if TYPE_CHECKING:
    from robustbench_mat.runner import RunContext


class ERMStage(Method):
    """ERM on a given network (trained in place), optionally on a subset of the training split:
    the first stage of JTT, AFR and DFR, run with `RunContext.train_stage`."""

    def __init__(
        self,
        dataset: BenchmarkDataset,
        hparams: dict[str, Any],
        network: nn.Module,
        subset: torch.Tensor | None = None,
    ) -> None:
        self._network = [network]  # a list, so that nn.Module does not register it early
        super().__init__(dataset, hparams)
        self.subset = subset

    def build_model(self) -> nn.Module:
        return self._network.pop()

    def train_subset(self, train: GroupedSplit) -> torch.Tensor | None:
        return self.subset


def stage_steps(fraction: float, steps: int, name: str = "first_stage_frac") -> int:
    """The length of a first stage given as a fraction of the run's steps (at least one step)."""
    if fraction <= 0:
        raise UserError(f"{name} must be positive, got {fraction}")
    return max(1, round(fraction * steps))


def upsampled_indices(n_examples: int, error_set: torch.Tensor, upsample: int) -> torch.Tensor:
    """Every training index once, plus each index of the error set `upsample - 1` more times:
    the error set appears exactly `upsample` times."""
    if upsample < 1:
        raise UserError(f"jtt upsample must be at least 1, got {upsample}")
    return torch.cat([torch.arange(n_examples), error_set.repeat(upsample - 1)])


@register_method("jtt")
class JTT(Method):
    """JTT (Liu et al. 2021): retrain from the same init with stage-1 ERM's errors upsampled.

    Stage 1 trains ERM for T = `first_stage_frac` x (the run's steps) steps, from a copy of the
    initial weights, and takes its final model. The error set is the training examples that model
    misclassifies. Stage 2, the run's main loop, trains the network from the same initial
    weights on the training set with every error-set example repeated `upsample` (λ_up) times,
    for the run's steps, with the same optimiser settings (the paper uses them for both stages).
    The stage-1 model and the error set are logged as the artifact `jtt/jtt_stage1.pt`. No
    group label is used for training; T and λ_up are selected on validation worst-group accuracy.
    """

    paper = (
        "Liu et al. 2021, Just Train Twice: Improving Group Robustness without Training Group "
        "Information (ICML)"
    )
    stack_varying = ("first_stage_frac", "upsample")  # read only before the main loop
    hparams = {
        "first_stage_frac": HParam(
            0.1,
            "stage-1 ERM length T as a fraction of the run's steps (stage 2 runs the full steps)",
            search=FloatDistribution(0.02, 0.5, log=True),
            gt=0,
        ),
        "upsample": HParam(
            50,
            "λ_up: how many times each misclassified example appears in stage 2",
            search=IntDistribution(2, 100, log=True),
            ge=1,
        ),
    }

    def __init__(self, dataset: BenchmarkDataset, hparams: dict[str, Any]) -> None:
        super().__init__(dataset, hparams)
        self.error_set: torch.Tensor | None = None

    def prepare(self, context: RunContext) -> None:
        steps = stage_steps(self.hp["first_stage_frac"], context.plan.steps)
        # `prepare` runs before the main loop touches `self.model`, so this copy holds the
        # initial weights that stage 2 starts from as well.
        stage1 = ERMStage(self.dataset, self.hp, copy.deepcopy(self.model))
        context.train_stage("stage1", stage1, steps)
        train = self.train_split()
        stage1.eval()
        logits = predict(stage1.predict, train, context.plan.device, self.dataset.eval_batch_size)
        self.error_set = torch.nonzero(logits.argmax(1) != train.y)[:, 0]

        path = context.run_dir / "jtt_stage1.pt"
        torch.save(
            {
                "error_set": self.error_set,
                "stage1_steps": steps,
                "stage1_model": {k: v.cpu() for k, v in stage1.model.state_dict().items()},
            },
            path,
        )
        context.tracker.log_artifact(context.run_id, path, "jtt")
        context.tracker.log_metrics(
            context.run_id,
            {
                "jtt_error_set_size": len(self.error_set),
                "jtt_error_set_fraction": len(self.error_set) / len(train),
            },
        )

    def train_subset(self, train: GroupedSplit) -> torch.Tensor | None:
        if self.error_set is None:
            raise RuntimeError("JTT.prepare must run before training (it finds the error set)")
        return upsampled_indices(len(train), self.error_set, self.hp["upsample"])
