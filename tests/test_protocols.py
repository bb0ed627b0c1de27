"""`--protocol paper`: the MAT/XRM code's setup per dataset, under the user's own flags."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from robustbench_mat.cli import main
from robustbench_mat.errors import UserError
from robustbench_mat.runner import RunSpec, inference_specs, plan
from robustbench_mat.tracking import TAGS
from robustbench_mat.tuning import PAPER_GRID_SIZE, TuneSpec, paper_grid, with_protocol_grid


def paper_plan(tmp_path, **overrides):
    settings = dict(method="erm", dataset="colored-digits", protocol="paper", workdir=tmp_path)
    return plan(RunSpec(**{**settings, **overrides}))


def test_paper_applies_the_budget_cadence_and_optimiser_of_the_authors_code(tmp_path):
    the_plan = paper_plan(tmp_path)
    assert (the_plan.steps, the_plan.eval_every) == (1001, 50)  # their ColorMNIST budget
    assert the_plan.hparams["optimizer"] == "adam"
    assert the_plan.params()["protocol"] == "paper"
    assert the_plan.tags()[TAGS.PROTOCOL] == "paper"
    default = plan(RunSpec(method="erm", dataset="colored-digits", workdir=tmp_path))
    assert default.steps == 500 and default.tags()[TAGS.PROTOCOL] == "default"
    assert default.key != the_plan.key


def test_flags_the_user_gives_win_over_the_protocol(tmp_path):
    the_plan = paper_plan(tmp_path, steps=7, eval_every=7, hparams={"optimizer": "sgd"})
    assert (the_plan.steps, the_plan.eval_every, the_plan.hparams["optimizer"]) == (7, 7, "sgd")


def test_waterbirds_trains_on_frozen_features_with_sgd_and_a_zero_head(tmp_path):
    the_plan = paper_plan(tmp_path, dataset="waterbirds", data_dir=tmp_path / "data")
    assert the_plan.dataset.config["features"] == "resnet50"
    assert the_plan.hparams["momentum"] == 0.9 and the_plan.hparams["zero_init_head"]
    assert (the_plan.steps, the_plan.eval_every) == (1001, 50)


def test_text_datasets_get_adamw_with_the_xrm_schedule_and_decay_groups(tmp_path):
    the_plan = paper_plan(
        tmp_path, dataset="multinli", data_dir=tmp_path / "data", data_params={"backbone": "minilm"}
    )
    hparams = the_plan.hparams
    assert (hparams["optimizer"], hparams["lr_schedule"]) == ("adamw", "xrm-bert")
    assert hparams["no_decay_groups"] and hparams["zero_init_head"]
    assert (the_plan.steps, the_plan.eval_every) == (60_001, 250)


def test_celeba_infers_groups_on_features_once_for_every_seed_over_the_paper_grid(tmp_path):
    the_plan = paper_plan(tmp_path, method="mat", dataset="celeba", seed=2, data_dir=tmp_path)
    assert the_plan.dataset.config["features"] == ""  # MAT fine-tunes the whole network
    inferences = inference_specs(the_plan)
    assert len(inferences) == PAPER_GRID_SIZE
    assert {spec.seed for spec in inferences} == {0}
    assert all(spec.data_params["features"] == "resnet50" for spec in inferences)
    inferrer = plan(inferences[0])
    assert inferrer.steps == 10_001 and inferrer.hparams["momentum"] == 0.9
    grid = paper_grid(inferrer.method_cls, inferrer.dataset, {})
    assert [{k: s.hparams[k] for k in grid[0]} for s in inferences] == grid
    assert the_plan.params()["inference.seed"] == 0


def test_synthetic_paper_is_its_defaults_with_one_inference_run(tmp_path):
    the_plan = paper_plan(tmp_path, method="mat", dataset="synthetic")
    assert (the_plan.steps, the_plan.eval_every) == (1000, 10)
    (inference,) = inference_specs(the_plan)
    assert inference.seed == 0


def test_a_dataset_without_a_paper_setup_is_refused(tmp_path):
    with pytest.raises(UserError, match="no paper setup is declared for dataset 'good-bad-ugly'"):
        paper_plan(tmp_path, dataset="good-bad-ugly")


def test_tuning_under_the_paper_protocol_uses_the_paper_grid():
    spec = TuneSpec(method="erm", dataset="colored-digits", protocol="paper")
    assert with_protocol_grid(spec).grid == "paper"
    assert with_protocol_grid(TuneSpec(method="erm", dataset="colored-digits")).grid is None
    synthetic = TuneSpec(method="erm", dataset="synthetic", protocol="paper")
    assert with_protocol_grid(synthetic).grid is None


def test_the_command_records_the_protocol(workdir, capsys):
    command = ["run", "--method", "erm", "--dataset", "colored-digits", "--protocol", "paper"]
    assert main(command + ["--steps", "3", "--quiet", "--workdir", str(workdir)]) == 0
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("colored-digits").experiment_id])
    assert run.data.tags[TAGS.PROTOCOL] == "paper" and run.data.params["optimizer"] == "adam"
