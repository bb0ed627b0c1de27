"""CRT retrains a fresh last layer on frozen stage-1 ERM features with group-balanced batches."""

from __future__ import annotations

import pytest
import torch
from helpers import StageContext, only_run_dir, run_tiny

from robustbench_mat.backbones import split_head
from robustbench_mat.method import Batch
from robustbench_mat.methods.crt import CRT, ReWeightCRT
from robustbench_mat.registry import DATASETS


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    dataset = DATASETS.get("colored-digits")()
    hparams = {k: spec.default for k, spec in CRT.hparam_specs(dataset).items()}
    torch.manual_seed(0)
    method = CRT(dataset, hparams)
    context = StageContext(tmp_path_factory.mktemp("crt"), steps=5)
    method.prepare(context)
    return dataset, method, context


def test_the_head_starts_afresh_on_frozen_stage1_features(prepared) -> None:
    dataset, method, context = prepared
    [(name, initial, steps)] = context.stages
    assert (name, steps) == ("stage1", 5)
    stage1_head = {k: v for k, v in initial.items() if k.startswith("model.")}
    assert stage1_head  # stage 1 trained the whole network from its initial state
    for parameter_name, parameter in method.head.named_parameters():
        torch.testing.assert_close(parameter.detach(), method.fresh_head[parameter_name])
    frozen = [p for p in method.model.parameters() if not p.requires_grad]
    trained = [p for p in method.model.parameters() if p.requires_grad]
    assert trained == list(method.head.parameters()) and frozen
    optimizer = method.configure_optimizer()
    (params,) = [group["params"] for group in optimizer.param_groups]
    assert params == list(method.head.parameters())
    train = dataset.split("train")
    stage2 = method.train_split()
    with torch.no_grad():
        expected = method.features(train.inputs[:16])
    torch.testing.assert_close(stage2.inputs[:16], expected)
    assert torch.equal(stage2.y, train.y) and torch.equal(stage2.a, train.a)


def test_batches_are_drawn_group_balanced(prepared) -> None:
    """Weights 1 / n_g: every group present carries the same total weight."""
    _, method, _ = prepared
    stage2 = method.train_split()
    weights = method.train_weights(stage2)
    totals = torch.bincount(stage2.g, weights=weights.double())
    present = totals[torch.bincount(stage2.g) > 0]
    torch.testing.assert_close(present, torch.full_like(present, present[0].item()))
    counts = torch.bincount(stage2.g)
    g_small, g_large = int(counts.argmin()), int(counts.argmax())
    w_small = weights[stage2.g == g_small][0] / weights[stage2.g == g_large][0]
    assert w_small.item() == pytest.approx(counts[g_large].item() / counts[g_small].item())


def test_reweightcrt_weights_each_loss_by_its_inverse_group_size() -> None:
    """Uniform batches; the loss is mean_i w_g(i) CE_i with w_g = (1/n_g) / Σ_h (1/n_h) · G."""
    dataset = DATASETS.get("synthetic")(n=200, dim=20)
    hparams = {k: spec.default for k, spec in ReWeightCRT.hparam_specs(dataset).items()}
    method = ReWeightCRT(dataset, hparams)
    train = dataset.split("train")
    assert method.train_weights(train) is None
    counts = torch.bincount(train.g, minlength=4).double()
    expected_weights = (1 / counts) / (1 / counts).sum() * 4
    torch.testing.assert_close(method.group_weights, expected_weights.float())
    batch = Batch(torch.arange(8), train.inputs[:8], train.y[:8], train.a[:8], 2)
    ce = torch.nn.functional.cross_entropy(method.head(batch.x), batch.y, reduction="none")
    expected = (expected_weights.float()[train.g[:8]] * ce).mean()
    torch.testing.assert_close(method.loss(batch), expected)


def _head_keys(dataset: str, data: dict) -> set[str]:
    """The state-dict keys of the last linear layer of `dataset`'s network."""
    model = DATASETS.get(dataset)(**data).build_model()
    _, head = split_head(model)
    if head is model:
        return {f"model.{name}" for name, _ in head.named_parameters()}
    [prefix] = [name for name, module in model.named_modules() if module is head]
    return {f"model.{prefix}.{name}" for name, _ in head.named_parameters()}


@pytest.mark.parametrize("method", ["crt", "reweightcrt"])
@pytest.mark.parametrize(
    ("dataset", "data"), [("synthetic", {"n": 200, "dim": 20}), ("colored-digits", {})]
)
def test_only_the_head_moves_in_stage2(workdir, method, dataset, data) -> None:
    result = run_tiny(workdir, method, dataset=dataset, data_params=data)
    assert result.regime == "full"
    run_dir = only_run_dir(workdir)
    stage1 = torch.load(run_dir / "stage1.pt", weights_only=True)["method"]
    final = torch.load(run_dir / "final_model.pt", weights_only=True)
    head = _head_keys(dataset, data)
    assert head and head <= set(final)
    for key in set(final) & set(stage1):
        if key in head:
            assert not torch.equal(final[key], stage1[key]), key  # retrained from a fresh start
        else:
            assert torch.equal(final[key], stage1[key]), key  # the features are stage 1's
