"""The group-annotated dataset contract, and the schedule of training batches.

Every example has an input x, a label y and a spurious attribute a. Its training group is
`g = y * n_attributes + a`. Evaluation groups default to the training groups but a dataset may
declare others, possibly overlapping (an example can belong to several), as a boolean membership
matrix: CivilComments evaluates on 16 overlapping (identity, label) groups.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from optuna.distributions import BaseDistribution, FloatDistribution
from torch import nn

from robustbench_mat.hparams import HParam, resolve
from robustbench_mat.loading import Loading, finish_batch

if TYPE_CHECKING:
    from robustbench_mat.protocols import PaperSetup

SPLITS = ("train", "val", "test")
# Evaluation batches on a GPU are this many times a dataset's `eval_batch_size` (sized for the CPU).
GPU_EVAL_BATCH_SCALE = 4


@dataclass(frozen=True)
class EvalGroups:
    """Named evaluation groups of one split; `membership[i, k]` says example i is in group k."""

    names: tuple[str, ...]
    membership: torch.Tensor

    @classmethod
    def from_ids(cls, ids: torch.Tensor, names: tuple[str, ...]) -> EvalGroups:
        membership = torch.zeros(len(ids), len(names), dtype=torch.bool)
        membership[torch.arange(len(ids)), ids] = True
        return cls(names, membership)

    def counts(self) -> torch.Tensor:
        return self.membership.sum(0)


class SplitArrays(NamedTuple):
    """What a dataset plugin loads for one split: inputs (a tensor or a torch Dataset), y and a."""

    inputs: torch.Tensor | torch.utils.data.Dataset
    y: torch.Tensor
    a: torch.Tensor


@dataclass
class GroupedSplit:
    """One split of a dataset, ready for the loop and the evaluator."""

    name: str
    inputs: torch.Tensor | torch.utils.data.Dataset
    y: torch.Tensor
    a: torch.Tensor
    n_attributes: int
    eval_groups: EvalGroups
    # How on-disk inputs are read (the run's `loading.Loading`); in-memory inputs ignore it.
    loading: Loading = field(default_factory=Loading, compare=False, repr=False)
    _eval_loaders: dict[tuple[int, Loading], Any] = field(
        default_factory=dict, init=False, compare=False, repr=False
    )

    @property
    def g(self) -> torch.Tensor:
        return self.y * self.n_attributes + self.a

    def __len__(self) -> int:
        return len(self.y)

    @property
    def in_memory(self) -> bool:
        return isinstance(self.inputs, torch.Tensor)

    def fetch(self, indices: torch.Tensor) -> torch.Tensor:
        """The inputs of `indices`, stacked into one tensor as the model takes them."""
        if self.in_memory:
            return self.inputs[indices]
        return finish_batch(self.inputs, torch.stack([self.inputs[int(i)] for i in indices]))

    def eval_loader(self, batch_size: int) -> torch.utils.data.DataLoader:
        """The on-disk inputs in order, `batch_size` at a time. The loader is kept, so that its
        worker processes serve every evaluation of the split instead of starting anew."""
        key = (batch_size, self.loading)
        if key not in self._eval_loaders:
            self._eval_loaders.clear()  # settings changed: the old workers go
            self._eval_loaders[key] = self.loading.loader(
                self.inputs, batch_size=batch_size, shuffle=False, persistent_workers=True
            )
        return self._eval_loaders[key]

    def release_loaders(self) -> None:
        """Drop the kept evaluation loaders; their worker processes exit."""
        self._eval_loaders.clear()

    def probe_inputs(self, n: int = 8) -> torch.Tensor:
        """The inputs of the first `n` examples: a small batch for checking a model's shape."""
        return self.fetch(torch.arange(min(n, len(self))))


class BenchmarkDataset:
    """Base class of a dataset plugin: a classification task with train/val/test splits and a
    spurious attribute per example.

    A plugin sets the class attributes below, implements `load_split` and `build_model`, and may
    override the training defaults (`default_hparams`, `default_steps`, `search_space`) and the
    evaluation groups (`eval_groups`).
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    n_classes: ClassVar[int]
    n_attributes: ClassVar[int]
    class_names: ClassVar[tuple[str, ...]]
    attribute_names: ClassVar[tuple[str, ...]]
    params: ClassVar[dict[str, HParam]] = {}
    default_steps: ClassVar[int] = 1000
    default_eval_every: ClassVar[int] = 100
    default_checkpoint_every: ClassVar[int | None] = None
    eval_batch_size: ClassVar[int] = 4096  # examples per forward pass when evaluating
    default_criterion: ClassVar[str | None] = None
    task: ClassVar[str] = "classification"
    hparam_family: ClassVar[str] = "mlp"  # image | text | mlp: ranges of the paper's grid
    paper_setup: ClassVar[PaperSetup | None] = None  # what `--protocol paper` applies
    evaluate_train: ClassVar[bool] = False

    def __init__(self, data_dir: str | Path | None = None, **params: Any) -> None:
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.config = resolve(self.params, params, f"dataset {self.name!r}")
        self.check_config()
        self._splits: dict[str, GroupedSplit] = {}
        # Where inputs derived from the data (cached backbone features) are computed, and how
        # on-disk inputs are read: the run's, once a run places this dataset (`place`); None
        # picks CUDA when present.
        self.device: torch.device | None = None
        self._loading = Loading()

    # --- what a plugin implements -------------------------------------------------------------
    def check_config(self) -> None:
        """Raise `UserError` for parameter values that cannot work (called on construction)."""

    def load_split(self, split: str) -> SplitArrays:
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        """A freshly initialised network mapping a batch of inputs to `n_classes` logits."""
        raise NotImplementedError

    def default_hparams(self) -> dict[str, Any]:
        """Overrides of the loop's defaults (`robustbench_mat.method.TRAINING_HPARAMS`)."""
        return {}

    def model_rng_state(self) -> torch.Tensor | None:
        """A global torch RNG state that a run sets after seeding, so that its networks are
        built (and it draws its randomness) as a published script does; None, the default,
        keeps the run seed's state."""
        return None

    def search_space(self) -> dict[str, BaseDistribution]:
        """Search distributions of the loop's settings (lr, weight decay, batch size)."""
        return {
            "lr": FloatDistribution(1e-5, 1e-2, log=True),
            "weight_decay": FloatDistribution(1e-6, 1e-3, log=True),
        }

    def loss(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training loss of ERM and of the methods built on it."""
        return F.cross_entropy(outputs, y)

    def metrics(
        self, split: GroupedSplit, outputs: torch.Tensor, train_weights: torch.Tensor | None
    ) -> dict[str, float]:
        """Evaluation metrics of one split (see `robustbench_mat.evaluation`)."""
        from robustbench_mat.evaluation import split_metrics

        return split_metrics(split, outputs, self.class_names, train_weights)

    def metrics_many(
        self, split: GroupedSplit, outputs: torch.Tensor, train_weights: torch.Tensor | None
    ) -> list[dict[str, float]]:
        """`metrics` of several models' outputs on one split (shape (M, N, ...)): a stack's
        models, or one model's states in an evaluation block. The built-in metrics take them
        all at once; a dataset with its own `metrics` is asked once per model."""
        if type(self).metrics is not BenchmarkDataset.metrics:
            return [self.metrics(split, one, train_weights) for one in outputs]
        from robustbench_mat.evaluation import split_metrics_many

        return split_metrics_many(split, outputs, self.class_names, train_weights)

    def eval_groups(self, split: str, y: torch.Tensor, a: torch.Tensor) -> EvalGroups:
        return EvalGroups.from_ids(y * self.n_attributes + a, tuple(self.group_names()))

    # --- where a run reads it -----------------------------------------------------------------
    @property
    def loading(self) -> Loading:
        """How every split's on-disk inputs are read (DataLoader workers, pinned memory)."""
        return self._loading

    def place(self, device: torch.device, loading: Loading) -> None:
        """Read and derive this dataset's inputs for a run on `device`: cached features are
        extracted there, every split is read with `loading`, and evaluation batches are
        `GPU_EVAL_BATCH_SCALE` times larger on a GPU, whose memory fits them."""
        self.device = device
        self._loading = loading
        for split in self._splits.values():
            split.loading = loading
        scale = GPU_EVAL_BATCH_SCALE if device.type == "cuda" else 1
        self.eval_batch_size = type(self).eval_batch_size * scale

    def release_loaders(self) -> None:
        """End the worker processes that the splits' evaluation loaders keep (a run's end)."""
        for split in self._splits.values():
            split.release_loaders()

    # --- derived ----------------------------------------------------------------------------
    @property
    def n_groups(self) -> int:
        return self.n_classes * self.n_attributes

    def group_name(self, group: int) -> str:
        y, a = divmod(int(group), self.n_attributes)
        return f"{self.class_names[y]}/{self.attribute_names[a]}"

    def group_names(self) -> list[str]:
        return [self.group_name(g) for g in range(self.n_groups)]

    def split(self, name: str) -> GroupedSplit:
        """The split `name` (train, val or test), loaded once."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        if name not in self._splits:
            inputs, y, a = self.load_split(name)
            y = y.long() if self.task == "classification" else y.float()
            a = a.long()
            self._splits[name] = GroupedSplit(
                name, inputs, y, a, self.n_attributes, self.eval_groups(name, y, a), self.loading
            )
        return self._splits[name]

    def fingerprint(self) -> str:
        """A short hash of the dataset and its parameters, for caches keyed by the data."""
        return stable_hash({"dataset": self.name, **self.config})


def stable_hash(payload: Mapping[str, Any], length: int = 12) -> str:
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def balanced_weights(labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example sampling weights under which every label value present has the same total:
    1/count(label) by default, else `weights` rescaled, their proportions kept within each
    value."""
    base = torch.ones(len(labels), dtype=torch.float64) if weights is None else weights.double()
    mass = torch.zeros(int(labels.max()) + 1, dtype=torch.float64).index_add_(0, labels, base)
    return base / mass[labels]


class BatchSchedule:
    """Which training examples each step sees, as a pure function of (seed, step).

    Uniform schedules shuffle once per epoch and draw fixed-size batches without replacement;
    weighted schedules draw with replacement. `class_labels` (the labels of all examples) makes
    the draws class-balanced: with replacement, every class equally often, the weights (if any)
    kept within each class. Because nothing depends on the past, a resumed run sees exactly the
    batches an uninterrupted one would have seen.
    """

    _WEIGHTED_CHUNK = 64

    def __init__(
        self,
        n_examples: int,
        batch_size: int,
        seed: int,
        subset: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
    ) -> None:
        self.pool = subset if subset is not None else torch.arange(n_examples)
        self.batch_size = batch_size if 0 < batch_size < len(self.pool) else len(self.pool)
        self.seed = seed
        self.weights = None if weights is None else weights[self.pool].double()
        if class_labels is not None:
            self.weights = balanced_weights(class_labels[self.pool], self.weights)
        self.full_batch = self.weights is None and self.batch_size == len(self.pool)
        self.batches_per_epoch = len(self.pool) // self.batch_size
        self._cache_key: int | None = None
        self._cache: torch.Tensor | None = None

    def _generator(self, index: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + index)

    def indices(self, step: int) -> torch.Tensor:
        """Indices (into the split) of the batch of `step` (0-based)."""
        if self.full_batch:
            return self.pool
        if self.weights is not None:
            chunk, offset = divmod(step, self._WEIGHTED_CHUNK)
            if self._cache_key != chunk:
                draws = self._WEIGHTED_CHUNK * self.batch_size
                self._cache = torch.multinomial(
                    self.weights, draws, replacement=True, generator=self._generator(chunk)
                )
                self._cache_key = chunk
            positions = self._cache[offset * self.batch_size : (offset + 1) * self.batch_size]
        else:
            epoch, offset = divmod(step, self.batches_per_epoch)
            if self._cache_key != epoch:
                self._cache = torch.randperm(len(self.pool), generator=self._generator(epoch))
                self._cache_key = epoch
            positions = self._cache[offset * self.batch_size : (offset + 1) * self.batch_size]
        return self.pool[positions]
