"""Tuning: one Optuna study per (method, dataset, regime, budget), exact trial counts across
resumes and workers, MLflow parent/child runs and the final seed runs."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from robustbench_mat import tuning
from robustbench_mat.cli import main
from robustbench_mat.registry import DATASETS, METHODS
from robustbench_mat.tuning import (
    TuneSpec,
    paper_configuration,
    paper_grid,
    recover_dead_trials,
    tune,
)

CLI = Path(sys.executable).with_name("robustbench-mat")
TINY = {"n": 200, "dim": 20}


def _spec(workdir: Path, **overrides) -> TuneSpec:
    fields = dict(
        method="erm",
        dataset="synthetic",
        trials=4,
        seeds=2,
        steps=40,
        eval_every=20,
        data_params=dict(TINY),
        workdir=str(workdir),
        prune=False,
    )
    fields.update(overrides)
    return TuneSpec(**fields)


def _study(workdir: Path, storage: str | None = None) -> optuna.Study:
    url = storage or f"sqlite:///{workdir / 'optuna.db'}"
    (name,) = optuna.get_all_study_names(url)
    return optuna.load_study(study_name=name, storage=url)


def _runs(workdir: Path):
    client = mlflow.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("synthetic").experiment_id
    return client, client.search_runs([experiment], max_results=1000)


def _states(study: optuna.Study) -> list[str]:
    """Trial states, leaving out the trials a worker gave up at once because another worker
    took the last slot at the same moment (they never ran)."""
    return sorted(t.state.name for t in study.trials if not t.user_attrs.get("surplus"))


def test_tune_records_trials_as_children_and_final_seed_runs(workdir: Path) -> None:
    result = tune(_spec(workdir), log=lambda line: None)
    study = _study(workdir)
    assert study.study_name == result.study_name
    assert study.study_name.startswith("erm.synthetic.val-only.steps40.")
    assert _states(study) == ["COMPLETE"] * 4
    assert result.best_value == max(t.value for t in study.trials)

    client, runs = _runs(workdir)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["robustbench.kind"] == "study"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    trials = [r for r in children if r.data.tags["robustbench.kind"] == "trial"]
    assert sorted(int(r.data.tags["robustbench.trial"]) for r in trials) == [0, 1, 2, 3]
    finals = [r for r in runs if r.data.tags.get("robustbench.final") == "true"]
    assert sorted(r.data.tags["robustbench.seed"] for r in finals) == ["0", "1"]
    for run in finals:
        assert run.info.status == "FINISHED"
        assert run.data.tags["robustbench.method"] == "erm"
        assert run.data.tags["robustbench.regime"] == "val-only"
        assert run.data.tags["robustbench.criterion"] == "val_wga"
        assert float(run.data.params["lr"]) == pytest.approx(result.best_params["lr"])
    assert [r.run_id for r in result.final_runs] == [
        r.info.run_id for r in sorted(finals, key=lambda r: r.data.tags["robustbench.seed"])
    ]

    again = tune(_spec(workdir), log=lambda line: None)  # the same command: nothing new
    assert _states(_study(workdir)) == ["COMPLETE"] * 4
    assert len(_runs(workdir)[1]) == len(runs)
    assert again.best_params == result.best_params


@pytest.mark.parametrize("prune", [False, True])
def test_evaluations_reach_optuna_only_for_the_pruner(workdir: Path, prune: bool) -> None:
    """With pruning, every evaluation is reported (steps 20 and 40); without, none is (a
    database commit per evaluation that nothing reads), and the trials still finish."""
    tune(_spec(workdir, trials=2, seeds=1, prune=prune), log=lambda line: None)
    trials = _study(workdir).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    expected = [20, 40] if prune else []
    assert [sorted(t.intermediate_values) for t in trials] == [expected, expected]


def test_progress_lines_count_the_finished_trials_and_the_best_so_far(workdir: Path) -> None:
    lines: list[str] = []
    tune(_spec(workdir, trials=3, seeds=1), log=lines.append)
    trials = sorted(_study(workdir).trials, key=lambda t: t.number)
    progress = [line for line in lines if "finished):" in line]
    assert len(progress) == 3
    for k, (line, trial) in enumerate(zip(progress, trials, strict=True), start=1):
        best = max(t.value for t in trials[:k])
        assert line.startswith(f"trial {trial.number} ({k} of 3 finished): val_wga = ")
        assert line.endswith(f"best so far {best:.4f}")


def test_paper_grid_reproduces_the_reference_configurations() -> None:
    # ../shared/reference/algorithms.md, "The exact 10 combos"
    image0 = paper_configuration(0, "image")
    assert image0["lr"] == pytest.approx(1.25e-4, rel=5e-3)
    assert image0["batch_size"] == 86
    assert image0["weight_decay"] == pytest.approx(6.4e-5, rel=5e-3)
    assert image0["temperature"] == 0.001
    assert image0["eta"] == pytest.approx(1.23e-2, rel=5e-3)
    image4 = paper_configuration(4, "image")
    assert (image4["batch_size"], image4["temperature"]) == (68, 0.1)
    assert image4["eta"] == pytest.approx(2.69e-2, rel=5e-3)
    text0 = paper_configuration(0, "text")
    assert text0["lr"] == pytest.approx(1.25e-5, rel=5e-3) and text0["batch_size"] == 43
    assert text0["eta"] == pytest.approx(1.77e-2, rel=5e-3)  # after the unused dropout draw
    dataset = DATASETS.get("synthetic")()
    mat_grid = paper_grid(METHODS.get("mat"), dataset, fixed={"batch_size": 0})
    assert len(mat_grid) == 10
    assert set(mat_grid[0]) == {"lr", "weight_decay", "temperature"}
    assert set(paper_grid(METHODS.get("groupdro"), dataset, {})[0]) == {
        "lr",
        "weight_decay",
        "batch_size",
        "eta",
    }


def test_grid_paper_runs_exactly_the_ten_configurations(workdir: Path) -> None:
    tune(
        _spec(workdir, grid="paper", trials=None, seeds=1, steps=20, hparams={"batch_size": 0}),
        log=lambda line: None,
    )
    study = _study(workdir)
    assert _states(study) == ["COMPLETE"] * 10
    expected = paper_grid(METHODS.get("erm"), DATASETS.get("synthetic")(), {"batch_size": 0})
    assert sorted(t.params["lr"] for t in study.trials) == sorted(c["lr"] for c in expected)


def test_two_local_workers_share_one_sqlite_study(workdir: Path) -> None:
    tune(_spec(workdir, trials=6, seeds=1, workers=2), log=lambda line: None)
    study = _study(workdir)
    assert _states(study) == ["COMPLETE"] * 6
    ran = [t for t in study.trials if not t.user_attrs.get("surplus")]
    assert len({t.number for t in ran}) == 6
    assert len({t.user_attrs["pid"] for t in ran}) == 2  # both workers took trials
    _, runs = _runs(workdir)
    trial_runs = [r for r in runs if r.data.tags["robustbench.kind"] == "trial"]
    assert sorted(int(r.data.tags["robustbench.trial"]) for r in trial_runs) == list(range(6))


def test_submitit_local_launcher_runs_the_workers(workdir: Path) -> None:
    pytest.importorskip("submitit")
    tune(
        _spec(workdir, trials=3, seeds=1, workers=2, launcher="submitit-local"),
        log=lambda line: None,
    )
    assert _states(_study(workdir)) == ["COMPLETE"] * 3
    assert list((workdir / "submitit").glob("*_result.pkl"))


def _running_trial(database: Path) -> bool:
    if not database.exists():
        return False
    try:
        with sqlite3.connect(database, timeout=1) as connection:
            rows = connection.execute("SELECT count(*) FROM trials WHERE state = 'RUNNING'")
            return rows.fetchone()[0] > 0
    except sqlite3.Error:
        return False


def test_kill_9_mid_trial_then_the_same_command_completes_exactly(workdir: Path) -> None:
    command = [
        str(CLI),
        "tune",
        "--method",
        "erm",
        "--dataset",
        "synthetic",
        "--trials",
        "3",
        "--n-seeds",
        "2",
        "--steps",
        "1500",
        "--eval-every",
        "100",
        "--checkpoint-seconds",
        "0",
        "--no-prune",
        "--quiet",
        "--workdir",
        str(workdir),
        "--data",
        "n=200",
        "dim=20",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (
        _running_trial(workdir / "optuna.db") and list((workdir / "runs").glob("*/checkpoint.pt"))
    ):
        assert process.poll() is None, process.stderr.read().decode()
        assert time.time() < deadline, "no trial started"
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed = _study(workdir)
    assert [t.state for t in killed.trials if t.state == TrialState.RUNNING]

    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    study = _study(workdir)
    states = _states(study)
    assert states.count("COMPLETE") == 3
    assert states.count("FAIL") == 1 and "RUNNING" not in states
    failed = next(t for t in study.trials if t.state == TrialState.FAIL)
    retry = next(t for t in study.trials if t.user_attrs.get("retry_of") == failed.number)
    assert retry.state == TrialState.COMPLETE and retry.params == failed.params
    _, runs = _runs(workdir)
    finals = [r for r in runs if r.data.tags.get("robustbench.final") == "true"]
    assert sorted(r.data.tags["robustbench.seed"] for r in finals) == ["0", "1"]
    trial_runs = [r for r in runs if r.data.tags["robustbench.kind"] == "trial"]
    # the killed trial's run was resumed by its retry (same settings), not duplicated
    assert len(trial_runs) == 3
    assert all(r.info.status == "FINISHED" for r in trial_runs)


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_optuna_heartbeat_misses_a_dead_ask_tell_trial(tmp_path: Path) -> None:
    """Why `recover_dead_trials` is hand-written (tuning.py's docstring): Optuna fails a stale
    trial only if a heartbeat was recorded, which `Study.optimize` does and ask/tell does not."""
    storage = optuna.storages.RDBStorage(
        f"sqlite:///{tmp_path / 'heartbeat.db'}",
        heartbeat_interval=1,
        grace_period=1,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(),
    )
    study = optuna.create_study(storage=storage)
    space = {"x": FloatDistribution(0, 1)}
    with pytest.warns(UserWarning, match="supposed to be used with Study.optimize"):
        asked, beating = study.ask(space), study.ask(space)
    beating.set_user_attr("pid", 1)
    storage.record_heartbeat(beating._trial_id)  # what Study.optimize's heartbeat thread does
    time.sleep(2.2)  # both workers die: silent for longer than the grace period
    optuna.storages.fail_stale_trials(study)
    assert [t.state for t in study.trials] == [
        TrialState.RUNNING,  # the ask/tell trial: never failed, the study never finishes
        TrialState.FAIL,
        TrialState.WAITING,
    ]
    asked.set_user_attr("started", time.time() - 60)
    assert recover_dead_trials(study, stale_after=30) == 1  # the project's check fails it
    assert study.trials[0].state == TrialState.FAIL
    with pytest.warns(UserWarning, match="supposed to be used with Study.optimize"):
        retry, own_retry = study.ask(space), study.ask(space)
    assert (retry.params, own_retry.params) == (beating.params, asked.params)
    assert retry.user_attrs == {"pid": 1}  # a started retry that carries its dead worker's pid


def test_sweep_skips_pairs_the_regime_does_not_allow(workdir: Path, capsys) -> None:
    code = main(
        [
            "sweep",
            "--methods",
            "erm",
            "groupdro",
            "--datasets",
            "synthetic",
            "--regimes",
            "full",
            "val-only",
            "--trials",
            "2",
            "--n-seeds",
            "1",
            "--steps",
            "20",
            "--eval-every",
            "10",
            "--no-prune",
            "--quiet",
            "--workdir",
            str(workdir),
            "--data",
            "n=200",
            "dim=20",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "skipped groupdro synthetic val-only: method 'groupdro' needs training group" in out
    assert "skipped erm synthetic full: it reads no training group labels" in out
    names = optuna.get_all_study_names(f"sqlite:///{workdir / 'optuna.db'}")
    assert sorted(".".join(name.split(".")[:3]) for name in names) == [
        "erm.synthetic.val-only",
        "groupdro.synthetic.full",
    ]


def test_tune_refuses_a_method_in_a_regime_without_its_labels(workdir: Path, capsys) -> None:
    code = main(
        [
            "tune",
            "--method",
            "groupdro",
            "--dataset",
            "synthetic",
            "--regime",
            "none",
            "--workdir",
            str(workdir),
        ]
    )
    assert code == 2
    assert "without them use 'xrm'" in capsys.readouterr().err


POSTGRES_URL = os.environ.get("ROBUSTBENCH_TEST_POSTGRES_URL")


def _postgres_reason() -> str | None:
    if not POSTGRES_URL:
        return "no PostgreSQL server: set ROBUSTBENCH_TEST_POSTGRES_URL (.ci/run starts one)"
    try:
        import psycopg

        psycopg.connect(POSTGRES_URL.replace("postgresql+psycopg", "postgresql")).close()
    except Exception as error:  # the reason is shown in the test report
        return f"PostgreSQL at {POSTGRES_URL} unreachable: {error}"
    return None


@pytest.mark.skipif(_postgres_reason() is not None, reason=str(_postgres_reason()))
@pytest.mark.parametrize(("workers", "parallel"), [(4, 1), (2, 3)])
def test_workers_on_a_postgresql_study(workdir: Path, workers: int, parallel: int) -> None:
    """Workers share one PostgreSQL study, alone or each training stacks of trials: exactly
    the 8 trials asked for finish."""
    storage = POSTGRES_URL
    name_prefix = "erm.synthetic.val-only.steps40."
    for name in optuna.get_all_study_names(storage):
        if name.startswith(name_prefix):
            optuna.delete_study(study_name=name, storage=storage)
    spec = _spec(
        workdir, trials=8, seeds=1, workers=workers, parallel_trials=parallel, storage=storage
    )
    tune(spec, log=lambda line: None)
    (name,) = [n for n in optuna.get_all_study_names(storage) if n.startswith(name_prefix)]
    study = optuna.load_study(study_name=name, storage=storage)
    assert _states(study) == ["COMPLETE"] * 8
    ran = [t for t in study.trials if not t.user_attrs.get("surplus")]
    assert len({t.number for t in ran}) == 8
    assert len({t.user_attrs["pid"] for t in ran}) >= 2


def test_a_batch_asks_only_for_the_free_slots_and_gives_up_those_taken_meanwhile(monkeypatch):
    """Trials are asked while the study has free slots; a trial that other workers' trials
    pushed past the target meanwhile is told failed (tagged surplus), the earlier ones run."""
    space = {"x": FloatDistribution(0.0, 1.0)}
    quiet = optuna.create_study()
    quiet.tell(quiet.ask(), 0.5)
    assert [t.number for t in tuning._ask_batch(quiet, space, size=5, target=3)] == [1, 2]

    study = optuna.create_study()
    study.ask()  # another worker's running trial
    ask = tuning.ask_trial

    def racing(study, space):
        study.ask()  # another worker asks at the same moment
        return ask(study, space)

    monkeypatch.setattr(tuning, "ask_trial", racing)
    trials = tuning._ask_batch(study, space, size=3, target=3)
    assert [t.number for t in trials] == [2]
    surplus = study.trials[4]
    assert surplus.state == TrialState.FAIL and surplus.user_attrs["surplus"]


def test_a_workers_trials_and_seed_runs_load_the_dataset_once(make_workdir, monkeypatch) -> None:
    """Each split is drawn once by the worker's trials and once by the seed runs, not once per
    run, and every run's numbers are those of runs that load the data themselves."""
    synthetic = DATASETS.get("synthetic")
    drawn = []
    real_load = synthetic.load_split

    def load_split(self, split):
        drawn.append(split)
        return real_load(self, split)

    def metrics(workdir):
        _, runs = _runs(workdir)
        return sorted(
            (r.data.tags["robustbench.kind"], r.data.tags.get("robustbench.trial", ""), key, value)
            for r in runs
            for key, value in r.data.metrics.items()
            if not key.startswith("history/")
        )

    monkeypatch.setattr(synthetic, "load_split", load_split)
    pooled = make_workdir("pooled")
    tune(_spec(pooled), log=lambda line: None)
    assert sorted(drawn) == sorted(["test", "train", "val"] * 2)
    drawn.clear()
    monkeypatch.setattr(tuning, "dataset_pool", contextlib.nullcontext)
    separate = make_workdir("separate")
    tune(_spec(separate), log=lambda line: None)
    # Each of the 4 trials and the one new seed run (seed 0 is the best trial's run) drew its own.
    assert len(drawn) == 5 * 3
    assert metrics(pooled) == metrics(separate)


def test_a_dataset_pool_shares_datasets_of_the_same_data_only() -> None:
    from robustbench_mat.runner import RunSpec, dataset_pool, plan

    def dataset(**data):
        spec = RunSpec(method="erm", dataset="synthetic", data_params={**TINY, **data})
        return plan(spec).dataset

    assert dataset() is not dataset()
    with dataset_pool():
        first = dataset()
        assert dataset() is first
        assert dataset(noise_std=0.1) is not first
        with dataset_pool():
            assert dataset() is first
    assert dataset() is not first
