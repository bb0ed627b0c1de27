"""`run --method mat` runs XRM then MAT in one go and beats ERM where ERM memorises."""

from __future__ import annotations

from pathlib import Path

import mlflow

from robustbench_mat.runner import RunSpec, run


def test_mat_beats_erm_worst_group_by_a_wide_margin(workdir: Path) -> None:
    common = dict(dataset="synthetic", seed=0, workdir=workdir, show_progress=False)
    erm = run(RunSpec(method="erm", **common))
    mat = run(RunSpec(method="mat", **common))
    assert mat.selected["test_wga"] >= erm.selected["test_wga"] + 0.3
    client = mlflow.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    xrm_run = client.get_run(
        client.get_run(mat.run_id).data.tags["robustbench.inferred_groups.run_id"]
    )
    assert xrm_run.data.tags["robustbench.method"] == "xrm-infer"
    assert xrm_run.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(xrm_run.info.run_id, "inferred_groups")}
    assert artifacts == {"inferred_groups/inferred_groups.pt"}


def test_inference_trials_use_the_configuration_with_the_highest_flip_rate(
    workdir: Path,
) -> None:
    spec = RunSpec(
        method="mat",
        dataset="synthetic",
        seed=0,
        workdir=workdir,
        steps=20,
        eval_every=10,
        regime="none",
        data_params={"n": 200, "dim": 40},
        inference_trials=3,
        inference_hparams={"batch_size": 0},
        show_progress=False,
    )
    mat = run(spec)
    client = mlflow.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("synthetic").experiment_id
    candidates = client.search_runs([experiment], "tags.`robustbench.kind` = 'group-inference'")
    assert len(candidates) == 3
    assert {c.data.params["batch_size"] for c in candidates} == {"0"}
    assert len({c.data.params["lr"] for c in candidates}) == 3
    best = max(c.data.metrics["flip_rate"] for c in candidates)
    chosen = client.get_run(mat.run_id).data.tags["robustbench.inferred_groups.run_id"]
    assert client.get_run(chosen).data.metrics["flip_rate"] == best
