"""JTT upsamples exactly the examples its stage-1 model misclassifies."""

from __future__ import annotations

import pytest
import torch
from helpers import StageContext, run_tiny

from robustbench_mat.methods.jtt import JTT, upsampled_indices
from robustbench_mat.registry import DATASETS


def test_upsampled_indices_repeat_the_error_set_exactly() -> None:
    indices = upsampled_indices(5, torch.tensor([1, 3]), upsample=4)
    assert torch.bincount(indices, minlength=5).tolist() == [1, 4, 1, 4, 1]
    assert torch.equal(upsampled_indices(3, torch.tensor([2]), 1), torch.arange(3))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    dataset = DATASETS.get("synthetic")(n=200, dim=20)
    hparams = {k: spec.default for k, spec in JTT.hparam_specs(dataset).items()}
    hparams.update(first_stage_frac=0.5, upsample=7)
    torch.manual_seed(0)
    method = JTT(dataset, hparams)
    initial = {k: v.clone() for k, v in method.model.state_dict().items()}
    context = StageContext(tmp_path_factory.mktemp("jtt"), steps=100)
    method.prepare(context)
    return dataset, method, initial, context


def test_error_set_is_exactly_the_stage1_mistakes(prepared) -> None:
    dataset, method, _, context = prepared
    train = dataset.split("train")
    saved = torch.load(context.run_dir / "jtt_stage1.pt")
    stage1 = torch.nn.Linear(20, 2, bias=False)
    stage1.load_state_dict(saved["stage1_model"])
    with torch.no_grad():
        wrong = stage1(train.inputs).argmax(1) != train.y
    assert 0 < wrong.sum() < len(train) // 2  # some but not all examples are errors
    assert torch.equal(saved["error_set"], torch.nonzero(wrong)[:, 0])
    assert torch.equal(method.error_set, saved["error_set"])
    # The stage-1 model leans on the spurious feature: its errors are mostly minority examples.
    assert (train.a[wrong] != train.y[wrong]).float().mean() > 0.5


def test_misclassified_examples_are_upsampled_and_correct_ones_are_not(prepared) -> None:
    dataset, method, _, _ = prepared
    train = dataset.split("train")
    counts = torch.bincount(method.train_subset(train), minlength=len(train))
    in_error_set = torch.zeros(len(train), dtype=torch.bool)
    in_error_set[method.error_set] = True
    assert (counts[in_error_set] == 7).all()
    assert (counts[~in_error_set] == 1).all()


def test_both_stages_start_from_the_same_weights(prepared) -> None:
    _, method, initial, context = prepared
    ((name, stage1_initial, steps),) = context.stages
    assert (name, steps) == ("stage1", 50)  # first_stage_frac 0.5 of 100 steps
    torch.testing.assert_close(stage1_initial["model.weight"], initial["weight"])
    torch.testing.assert_close(method.model.state_dict()["weight"], initial["weight"])


def test_jtt_runs_end_to_end_and_logs_stage1(workdir) -> None:
    import mlflow

    result = run_tiny(workdir, "jtt", hparams={"first_stage_frac": 0.5})
    client = mlflow.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    artifacts = [a.path for a in client.list_artifacts(result.run_id, "jtt")]
    assert artifacts == ["jtt/jtt_stage1.pt"]
    metrics = client.get_run(result.run_id).data.metrics
    assert "jtt_error_set_size" in metrics
    assert any(key.startswith("stage1/") for key in metrics)
