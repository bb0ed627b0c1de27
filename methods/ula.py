"""uLA: unsupervised logit adjustment by a pretrained bias proxy."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from optuna.distributions import CategoricalDistribution, FloatDistribution

from robustbench_mat.backbones import check_head_split, split_head
from robustbench_mat.data import BenchmarkDataset
from robustbench_mat.errors import RunFailed
from robustbench_mat.evaluation import predict
from robustbench_mat.group_inference import write_inferred_groups
from robustbench_mat.hparams import HParam
from robustbench_mat.method import Batch, Method
from robustbench_mat.registry import register_method

if TYPE_CHECKING:
    from robustbench_mat.runner import LoopResult, RunContext

PAPER = (
    "Tsirigotis et al. 2023, Group Robust Classification Without Any Group Information (NeurIPS)"
)


@register_method("ula-proxy")
class ULAProxy(Method):
    """uLA's bias proxy (Tsirigotis et al. 2023): a linear probe on frozen pretrained features.

    The dataset's network keeps the weights it starts with (a pretrained backbone where the
    dataset has one: ImageNet ResNet-50, BERT, or its cached features) frozen, and only its
    last linear layer (`split_head`) trains, with ERM, for `budget_frac` x the run's steps: the
    authors stop the proxy early on purpose (`gen0_max_steps`), so that it learns the easy,
    spurious rule. `finish` writes its logits on every training example and its predicted class
    on training and validation examples as inferred groups: the pseudo-attribute of an example is
    the class the proxy predicts, and its pseudo-group is (y, prediction), uLA's groups for
    bias-unsupervised validation.

    Differences from the authors' code: they pretrain the backbone themselves, self-supervised
    (MoCo v2+ / BYOL style) on the task's own training images; this harness has no such
    checkpoint and probes the dataset's own initial network instead (supervised ImageNet or
    BERT weights; random features for `colored-digits`' CNN and the raw inputs for `synthetic`'s
    linear model, where the probe is the whole model). `budget_frac` (0.1) is not theirs: their
    budget is a per-dataset `gen0_max_steps`, tuned on validation; tune it with --infer-set.
    """

    paper = PAPER
    infers_groups = True
    stackable = False
    hparams = {
        "budget_frac": HParam(
            0.1,
            "the probe's steps as a fraction of the run's (the authors stop it early on purpose)",
            search=FloatDistribution(0.02, 0.5, log=True),
            gt=0,
            le=1,
        ),
    }

    @classmethod
    def main_steps(cls, hparams: dict[str, Any], run_steps: int) -> int:
        return max(1, round(hparams["budget_frac"] * run_steps))

    def __init__(self, dataset: BenchmarkDataset, hparams: dict[str, Any]) -> None:
        super().__init__(dataset, hparams)
        self.features, self.head = split_head(self.model)
        check_head_split(
            self.model, self.features, self.head, dataset.split("train").probe_inputs()
        )
        self.features.requires_grad_(False)

    def train(self, mode: bool = True) -> ULAProxy:
        super().train(mode)
        self.features.eval()  # frozen: batch-norm statistics stay the pretrained ones
        return self

    def finish(self, context: RunContext, outcome: LoopResult) -> None:
        self.eval()
        device, size = context.plan.device, self.dataset.eval_batch_size
        logits = {
            s: predict(self.predict, self.dataset.split(s), device, size) for s in ("train", "val")
        }
        attributes = {split: values.argmax(1) for split, values in logits.items()}
        agreement = (attributes["val"] == self.dataset.split("val").y).float().mean().item()
        write_inferred_groups(
            self,
            context,
            train_heldout_logits=logits["train"],
            train_attribute=attributes["train"],
            val_attribute=attributes["val"],
            n_attributes=self.dataset.n_classes,
            score=agreement,
            stats={"proxy_val_accuracy": agreement},
        )


def adjusted_logits(
    logits: torch.Tensor, confusion: torch.Tensor, bias_prediction: torch.Tensor, tau: float
) -> torch.Tensor:
    """logits + τ log p̂(y | ŷ): row ŷ of the joint (ŷ, y) estimate `confusion`, normalised."""
    joint = confusion[bias_prediction]
    conditional = joint / joint.sum(dim=1, keepdim=True)
    return logits + tau * torch.log(conditional)


@register_method("ula")
class ULA(Method):
    """uLA (Tsirigotis et al. 2023): logits adjusted by a bias proxy's p̂(y | ŷ), no group label.

    A bias proxy (`ula-proxy`, run first and cached like XRM's inference) predicts ŷ for every
    training example. Training keeps an exponential moving average (`confusion_ema`, 0.999,
    from the uniform matrix) of the joint estimate J[k, c] = mean over the minibatch of
    1[y = c] softmax(proxy logits / `teacher_temperature`)[k], and minimises
    CE(f(x) + τ log J[ŷ, .] / Σ_c J[ŷ, c], y) with τ = `temperature`; the adjustment is applied
    in training only. Without validation group labels (regime `none`) the model is selected, as
    the authors select it, by the balanced accuracy over the proxy's pseudo-groups (y, ŷ) of the
    validation split (`val_inferred_balanced`).

    Defaults are the authors' (`ula/methods`): student and teacher temperature 1, EMA momentum
    0.999, the debiased network fine-tuned from the same pretrained weights as the proxy's.
    Differences: see `ula-proxy` for the proxy; their optional GroupMixUp is not implemented.
    The MAT paper's Table 1 has uLA at 91.5 ± 0.7 / 86.1 ± 1.5 (avg / worst) on Waterbirds and
    93.9 ± 0.2 / 86.5 ± 3.7 on CelebA.
    """

    paper = PAPER
    group_inference = "ula-proxy"
    default_criteria = {"none": "val_inferred_balanced"}
    stackable = False  # the moving average is written at every step
    hparams = {
        "temperature": HParam(
            1.0,
            "τ: weight of log p̂(y | ŷ) added to the logits (student_temperature)",
            search=CategoricalDistribution([0.5, 1.0, 2.0]),
            ge=0,
        ),
        "teacher_temperature": HParam(
            1.0, "temperature of the proxy's softmax in the (ŷ, y) estimate", gt=0
        ),
        "confusion_ema": HParam(
            0.999, "momentum of the moving average of the (ŷ, y) estimate", ge=0, lt=1
        ),
    }

    def __init__(self, dataset: BenchmarkDataset, hparams: dict[str, Any]) -> None:
        super().__init__(dataset, hparams)
        k = dataset.n_classes
        self.register_buffer("confusion", torch.full((k, k), 1.0 / k**2))

    def prepare(self, context: RunContext) -> None:
        logits = context.inferred.train_heldout_logits
        n = len(self.dataset.split("train"))
        if logits.shape != (n, self.dataset.n_classes):
            raise RunFailed(
                f"the bias proxy's logits have shape {tuple(logits.shape)}, not the "
                f"{n} x {self.dataset.n_classes} of {self.dataset.name}'s training split"
            )
        self.register_buffer("proxy_logits", logits.float(), persistent=False)

    def loss(self, batch: Batch) -> torch.Tensor:
        proxy = self.proxy_logits[batch.indices]
        with torch.no_grad():
            soft = torch.softmax(proxy / self.hp["teacher_temperature"], dim=1)
            labels = F.one_hot(batch.y, self.dataset.n_classes).to(soft.dtype)
            running = (soft[:, :, None] * labels[:, None, :]).mean(0)  # [ŷ, y]
            momentum = self.hp["confusion_ema"]
            self.confusion.mul_(momentum).add_((1 - momentum) * running)
        logits = adjusted_logits(
            self.model(batch.x).float(), self.confusion, proxy.argmax(1), self.hp["temperature"]
        )
        return F.cross_entropy(logits, batch.y)
