"""Accuracy metrics per split and group, and model selection by a named criterion.

Metric keys of one evaluation are flat, `<split>_<metric>`:

- `avg`: plain accuracy (the XRM and MAT papers' "average accuracy");
- `avg_train_weighted`: group accuracies weighted by the training group proportions (the DFR
  and AFR papers' "mean accuracy" on Waterbirds);
- `wga`: worst-group accuracy over the evaluation groups present in the split;
- `worst_class`: worst per-class accuracy (needs no group labels);
- `group_acc.<group>` and `class_acc.<class>`;
- `inferred_wga` and `inferred_group_acc.<group>`: the same on groups inferred without group
  labels (e.g. by XRM), which model selection may use where true groups are withheld.
"""

from __future__ import annotations

import difflib
import math
import re
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

from robustbench_mat.data import EvalGroups, GroupedSplit
from robustbench_mat.errors import UserError
from robustbench_mat.loading import finish_batch


def metric_key(name: str) -> str:
    """A group or class name as it appears in a metric key (MLflow-safe characters only)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")


@torch.inference_mode()
def predict(
    predict_fn: Callable[[torch.Tensor], torch.Tensor],
    split: GroupedSplit,
    device: torch.device,
    batch_size: int = 4096,
    stacked: bool = False,
) -> torch.Tensor:
    """Logits for every example of `split`, in dataset order, on the CPU; on-disk inputs are
    read as the split's `loading` says (the run's loader workers). With `stacked`, `predict_fn`
    gives several models' logits at once (shape (M, n, ...)), and so does this."""
    outputs = []
    if split.in_memory and 0 < len(split) == len(split.inputs) <= batch_size:
        # One batch (full-batch evaluation of a small split): no slicing, no concatenation.
        return predict_fn(split.inputs.to(device, non_blocking=True)).float().cpu()
    if split.in_memory:
        for start in range(0, len(split), batch_size):
            x = split.inputs[start : start + batch_size].to(device, non_blocking=True)
            outputs.append(predict_fn(x).float().cpu())
    else:
        for x in split.eval_loader(batch_size):
            x = finish_batch(split.inputs, x.to(device, non_blocking=True))
            outputs.append(predict_fn(x).float().cpu())
    return torch.cat(outputs, dim=1 if stacked else 0)


def train_group_weights(train: GroupedSplit) -> torch.Tensor:
    """Proportion of the training split in each evaluation group."""
    counts = train.eval_groups.counts().double()
    return counts / counts.sum()


def split_metrics(
    split: GroupedSplit,
    logits: torch.Tensor,
    class_names: Sequence[str],
    group_weights: torch.Tensor | None = None,
) -> dict[str, float]:
    """Accuracy metrics of one split from its logits (see the module docstring for the keys).

    The split's fixed structure (group ids, sizes, keys) is worked out once (`_layout`), so
    that one evaluation is a handful of tensor operations and a single conversion to Python
    floats; the numbers are those of `_reference_split_metrics`, bit for bit."""
    layout = _layout(split, class_names)
    if layout is None:
        return _reference_split_metrics(split, logits, class_names, group_weights)
    hits = (logits.argmax(1) == split.y).double()
    accuracy = layout.accuracy(hits)  # the groups', then the classes'
    parts = [accuracy, hits.mean().reshape(1)]
    if group_weights is not None:
        weights, total = layout.masked_weights(group_weights)
        parts.append(((weights * accuracy[: layout.n_groups]).sum() / total).reshape(1))
    return layout.metrics(torch.cat(parts).tolist(), group_weights is not None)


def split_metrics_many(
    split: GroupedSplit,
    logits: torch.Tensor,
    class_names: Sequence[str],
    group_weights: torch.Tensor | None = None,
) -> list[dict[str, float]]:
    """`split_metrics` of several models' logits on one split (shape (M, N, C)), the same
    numbers bit for bit, in a few tensor operations for all of them: the models of a stack,
    or one model's states at the steps of an evaluation block."""
    layout = _layout(split, class_names)
    if layout is None or len(logits) == 0:
        return [split_metrics(split, one, class_names, group_weights) for one in logits]
    hits = (logits.argmax(2) == split.y).double()
    accuracy = layout.accuracy_many(hits)
    parts = [accuracy, hits.mean(1, keepdim=True)]
    if group_weights is not None:
        weights, total = layout.masked_weights(group_weights)
        weighted = (weights * accuracy[:, : layout.n_groups]).sum(1, keepdim=True)
        parts.append(weighted / total)
    rows = torch.cat(parts, 1).tolist()
    return [layout.metrics(values, group_weights is not None) for values in rows]


def _reference_split_metrics(
    split: GroupedSplit,
    logits: torch.Tensor,
    class_names: Sequence[str],
    group_weights: torch.Tensor | None = None,
) -> dict[str, float]:
    """`split_metrics` computed directly: for the cases `_layout` leaves out (a split without
    examples, labels outside the classes), and as the definition the fast path must match."""
    correct = (logits.argmax(1) == split.y).double()
    prefix = split.name
    group_acc, group_present = _group_accuracy(correct, split.eval_groups.membership)
    class_count = torch.bincount(split.y, minlength=len(class_names))
    class_acc = torch.bincount(split.y, weights=correct, minlength=len(class_names))
    class_acc = class_acc / class_count.clamp(min=1)
    class_present = class_count > 0
    headline = [
        correct.mean(),
        group_acc[group_present].min(),
        class_acc[class_present].min(),
    ]
    if group_weights is not None:
        weights = group_weights * group_present
        headline.append((weights * group_acc).sum() / weights.sum())
    values = torch.stack(headline).tolist()  # one conversion instead of one per metric
    metrics = {
        f"{prefix}_avg": values[0],
        f"{prefix}_wga": values[1],
        f"{prefix}_worst_class": values[2],
    }
    if group_weights is not None:
        metrics[f"{prefix}_avg_train_weighted"] = values[3]
    for names, accuracy, present, kind in (
        (split.eval_groups.names, group_acc, group_present, "group_acc"),
        (class_names, class_acc, class_present, "class_acc"),
    ):
        for name, value, keep in zip(names, accuracy.tolist(), present.tolist(), strict=True):
            if keep:
                metrics[f"{prefix}_{kind}.{metric_key(name)}"] = value
    return metrics


def regression_metrics(split: GroupedSplit, outputs: torch.Tensor) -> dict[str, float]:
    """Mean squared error of one split (`<split>_mse`)."""
    error = outputs.reshape(split.y.shape).double() - split.y.double()
    return {f"{split.name}_mse": error.pow(2).mean().item()}


def inferred_group_metrics(
    split_name: str, logits: torch.Tensor, y: torch.Tensor, groups: EvalGroups
) -> dict[str, float]:
    """Worst-group, mean-over-groups (balanced) and per-group accuracy on inferred groups
    (`<split>_inferred_*`)."""
    correct = (logits.argmax(1) == y).double()
    layout = _group_layout(groups.membership)
    if not layout.present:  # nothing to take the worst of: the direct computation raises
        group_acc, present = _group_accuracy(correct, groups.membership)
        group_acc[present].min()
    values = layout.accuracy(correct).tolist()
    metrics = {
        f"{split_name}_inferred_wga": min(values[k] for k in layout.present),
        f"{split_name}_inferred_balanced": sum(values[k] for k in layout.present)
        / len(layout.present),
    }
    for k in layout.present:
        metrics[f"{split_name}_inferred_group_acc.{metric_key(groups.names[k])}"] = values[k]
    return metrics


def _group_accuracy(
    correct: torch.Tensor, membership: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    counts = membership.sum(0)
    group_acc = (membership.double() * correct[:, None]).sum(0) / counts.clamp(min=1)
    return group_acc, counts > 0


def _exclusive_ids(membership: torch.Tensor, none: int) -> torch.Tensor | None:
    """Each example's group when no example is in two groups (`none` for one in no group),
    else None."""
    if membership.dtype != torch.bool or membership.ndim != 2:
        return None
    in_groups = membership.sum(1)
    if not bool((in_groups <= 1).all()):
        return None
    if membership.shape[1] == 0:
        return torch.full_like(in_groups, none)
    return torch.where(in_groups == 1, membership.to(torch.uint8).argmax(1), none)


class _GroupLayout:
    """What one membership matrix fixes for every evaluation: each group's size, the groups
    present and, when no example is in two groups, each example's group id (then the correct
    predictions per group are one `bincount`, exact: sums of 0s and 1s)."""

    def __init__(self, membership: torch.Tensor) -> None:
        self.membership, self.version = membership, membership._version
        self.n_groups = membership.shape[1]
        self.counts = membership.sum(0)
        self.present = (self.counts > 0).nonzero().flatten().tolist()
        self.ids = _exclusive_ids(membership, self.n_groups)

    def accuracy(self, hits: torch.Tensor) -> torch.Tensor:
        """Accuracy per group (0 for an empty group) from 1.0/0.0 per example."""
        if self.ids is not None:
            correct = torch.bincount(self.ids, weights=hits, minlength=self.n_groups + 1)
            correct = correct[: self.n_groups]
        else:
            correct = (self.membership.double() * hits[:, None]).sum(0)
        return correct / self.counts.clamp(min=1)


class _SplitLayout:
    """A split's fixed evaluation structure: groups and classes, their sizes, the metric keys
    in their order, and the masked training weights last used with it."""

    def __init__(self, split: GroupedSplit, class_names: tuple[str, ...]) -> None:
        self.y, self.y_version = split.y, split.y._version
        self.class_names, self.name = class_names, split.name
        self.group_names = tuple(split.eval_groups.names)
        membership = split.eval_groups.membership
        self.membership, self.version = membership, membership._version
        self.n_groups, self.n_classes = membership.shape[1], len(class_names)
        group_counts = membership.sum(0)
        class_counts = torch.bincount(split.y, minlength=self.n_classes)
        self.group_present = group_counts > 0
        self.present_groups = self.group_present.nonzero().flatten().tolist()
        self.present_classes = [
            self.n_groups + c for c in (class_counts > 0).nonzero().flatten().tolist()
        ]
        self.denominators = torch.cat([group_counts.clamp(min=1), class_counts.clamp(min=1)])
        # Groups in bins [0, K), classes in [K, K + C), an example in no group in bin K + C.
        ids = _exclusive_ids(membership, self.n_groups + self.n_classes)
        self.codes = None if ids is None else torch.cat([ids, self.n_groups + split.y])
        prefix = split.name
        self.avg_key, self.wga_key = f"{prefix}_avg", f"{prefix}_wga"
        self.worst_class_key = f"{prefix}_worst_class"
        self.weighted_key = f"{prefix}_avg_train_weighted"
        self.per_group_keys = [
            (f"{prefix}_group_acc.{metric_key(self.group_names[k])}", k)
            for k in self.present_groups
        ] + [
            (f"{prefix}_class_acc.{metric_key(class_names[k - self.n_groups])}", k)
            for k in self.present_classes
        ]
        self._weights: tuple[Any, ...] = (None, -1, None, None)

    def matches(self, split: GroupedSplit, class_names: tuple[str, ...]) -> bool:
        return (
            self.y is split.y
            and self.y_version == split.y._version
            and self.membership is split.eval_groups.membership
            and self.version == self.membership._version
            and self.class_names == class_names
            and self.name == split.name
            and self.group_names == tuple(split.eval_groups.names)
        )

    def accuracy(self, hits: torch.Tensor) -> torch.Tensor:
        """Accuracy per group, then per class (0 where empty), from 1.0/0.0 per example."""
        bins = self.n_groups + self.n_classes
        if self.codes is not None:
            correct = torch.bincount(self.codes, weights=hits.repeat(2), minlength=bins + 1)
            correct = correct[:bins]
        else:
            correct = torch.cat(
                [
                    (self.membership.double() * hits[:, None]).sum(0),
                    torch.bincount(self.y, weights=hits, minlength=self.n_classes),
                ]
            )
        return correct / self.denominators

    def accuracy_many(self, hits: torch.Tensor) -> torch.Tensor:
        """`accuracy` of several models' hits (shape (M, N)): shape (M, groups + classes)."""
        bins = self.n_groups + self.n_classes
        if self.codes is None:
            return torch.stack([self.accuracy(row) for row in hits])
        offsets = torch.arange(len(hits))[:, None] * (bins + 1)
        correct = torch.bincount(
            (self.codes + offsets).flatten(),
            weights=hits.repeat(1, 2).flatten(),
            minlength=len(hits) * (bins + 1),
        )
        return correct.view(len(hits), bins + 1)[:, :bins] / self.denominators

    def metrics(self, values: list[float], weighted: bool) -> dict[str, float]:
        """The metric dict from one model's values: the groups' and classes' accuracies, the
        accuracy, then (`weighted`) the train-weighted accuracy."""
        metrics = {
            self.avg_key: values[self.n_groups + self.n_classes],
            self.wga_key: min(values[k] for k in self.present_groups),
            self.worst_class_key: min(values[k] for k in self.present_classes),
        }
        if weighted:
            metrics[self.weighted_key] = values[-1]
        for key, k in self.per_group_keys:
            metrics[key] = values[k]
        return metrics

    def masked_weights(self, group_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The training weights of the groups present here, and their sum."""
        cached, version, weights, total = self._weights
        if cached is not group_weights or version != group_weights._version:
            weights = group_weights * self.group_present
            total = weights.sum()
            self._weights = (group_weights, group_weights._version, weights, total)
        return weights, total


class _Cache:
    """Layouts by tensor identity (tensors compare elementwise), each entry dropped when its
    tensor is garbage collected."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, Any]] = {}

    def get(self, tensor: torch.Tensor) -> Any:
        entry = self._entries.get(id(tensor))
        return entry[1] if entry is not None and entry[0]() is tensor else None

    def put(self, tensor: torch.Tensor, value: Any) -> None:
        key = id(tensor)

        def drop(ref: weakref.ref, entries: dict = self._entries) -> None:
            if key in entries and entries[key][0] is ref:
                del entries[key]

        self._entries[key] = (weakref.ref(tensor, drop), value)


_LAYOUTS = _Cache()
_GROUP_LAYOUTS = _Cache()


def _group_layout(membership: torch.Tensor) -> _GroupLayout:
    layout = _GROUP_LAYOUTS.get(membership)
    if layout is None or layout.version != membership._version:
        layout = _GroupLayout(membership)
        _GROUP_LAYOUTS.put(membership, layout)
    return layout


def _layout(split: GroupedSplit, class_names: Sequence[str]) -> _SplitLayout | None:
    """The split's layout, made on first use; None where the direct computation must run (no
    example in any group or class, or labels outside the classes)."""
    class_names = tuple(class_names)
    membership = split.eval_groups.membership
    layout = _LAYOUTS.get(membership)
    if isinstance(layout, _SplitLayout) and layout.matches(split, class_names):
        return layout
    y = split.y
    usable = (
        y.ndim == 1
        and len(y) > 0
        and not y.is_floating_point()
        and int(y.min()) >= 0
        and int(y.max()) < len(class_names)
        and membership.ndim == 2
        and membership.shape[0] == len(y)
        and bool(membership.any())
    )
    layout = _SplitLayout(split, class_names) if usable else None
    if layout is not None:
        _LAYOUTS.put(membership, layout)
    return layout


VALIDATION_CRITERIA = (
    "val_wga",
    "val_worst_class",
    "val_avg",
    "val_avg_train_weighted",
    "val_inferred_wga",
    "val_inferred_balanced",
    "val_mse",
)
PER_GROUP_CRITERIA = ("val_group_acc.", "val_class_acc.", "val_inferred_group_acc.")


def check_criterion(criterion: str) -> None:
    """A criterion must be a validation metric the evaluator produces."""
    if not criterion.startswith("val_"):
        raise UserError(
            f"selection criterion {criterion!r} must be a validation metric (val_wga, "
            "val_worst_class, val_avg, ...): selecting on train or test data is not model "
            "selection"
        )
    if criterion not in VALIDATION_CRITERIA and not criterion.startswith(PER_GROUP_CRITERIA):
        close = difflib.get_close_matches(criterion, VALIDATION_CRITERIA, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UserError(
            f"unknown selection criterion {criterion!r}; {hint}known: "
            f"{', '.join(VALIDATION_CRITERIA)}, or {'<group>, '.join(PER_GROUP_CRITERIA)}<group>"
        )


def select(history: Sequence[dict[str, Any]], criterion: str) -> dict[str, Any]:
    """The evaluation record with the best `criterion`; ties go to the later step."""
    best: dict[str, Any] | None = None
    maximize = higher_is_better(criterion)
    for record in history:
        if criterion not in record:
            known = sorted(k for k in record if k.startswith("val_"))
            raise UserError(
                f"selection criterion {criterion!r} was not measured; measured: {', '.join(known)}"
            )
        if is_better(record[criterion], None if best is None else best[criterion], maximize):
            best = record
    if best is None:
        raise ValueError("no evaluation to select from")
    return best


def higher_is_better(criterion: str) -> bool:
    """Accuracies are maximised; errors and losses (`*_mse`, `*_loss`) are minimised."""
    return not criterion.endswith(("_mse", "_loss"))


def is_better(value: float, best: float | None, maximize: bool = True) -> bool:
    """Selection order: the better value wins, a tie prefers the later step, NaN never wins."""
    if math.isnan(value):
        return best is None
    if best is None or math.isnan(best):
        return True
    return value >= best if maximize else value <= best
