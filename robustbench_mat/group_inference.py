"""Groups inferred without group labels: the artifact that a group-inference phase writes and
that later methods consume (MAT's held-out logits, XRM's inferred groups for GroupDRO and for
model selection).

A group-inference method (such as `xrm-infer` in `methods/xrm.py`) is an ordinary method whose
`finish` hook saves an `InferredGroups` file, `inferred_groups.pt`, in its run directory. The
runner obtains it by running that method with the consumer's dataset, seed and device: an
identical finished run is reused, so the artifact is cached per (dataset, dataset parameters,
seed, inference settings).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from robustbench_mat.data import EvalGroups
from robustbench_mat.errors import RunFailed, first_line

if TYPE_CHECKING:
    from robustbench_mat.method import Method
    from robustbench_mat.runner import RunContext

ARTIFACT_NAME = "inferred_groups.pt"
FORMAT_VERSION = 1


@dataclass
class InferredGroups:
    """Held-out logits and inferred spurious attributes of one dataset, in dataset order.

    `train_heldout_logits[i]` are the logits, for training example i, of a model that did not
    train on it. `train_attribute` and `val_attribute` are the inferred attributes (for XRM, 1
    where a twin misclassifies the example), so the inferred group is y * n_attributes + a.
    `score` ranks inference runs without group labels (XRM: the final flip rate, 0 for a
    degenerate run); a consumer takes the inference run with the highest.
    """

    inferrer: str
    dataset: str
    data_fingerprint: str
    seed: int
    config: dict[str, Any]
    train_heldout_logits: torch.Tensor
    train_attribute: torch.Tensor
    val_attribute: torch.Tensor
    n_attributes: int = 2
    degenerate: bool = False
    score: float = 0.0
    stats: dict[str, float] = field(default_factory=dict)
    version: int = FORMAT_VERSION

    def save(self, path: Path) -> None:
        torch.save(asdict(self), path)

    @classmethod
    def load(cls, path: Path) -> InferredGroups:
        try:
            # Plain data only: a crafted file in a shared work directory cannot run code here.
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            reason = first_line(error)
            raise RunFailed(
                f"{path} cannot be read as inferred groups ({reason}); delete its run directory "
                "(or run with --restart) to infer the groups again"
            ) from None
        if payload.get("version") != FORMAT_VERSION:
            raise RunFailed(
                f"{path} has inferred-groups format {payload.get('version')}, expected "
                f"{FORMAT_VERSION}; delete it (or run with --restart) to infer the groups again"
            )
        return cls(**payload)

    def attribute(self, split: str) -> torch.Tensor:
        return {"train": self.train_attribute, "val": self.val_attribute}[split]

    def group_ids(self, split: str, y: torch.Tensor) -> torch.Tensor:
        return y.to(self.attribute(split).device) * self.n_attributes + self.attribute(split)

    def eval_groups(self, split: str, y: torch.Tensor, class_names: tuple[str, ...]) -> EvalGroups:
        names = tuple(f"{c}/inferred{a}" for c in class_names for a in range(self.n_attributes))
        return EvalGroups.from_ids(self.group_ids(split, y), names)


def write_inferred_groups(method: Method, context: RunContext, **fields: Any) -> InferredGroups:
    """Save the inferred groups that a group-inference `method` found in its run (`fields`:
    logits, attributes, score, stats...) in the run directory, and log them and their stats to
    the run's MLflow run."""
    artifact = InferredGroups(
        inferrer=method.name,
        dataset=method.dataset.name,
        data_fingerprint=method.dataset.fingerprint(),
        seed=context.plan.spec.seed,
        config=dict(method.hp),
        **fields,
    )
    path = context.run_dir / ARTIFACT_NAME
    artifact.save(path)
    context.tracker.log_artifact(context.run_id, path, "inferred_groups")
    context.tracker.log_metrics(context.run_id, artifact.stats)
    return artifact
