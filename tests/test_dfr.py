"""DFR fits a new last layer on a group-balanced half of the validation split."""

from __future__ import annotations

import pytest
import torch
from helpers import StageContext, run_tiny

from robustbench_mat.errors import UserError
from robustbench_mat.methods.dfr import DFR
from robustbench_mat.registry import DATASETS


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    dataset = DATASETS.get("synthetic")(n=200, dim=20, eval_majority=0.8)
    hparams = {k: spec.default for k, spec in DFR.hparam_specs(dataset).items()}
    torch.manual_seed(0)
    method = DFR(dataset, hparams)
    context = StageContext(tmp_path_factory.mktemp("dfr"), steps=30)
    method.prepare(context)
    return dataset, method


def test_fitting_set_has_equal_group_counts(prepared) -> None:
    dataset, method = prepared
    val = dataset.split("val")
    assert torch.bincount(val.g, minlength=4).max() > 2 * torch.bincount(val.g, minlength=4).min()
    counts = torch.bincount(method.fit_groups(), minlength=4)
    assert counts.min() == counts.max() > 0
    assert torch.equal(torch.bincount(method.train_split().y * 2 + method.train_split().a), counts)


def test_fitting_and_selection_halves_are_disjoint(prepared) -> None:
    dataset, method = prepared
    fit, select = set(method.fit_indices.tolist()), set(method.select_indices.tolist())
    assert not fit & select and len(select) == 100 and len(fit) <= 100
    val, test = dataset.split("val"), dataset.split("test")
    assert torch.equal(method.eval_split(val).y, val.y[method.select_indices])
    assert method.eval_split(test) is test


def test_only_the_new_standardised_head_trains(prepared) -> None:
    dataset, method = prepared
    optimizer = method.configure_optimizer()
    (params,) = [group["params"] for group in optimizer.param_groups]
    assert params == list(method.dfr_head.parameters())
    assert not any(p.requires_grad for p in method.model.parameters())
    fit = method.train_split()
    assert method.hp["batch_size"] == 0
    torch.testing.assert_close(fit.inputs.mean(0), torch.zeros(20), atol=1e-5, rtol=0)
    x = dataset.split("val").inputs[method.fit_indices]
    torch.testing.assert_close(method.predict(x), method.dfr_head(fit.inputs))
    from robustbench_mat.method import Batch

    batch = Batch(torch.arange(len(fit)), fit.inputs, fit.y, None, 2)
    with torch.no_grad():
        method.dfr_head.weight.fill_(0.5)
    ce = torch.nn.functional.cross_entropy(method.dfr_head(fit.inputs), fit.y)
    torch.testing.assert_close(method.loss(batch), ce + method.hp["l1"] * 0.5 * 40)


def test_dfr_runs_end_to_end(workdir) -> None:
    result = run_tiny(workdir, "dfr")
    assert result.regime == "val-only"


def test_dfr_is_refused_without_validation_groups(workdir) -> None:
    message = "needs validation group labels.*can run in: full, val-only"
    with pytest.raises(UserError, match=message):
        run_tiny(workdir, "dfr", regime="none")
