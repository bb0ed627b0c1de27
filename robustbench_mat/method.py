"""The method contract: the hooks a method overrides on the shared training loop.

`Method` on its own is ERM. A method plugin subclasses it and overrides only what differs:
`loss` (GroupDRO, MAT), `train_weights` / `train_subset` (the balancing baselines, JTT),
`prepare` (a stage before the main training, e.g. stage 1 of JTT), `after_step` (XRM's label
flips), `predict` (LfF evaluates its debiased model) and `finish` (artifacts written after
training, e.g. XRM's inferred groups). A method that consumes inferred groups names the
group-inference method in `group_inference`; the runner provides its artifact to `prepare`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from optuna.distributions import BaseDistribution, CategoricalDistribution
from torch import nn

from robustbench_mat.backbones import zero_head
from robustbench_mat.data import BenchmarkDataset, GroupedSplit
from robustbench_mat.hparams import HParam

if TYPE_CHECKING:
    from robustbench_mat.runner import RunContext
    from robustbench_mat.training import LoopResult

OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("constant", "linear", "xrm-bert")
# Parameters that AdamW's usual recipe (BERT's) leaves undecayed.
NO_DECAY = ("bias", "LayerNorm.weight")

TRAINING_HPARAMS: dict[str, HParam] = {
    "lr": HParam(1e-3, "learning rate", gt=0),
    "weight_decay": HParam(1e-4, "L2 weight decay (decoupled for adamw)", ge=0),
    "batch_size": HParam(
        64,
        "examples per step; 0 trains on the whole training split at once (full batch)",
        search=CategoricalDistribution([32, 64, 128]),
        ge=0,
    ),
    "optimizer": HParam("sgd", "optimiser", choices=OPTIMIZERS),
    "momentum": HParam(0.9, "SGD momentum", ge=0, lt=1),
    "class_balanced": HParam(
        False,
        "draw minibatches with replacement, every class equally often (the MAT paper's "
        "balanced batches; the default on CivilComments)",
    ),
    "lr_schedule": HParam(
        "constant",
        "learning rate over the main loop: constant; linear (decays to 0 at the last step); "
        "xrm-bert (the XRM/MAT code's BERT schedule: 1 -> 0 over the first third, then 1 -> 1/3)",
        choices=LR_SCHEDULES,
    ),
    "no_decay_groups": HParam(
        False,
        "exempt biases and LayerNorm weights from weight decay (BERT fine-tuning's usual groups)",
    ),
    "zero_init_head": HParam(
        False,
        "start each network's last linear layer at zero (XRM's phase-1 networks, so that the "
        "twins start identical)",
    ),
}


@dataclass
class Batch:
    """One training step's examples. `a` is None when the regime withholds training groups."""

    indices: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    a: torch.Tensor | None
    n_attributes: int

    @property
    def g(self) -> torch.Tensor:
        if self.a is None:
            raise RuntimeError("training group labels are not available in this regime")
        return self.y * self.n_attributes + self.a


class Method(nn.Module):
    """Empirical risk minimisation (ERM): the mean cross-entropy of a single network.

    Base class of every method; subclasses override the hooks that differ from ERM.
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    needs_train_groups: ClassVar[bool] = False
    needs_val_groups: ClassVar[bool] = False
    group_inference: ClassVar[str | None] = None
    infers_groups: ClassVar[bool] = False  # writes an InferredGroups artifact in `finish`
    inferred_groups_variant: ClassVar[str | None] = None  # the method to use without groups
    hparams: ClassVar[dict[str, HParam]] = {}
    # Batched training (`stacking`): whether the hooks can run vectorised over K stacked models,
    # and which of the method's numeric settings may differ between them (the hooks then read
    # them as 0-d tensors; only arithmetic, no `if` on them). Settings not listed are shared.
    stackable: ClassVar[bool] = True
    stack_varying: ClassVar[tuple[str, ...]] = ()
    # Whether the method's own `loss` (and what it calls) computes from tensors only: the
    # network, buffers, settings and batch, with no Python state that changes between steps (a
    # counter, a schedule). A stack then records its step once and replays it (`stacking`).
    # Read from the class that defines `loss`: a subclass that overrides it declares it again.
    pure_loss: ClassVar[bool] = False
    # Defaults of the method's own settings that differ on some datasets, by dataset name
    # (chosen as its paper chooses them; each says why in the method's docstring).
    dataset_defaults: ClassVar[dict[str, dict[str, Any]]] = {}
    # The selection criterion per regime where the method's paper selects otherwise than the
    # regime's default (e.g. uLA: balanced accuracy on its proxy's pseudo-groups in `none`).
    default_criteria: ClassVar[dict[str, str]] = {}

    def __init__(self, dataset: BenchmarkDataset, hparams: dict[str, Any]) -> None:
        super().__init__()
        self.dataset = dataset
        self.hp = hparams
        self.model = self.build_model()
        if hparams.get("zero_init_head"):
            networks = self.model if isinstance(self.model, nn.ModuleList) else [self.model]
            for network in networks:
                zero_head(network)

    # --- declarations ------------------------------------------------------------------------
    @classmethod
    def hparam_specs(cls, dataset: BenchmarkDataset) -> dict[str, HParam]:
        """Every setting of this method on `dataset`: the loop's, with the dataset's defaults and
        search space, then the method's own."""
        specs = dict(TRAINING_HPARAMS)
        for name, default in dataset.default_hparams().items():
            specs[name] = specs[name].with_default(default)
        for name, distribution in dataset.search_space().items():
            specs[name] = replace(specs[name], search=distribution)
        specs.update(cls.hparams)
        for name, default in cls.dataset_defaults.get(dataset.name, {}).items():
            specs[name] = specs[name].with_default(default)
        return specs

    @classmethod
    def main_steps(cls, hparams: dict[str, Any], run_steps: int) -> int:
        """How many steps the shared loop trains this method, given the run's `--steps` (which
        first stages may also use, see `RunContext.train_stage`): all of them for ERM; a
        second stage of fixed length (AFR), or 0 when `prepare` fits the model (DFR)."""
        return run_steps

    @classmethod
    def search_space(cls, dataset: BenchmarkDataset) -> dict[str, BaseDistribution]:
        """The Optuna distributions this method is tuned over on `dataset`."""
        return {
            name: spec.search
            for name, spec in cls.hparam_specs(dataset).items()
            if spec.search is not None
        }

    # --- hooks -------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        """The trained network(s); `predict` and `loss` use them."""
        return self.dataset.build_model()

    def prepare(self, context: RunContext) -> None:
        """Work before the main training (e.g. a first model). Runs again on resume.

        `context.inferred` holds the inferred groups when `group_inference` is set."""

    def finish(self, context: RunContext, outcome: LoopResult) -> None:
        """Called once after training, with the model in its final state."""

    def train_split(self) -> GroupedSplit:
        """The examples the main loop trains on (DFR trains on validation data)."""
        return self.dataset.split("train")

    def eval_split(self, split: GroupedSplit) -> GroupedSplit:
        """The examples of `split` that the loop evaluates and selects on; all of them by default
        (DFR keeps only the half of the validation split it did not fit on)."""
        return split

    def train_weights(self, train: GroupedSplit) -> torch.Tensor | None:
        """Per-example sampling weights (drawn with replacement), or None for uniform."""
        return None

    def train_subset(self, train: GroupedSplit) -> torch.Tensor | None:
        """Indices of the training examples to train on, or None for all of them."""
        return None

    def loss(self, batch: Batch) -> torch.Tensor:
        return self.dataset.loss(self.model(batch.x), batch.y)

    def after_step(self, batch: Batch, step: int) -> None:
        """Called after each optimiser step."""

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits used for evaluation."""
        return self.model(x)

    def logged_state(self) -> dict[str, float]:
        """Scalars logged at each evaluation (e.g. GroupDRO's group weights)."""
        return {}

    def configure_optimizer(self) -> torch.optim.Optimizer:
        hp = self.hp
        params = self._parameter_groups()
        if hp["optimizer"] == "sgd":
            return torch.optim.SGD(
                params, lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"]
            )
        optimizer = torch.optim.Adam if hp["optimizer"] == "adam" else torch.optim.AdamW
        return optimizer(params, lr=hp["lr"], weight_decay=hp["weight_decay"])

    def configure_scheduler(
        self, optimizer: torch.optim.Optimizer, steps: int
    ) -> torch.optim.lr_scheduler.LRScheduler | None:
        """The learning-rate schedule over the main loop's `steps` (`lr_schedule`), stepped
        after every optimiser step; None keeps the rate constant."""
        return learning_rate_schedule(self.hp.get("lr_schedule", "constant"), optimizer, steps)

    def _parameter_groups(self) -> list[torch.nn.Parameter] | list[dict[str, Any]]:
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        if not self.hp.get("no_decay_groups"):
            return [p for _, p in named]
        exempt = [p for n, p in named if any(part in n for part in NO_DECAY)]
        decayed = [p for n, p in named if not any(part in n for part in NO_DECAY)]
        return [{"params": decayed}, {"params": exempt, "weight_decay": 0.0}]


def learning_rate_schedule(
    name: str, optimizer: torch.optim.Optimizer, steps: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """`constant` (None), `linear` (1 at the first step to 0 after the last: transformers'
    linear schedule without warm-up), or `xrm-bert`, the multiplier of the XRM and MAT code's
    BERT optimiser: with w = steps // 3 + 1, 1 - t / w for t < w, then 1 - (t - w) / steps (it
    falls to ~0 at a third of the run, jumps back to 1 and ends near 1/3)."""
    if name == "constant":
        return None
    if name == "linear":
        from transformers import get_linear_schedule_with_warmup

        return get_linear_schedule_with_warmup(optimizer, 0, max(steps, 1))
    if name == "xrm-bert":
        warmup = steps // 3 + 1
        return torch.optim.lr_scheduler.LambdaLR(optimizer, _XRMBertMultiplier(warmup, steps))
    raise ValueError(f"unknown lr_schedule {name!r}; known: {', '.join(LR_SCHEDULES)}")


@dataclass(frozen=True)
class _XRMBertMultiplier:
    warmup: int
    steps: int

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return 1.0 - step / self.warmup
        return 1.0 - (step - self.warmup) / self.steps
