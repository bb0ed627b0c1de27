"""`tune --grid paper`: the 10 configurations of the MAT/XRM code run on every dataset family and
method with no setting fixed, `--trials` is the grid's size or refused, and a value Optuna
refuses is a one-line error with a FAILED study run."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import mlflow
import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState
from upstream_fixtures import write_waterbirds

from robustbench_mat import tuning
from robustbench_mat.cli import main
from robustbench_mat.errors import UserError
from robustbench_mat.registry import DATASETS, METHODS
from robustbench_mat.tuning import (
    PAPER_GRID_SIZE,
    TuneSpec,
    paper_configuration,
    paper_grid,
    paper_space,
)

FINISHED = ("COMPLETE", "PRUNED")
# The issue's command, in a test's work directory.
ISSUE = ["tune", "--method", "groupdro", "--dataset", "synthetic", "--regime", "full"]
ISSUE += ["--grid", "paper", "--n-seeds", "1", "--steps", "2"]


def _study(workdir: Path) -> optuna.Study:
    url = f"sqlite:///{workdir / 'optuna.db'}"
    (name,) = optuna.get_all_study_names(url)
    return optuna.load_study(study_name=name, storage=url)


def _parent(workdir: Path, experiment: str):
    client = mlflow.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    ids = [client.get_experiment_by_name(experiment).experiment_id]
    (parent,) = client.search_runs(ids, "tags.`robustbench.kind` = 'study'")
    return parent


def _grid_trials(study: optuna.Study) -> list[dict]:
    """The parameters of the study's finished trials, in trial order."""
    trials = sorted(study.trials, key=lambda t: t.number)
    return [t.params for t in trials if t.state.name in FINISHED]


def _expected(method: str, dataset, fixed=None) -> list[dict]:
    return paper_grid(METHODS.get(method), dataset, fixed or {})


def test_the_issue_command_runs_the_ten_grid_configurations(workdir: Path, capsys) -> None:
    assert main([*ISSUE, "--workdir", str(workdir), "--quiet"]) == 0
    assert "10" in capsys.readouterr().out
    study = _study(workdir)
    expected = _expected("groupdro", DATASETS.get("synthetic")())
    assert _grid_trials(study) == expected  # the grid's values, exactly, nothing fixed
    assert {c["batch_size"] for c in expected} >= {35, 8}  # outside the TPE space (0, 100, 250)
    assert set(expected[0]) == {"lr", "batch_size", "weight_decay", "eta"}
    assert _parent(workdir, "synthetic").info.status == "FINISHED"


def test_colored_digits_with_trials_10(workdir: Path) -> None:
    command = ["tune", "--method", "erm", "--dataset", "colored-digits", "--grid", "paper"]
    command += ["--trials", "10", "--n-seeds", "1", "--steps", "2", "--quiet"]
    assert main([*command, "--workdir", str(workdir)]) == 0
    expected = _expected("erm", DATASETS.get("colored-digits")())
    assert _grid_trials(_study(workdir)) == expected
    assert set(expected[0]) == {"lr", "batch_size", "weight_decay"}


@pytest.mark.parametrize("trials", ["8", "20"])
def test_other_trial_counts_are_refused_in_one_line(workdir: Path, capsys, trials) -> None:
    assert main([*ISSUE, "--trials", trials, "--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert (
        "--grid paper runs its 10 configurations: leave out --trials (or give --trials 10), "
        f"got --trials {trials}"
    ) in err
    assert not (workdir / "optuna.db").exists()  # refused before any study


def test_a_value_optuna_refuses_is_one_line_and_a_failed_study_run(
    workdir: Path, capsys, monkeypatch
) -> None:
    real = tuning.paper_distributions

    def categorical_batch_sizes(family: str):  # the space the grid's batch sizes once met
        return {**real(family), "batch_size": CategoricalDistribution([0, 100, 250])}

    monkeypatch.setattr(tuning, "paper_distributions", categorical_batch_sizes)
    command = [*ISSUE, "--workdir", str(workdir), "--data", "n=200", "dim=20"]
    assert main(command) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "Optuna refused trial 0's settings: '35' not in (0, 100, 250)" in err
    assert _parent(workdir, "synthetic").info.status == "FAILED"
    study = _study(workdir)
    assert [t.state for t in study.trials if t.number == 0] == [TrialState.FAIL]
    (retry,) = [t for t in study.trials if t.user_attrs.get("retry_of") == 0]
    assert retry.state == TrialState.WAITING  # the configuration is kept for the next attempt

    monkeypatch.setattr(tuning, "paper_distributions", real)
    assert main([*command, "--quiet"]) == 0  # the same command resumes the study
    expected = _expected("groupdro", DATASETS.get("synthetic")(n=200, dim=20))
    ran = _grid_trials(_study(workdir))
    assert sorted(ran, key=lambda c: c["lr"]) == sorted(expected, key=lambda c: c["lr"])
    assert _parent(workdir, "synthetic").info.status == "FINISHED"


def test_a_worker_process_reports_its_error_as_a_message(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise UserError("study s: Optuna refused trial 3's settings: nope")

    monkeypatch.setattr(tuning, "worker_loop", refuse)
    fields = dataclasses.asdict(TuneSpec(method="erm", dataset="synthetic"))
    assert tuning._worker_main(fields, 0) == "study s: Optuna refused trial 3's settings: nope"


def _datasets():
    """One instance per registered dataset (text ones on the offline backbone)."""
    for name in DATASETS.names():
        cls = DATASETS.get(name)
        yield cls(backbone="minilm") if cls.hparam_family == "text" else cls()


def test_every_method_and_dataset_asks_for_distributions_holding_the_grid() -> None:
    families = set()
    for dataset in _datasets():
        families.add(dataset.hparam_family)
        for name in METHODS.names():
            method = METHODS.get(name)
            space = paper_space(method, dataset, {})
            grid = paper_grid(method, dataset, {})
            assert len(grid) == PAPER_GRID_SIZE
            for config in grid:
                assert set(config) == set(space)
                for key, value in config.items():
                    assert space[key]._contains(space[key].to_internal_repr(value)), (key, value)
            own = set(space) - {"lr", "batch_size", "weight_decay"}
            assert own == {
                "groupdro": {"eta"},
                "xrm": {"eta"},  # XRM + GroupDRO
                "mat": {"temperature"},
            }.get(name, set()), name  # LC's temperature and JTT's upsample keep their defaults
    assert families == {"image", "text", "mlp"}


def test_the_grid_ranges_hold_many_configurations() -> None:
    for family in ("image", "text", "mlp"):
        space = tuning.paper_distributions(family)
        for combo in range(500):
            for key, value in paper_configuration(combo, family).items():
                assert space[key]._contains(space[key].to_internal_repr(value)), (combo, key)


def test_fixed_settings_leave_the_grid_and_an_empty_grid_is_refused() -> None:
    dataset = DATASETS.get("synthetic")()
    grid = paper_grid(METHODS.get("mat"), dataset, {"batch_size": 0, "lr": 0.1})
    assert set(grid[0]) == {"weight_decay", "temperature"}
    with pytest.raises(UserError, match="--grid paper has nothing left to set for method 'erm'"):
        paper_space(METHODS.get("erm"), dataset, {"lr": 1, "batch_size": 0, "weight_decay": 0})


def test_waterbirds_fixture_on_cached_features(tmp_path: Path, workdir: Path) -> None:
    from robustbench_mat.datasets.waterbirds import Waterbirds
    from robustbench_mat.download import prepare_dataset

    write_waterbirds(tmp_path / "data" / "waterbirds")
    prepare_dataset(Waterbirds, tmp_path / "data", show_progress=False)
    command = ["tune", "--method", "groupdro", "--dataset", "waterbirds", "--regime", "full"]
    command += ["--grid", "paper", "--n-seeds", "1", "--steps", "2", "--quiet"]
    command += ["--data-dir", str(tmp_path / "data"), "--workdir", str(workdir)]
    command += ["--data", "features=resnet50", "weights=none", "image_size=32"]
    assert main(command) == 0
    dataset = Waterbirds(tmp_path / "data", features="resnet50", weights="none", image_size=32)
    expected = _expected("groupdro", dataset)
    assert _grid_trials(_study(workdir)) == expected
    assert [c["batch_size"] for c in expected][:3] == [86, 86, 33]  # the image family's
    assert _parent(workdir, "waterbirds").info.status == "FINISHED"
