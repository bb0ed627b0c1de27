"""XRM flips labels by held-out confidence and infers groups from cross-mistakes."""

from __future__ import annotations

import pytest
import torch

from robustbench_mat.backbones import split_head
from robustbench_mat.group_inference import ARTIFACT_NAME, InferredGroups
from robustbench_mat.method import Batch
from robustbench_mat.methods.xrm import XRMGroupInference, cross_mistakes, flip_probability
from robustbench_mat.registry import DATASETS, METHODS
from robustbench_mat.runner import RunSpec, run


@pytest.mark.parametrize("n_classes", [2, 3, 5])
def test_flip_probability_is_zero_at_chance_and_one_at_certainty(n_classes: int) -> None:
    confidence = torch.tensor([1.0 / n_classes, 1.0, (1.0 + 1.0 / n_classes) / 2])
    torch.testing.assert_close(
        flip_probability(confidence, n_classes), torch.tensor([0.0, 1.0, 0.5])
    )


def _twins(n: int = 40):
    dataset = DATASETS.get("synthetic")(n=n, dim=4)
    hparams = {k: s.default for k, s in XRMGroupInference.hparam_specs(dataset).items()}
    torch.manual_seed(0)
    return dataset, XRMGroupInference(dataset, hparams)


def test_confident_held_out_mistakes_are_imitated_and_chance_is_not() -> None:
    dataset, method = _twins()
    train = dataset.split("train")
    idx = torch.arange(10)
    batch = Batch(idx, train.inputs[idx], train.y[idx], None, 2)
    wrong = 1 - train.y[idx]
    method._held_out = 100.0 * torch.nn.functional.one_hot(wrong, 2).float()  # p_ho = 1, wrong
    method.after_step(batch, step=1)
    assert torch.equal(method.labels[idx], wrong)
    assert method.flip_rate() == pytest.approx(10 / 40)

    idx2 = torch.arange(10, 20)
    batch2 = Batch(idx2, train.inputs[idx2], train.y[idx2], None, 2)
    method._held_out = torch.zeros(10, 2)  # p_ho = 1/2: never flips
    method.after_step(batch2, step=2)
    assert torch.equal(method.labels[idx2], train.y[idx2])


def test_held_in_loss_is_the_class_balanced_sum() -> None:
    dataset, method = _twins()
    train = dataset.split("train")
    idx = torch.arange(12)
    batch = Batch(idx, train.inputs[idx], train.y[idx], None, 2)
    held_in, _ = method._held_in_and_out(batch.x, idx)
    ce = torch.nn.functional.cross_entropy(held_in, train.y[idx], reduction="none")
    expected = sum(ce[train.y[idx] == c].mean() for c in (0, 1))
    torch.testing.assert_close(method.loss(batch), expected)


def test_cross_mistakes_mark_examples_either_twin_gets_wrong() -> None:
    a = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, 2.0]])
    b = torch.tensor([[2.0, 0.0], [0.0, 2.0], [0.0, 2.0], [2.0, 0.0]])
    y = torch.tensor([0, 0, 1, 0])
    assert cross_mistakes(a, b, y).tolist() == [0, 1, 0, 1]


@pytest.fixture(scope="module")
def xrm_run(tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("xrm")
    spec = RunSpec(
        method="xrm-infer",
        dataset="synthetic",
        seed=0,
        regime="none",
        hparams={"batch_size": 50, "lr": 0.05},
        data_params={"n": 200, "dim": 50},
        workdir=workdir,
        show_progress=False,
    )
    result = run(spec)
    (run_dir,) = (workdir / "runs").glob("synthetic-xrm-infer-*")
    return result, run_dir


def test_artifact_holds_held_out_logits_in_dataset_order(xrm_run) -> None:
    result, run_dir = xrm_run
    artifact = InferredGroups.load(run_dir / ARTIFACT_NAME)
    dataset = DATASETS.get("synthetic")(n=200, dim=50)
    method = XRMGroupInference(dataset, result.hparams)
    method.load_state_dict(torch.load(run_dir / "final_model.pt"))
    x, y = dataset.split("train").inputs, dataset.split("train").y
    with torch.no_grad():
        logits_a, logits_b = method.model[0](x), method.model[1](x)
    mine = method.assignment
    # example i's held-out logits come from the twin that did not train on it, row i
    for i in range(len(y)):
        expected = logits_b[i] if mine[i] else logits_a[i]
        torch.testing.assert_close(artifact.train_heldout_logits[i], expected)
    assert torch.equal(artifact.train_attribute, cross_mistakes(logits_a, logits_b, y))
    assert artifact.stats["flip_rate"] == pytest.approx((method.labels != y).float().mean().item())


def test_reported_flip_rate_is_the_fraction_of_changed_labels(xrm_run) -> None:
    result, run_dir = xrm_run
    state = torch.load(run_dir / "final_model.pt")
    y = DATASETS.get("synthetic")(n=200, dim=50).split("train").y
    changed = (state["labels"] != y).float().mean().item()
    assert result.final["flip_rate"] == pytest.approx(changed)
    assert 0 < changed < 0.5


def test_mat_reuses_the_cached_xrm_run_and_records_it(xrm_run) -> None:
    import mlflow

    xrm_result, run_dir = xrm_run
    workdir = run_dir.parents[1]
    common = dict(
        method="mat",
        dataset="synthetic",
        seed=0,
        regime="none",
        eval_every=10,
        data_params={"n": 200, "dim": 50},
        workdir=workdir,
        show_progress=False,
        inference_hparams={"batch_size": 50, "lr": 0.05},
    )
    client = mlflow.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    for steps in (20, 30):  # two different MAT runs on the same XRM groups
        mat = run(RunSpec(steps=steps, **common))
        tags = client.get_run(mat.run_id).data.tags
        assert tags["robustbench.inferred_groups.method"] == "xrm-infer"
        assert tags["robustbench.inferred_groups.run_id"] == xrm_result.run_id
        assert mat.criterion == "val_inferred_wga"
        assert "val_inferred_wga" in mat.selected
    assert len(list((workdir / "runs").glob("synthetic-xrm-infer-*"))) == 1


def test_zero_init_head_starts_both_twins_at_zero_and_identical():
    dataset = DATASETS.get("colored-digits")()
    cls = METHODS.get("xrm-infer")
    defaults = {name: spec.default for name, spec in cls.hparam_specs(dataset).items()}
    assert defaults["zero_init_head"] is False
    twins = cls(dataset, {**defaults, "zero_init_head": True}).model
    x = dataset.split("train").inputs[:8]
    for twin in twins:
        _, head = split_head(twin)
        assert not head.weight.any() and not head.bias.any()
    torch.testing.assert_close(twins[0](x), twins[1](x), rtol=0, atol=0)
    untouched = cls(dataset, defaults).model
    assert split_head(untouched[0])[1].weight.any()
