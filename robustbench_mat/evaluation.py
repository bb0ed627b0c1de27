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
from collections.abc import Callable, Sequence
from typing import Any

import torch

from robustbench_mat.data import EvalGroups, GroupedSplit
from robustbench_mat.errors import UserError


def metric_key(name: str) -> str:
    """A group or class name as it appears in a metric key (MLflow-safe characters only)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")


@torch.inference_mode()
def predict(
    predict_fn: Callable[[torch.Tensor], torch.Tensor],
    split: GroupedSplit,
    device: torch.device,
    batch_size: int = 4096,
    num_workers: int = 0,
) -> torch.Tensor:
    """Logits for every example of `split`, in dataset order, on the CPU."""
    outputs = []
    if split.in_memory:
        for start in range(0, len(split), batch_size):
            x = split.inputs[start : start + batch_size].to(device, non_blocking=True)
            outputs.append(predict_fn(x).float().cpu())
    else:
        loader = torch.utils.data.DataLoader(
            split.inputs, batch_size=batch_size, shuffle=False, num_workers=num_workers
        )
        for x in loader:
            outputs.append(predict_fn(x.to(device, non_blocking=True)).float().cpu())
    return torch.cat(outputs)


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
    """Accuracy metrics of one split from its logits (see the module docstring for the keys)."""
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
    """Worst-group and per-group accuracy on inferred groups (`<split>_inferred_*`)."""
    correct = (logits.argmax(1) == y).double()
    group_acc, present = _group_accuracy(correct, groups.membership)
    metrics = {f"{split_name}_inferred_wga": group_acc[present].min().item()}
    for k, name in enumerate(groups.names):
        if present[k]:
            metrics[f"{split_name}_inferred_group_acc.{metric_key(name)}"] = group_acc[k].item()
    return metrics


def _group_accuracy(
    correct: torch.Tensor, membership: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    counts = membership.sum(0)
    group_acc = (membership.double() * correct[:, None]).sum(0) / counts.clamp(min=1)
    return group_acc, counts > 0


VALIDATION_CRITERIA = (
    "val_wga",
    "val_worst_class",
    "val_avg",
    "val_avg_train_weighted",
    "val_inferred_wga",
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
