"""The group-inference phase's own settings: steps, dataset parameters and one seed for all."""

from __future__ import annotations

import json

import pytest
from helpers import run_dirs

from robustbench_mat.errors import UserError
from robustbench_mat.runner import RunSpec, plan, run


def spec(workdir, **overrides) -> RunSpec:
    settings = dict(
        method="mat",
        dataset="synthetic",
        steps=20,
        eval_every=10,
        data_params={"n": 200, "dim": 20},
        workdir=workdir,
        show_progress=False,
        inference_steps=30,
    )
    settings.update(overrides)
    return RunSpec(**settings)


def inference_results(workdir) -> list[dict]:
    return [
        json.loads((d / "result.json").read_text())
        for d in run_dirs(workdir)
        if d.name.startswith("synthetic-xrm-infer")
    ]


def test_infer_steps_sets_the_inference_budget_and_is_announced(workdir, capsys):
    run(spec(workdir, show_progress=True))
    (inference,) = inference_results(workdir)
    assert inference["final"]["step"] == 30
    assert "running xrm-infer on synthetic for 30 steps" in capsys.readouterr().out


def test_one_inference_seed_serves_every_seed(workdir):
    first = run(spec(workdir, seed=1, inference_seed=0))
    second = run(spec(workdir, seed=2, inference_seed=0))
    (inference,) = inference_results(workdir)
    assert inference["seed"] == 0
    assert first.selected != second.selected  # still two MAT seeds
    the_plan = plan(spec(workdir, seed=2, inference_seed=0))
    assert the_plan.params()["inference.seed"] == 0


def test_without_an_inference_seed_each_seed_infers_its_own(workdir):
    run(spec(workdir, seed=1))
    run(spec(workdir, seed=2))
    assert sorted(r["seed"] for r in inference_results(workdir)) == [1, 2]
    assert plan(spec(workdir, seed=2)).params()["inference.seed"] == 2


def test_infer_data_sets_the_inference_dataset_parameters(workdir):
    base = plan(spec(workdir))
    other = plan(spec(workdir, inference_data={"noise_std": "0"}))
    assert base.key != other.key
    run(spec(workdir, inference_data={"noise_std": "0"}))
    (directory,) = [d for d in run_dirs(workdir) if d.name.startswith("synthetic-xrm-infer")]
    params = plan(
        RunSpec(
            method="xrm-infer",
            dataset="synthetic",
            regime="none",
            steps=30,
            data_params={"n": 200, "dim": 20, "noise_std": "0"},
            workdir=workdir,
        )
    )
    assert directory == params.run_dir


@pytest.mark.parametrize(
    "setting",
    [{"inference_steps": 5}, {"inference_seed": 0}, {"inference_data": {"noise_std": "0"}}],
)
def test_inference_settings_are_refused_where_nothing_is_inferred(workdir, setting):
    with pytest.raises(UserError, match="infers none"):
        plan(spec(workdir, method="erm", **{"inference_steps": None, **setting}))


def test_the_flags_reach_the_inference_run(workdir, capsys):
    from robustbench_mat.cli import main

    command = ["run", "--method", "mat", "--dataset", "synthetic", "--workdir", str(workdir)]
    command += ["--steps", "20", "--seed", "3", "--data", "n=200", "dim=20"]
    command += ["--infer-steps", "30", "--infer-seed", "0", "--infer-set", "zero_init_head=true"]
    command += ["--infer-data", "noise_std=0.5"]
    assert main(command) == 0
    assert "running xrm-infer on synthetic for 30 steps (seed 0" in capsys.readouterr().out
    (inference,) = inference_results(workdir)
    assert inference["seed"] == 0 and inference["final"]["step"] == 30
    assert inference["hparams"]["zero_init_head"] is True


def test_the_flags_are_refused_in_one_line_where_nothing_is_inferred(workdir, capsys):
    from robustbench_mat.cli import main

    command = ["run", "--method", "erm", "--dataset", "synthetic", "--workdir", str(workdir)]
    assert main(command + ["--infer-steps", "5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("robustbench-mat: error: ") and err.count("\n") == 1
    assert "infers none" in err
