"""uLA: a linear-probe bias proxy, and logits adjusted by its p̂(y | ŷ)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import only_run_dir, run_tiny

from robustbench_mat.group_inference import ARTIFACT_NAME, InferredGroups
from robustbench_mat.method import Batch
from robustbench_mat.methods.ula import ULA, ULAProxy
from robustbench_mat.registry import DATASETS

LN3 = math.log(3.0)


def _method(cls, dataset, **overrides):
    hparams = {k: spec.default for k, spec in cls.hparam_specs(dataset).items()}
    hparams.update(overrides)
    torch.manual_seed(0)
    return cls(dataset, hparams)


def test_the_loss_adds_tau_log_p_y_given_the_proxys_prediction() -> None:
    """Proxy softmaxes (0.75, 0.25) for examples 0, 3 and (0.25, 0.75) for 1, 2; labels 0, 1, 1,
    0. The batch's joint estimate J[ŷ, y] = mean_i 1[y_i = y] p_i(ŷ) is [[1.5, 0.5], [0.5, 1.5]]
    / 4, so one update from the uniform 1/4 gives 0.999 / 4 + 0.001 J: 0.250125 on the diagonal,
    0.249875 off it, and p̂(y | ŷ) = (0.50025, 0.49975) for ŷ = 0, mirrored for ŷ = 1."""
    dataset = DATASETS.get("synthetic")(n=4, dim=4)
    method = _method(ULA, dataset, temperature=2.0)
    proxy = torch.tensor([[LN3, 0.0], [0.0, LN3], [0.0, LN3], [LN3, 0.0]])
    method.prepare(SimpleNamespace(inferred=SimpleNamespace(train_heldout_logits=proxy)))
    train = dataset.split("train")
    batch = Batch(torch.arange(4), train.inputs, torch.tensor([0, 1, 1, 0]), None, 2)
    loss = method.loss(batch)
    expected_confusion = torch.tensor([[0.250125, 0.249875], [0.249875, 0.250125]])
    torch.testing.assert_close(method.confusion, expected_confusion)
    conditional = torch.tensor([[0.50025, 0.49975], [0.49975, 0.50025]])
    shift = conditional[torch.tensor([0, 1, 1, 0])].log()
    with torch.no_grad():
        logits = method.model(train.inputs)
    torch.testing.assert_close(loss, F.cross_entropy(logits + 2.0 * shift, batch.y))
    torch.testing.assert_close(method.predict(train.inputs), logits)  # no shift at evaluation


def test_the_proxy_trains_only_the_last_layer_of_the_pretrained_network() -> None:
    dataset = DATASETS.get("colored-digits")()
    proxy = _method(ULAProxy, dataset)
    trained = [p for p in proxy.parameters() if p.requires_grad]
    assert trained == list(proxy.head.parameters())
    assert ULAProxy.main_steps(proxy.hp, 500) == 50  # budget_frac 0.1: stopped early


def test_pseudo_groups_are_the_label_and_the_proxys_prediction(workdir) -> None:
    result = run_tiny(workdir, "ula-proxy", dataset="colored-digits", data_params={})
    artifact = InferredGroups.load(only_run_dir(workdir) / ARTIFACT_NAME)
    dataset = DATASETS.get("colored-digits")()
    proxy = ULAProxy(dataset, result.hparams)
    proxy.load_state_dict(torch.load(only_run_dir(workdir) / "final_model.pt", weights_only=True))
    proxy.eval()
    with torch.no_grad():
        val_logits = proxy.predict(dataset.split("val").inputs)
    assert torch.equal(artifact.val_attribute, val_logits.argmax(1))
    assert artifact.n_attributes == 2 and artifact.train_heldout_logits.shape == (1000, 2)
    val_y = dataset.split("val").y
    assert torch.equal(artifact.group_ids("val", val_y), val_y * 2 + val_logits.argmax(1))


@pytest.mark.parametrize(
    ("dataset", "data"), [("synthetic", {"n": 200, "dim": 20}), ("colored-digits", {})]
)
def test_ula_runs_without_group_labels(workdir, dataset, data) -> None:
    result = run_tiny(workdir, "ula", dataset=dataset, data_params=data, regime="none")
    assert result.criterion == "val_inferred_balanced"  # the authors' selection rule
    groups = [k for k in result.selected if k.startswith("val_inferred_group_acc.")]
    balanced = sum(result.selected[k] for k in groups) / len(groups)
    assert result.selected["val_inferred_balanced"] == pytest.approx(balanced)
    assert 0 <= result.final["test_wga"] <= 1
