"""SubpopBench's loss methods trained as one stack equal the same runs trained one at a time."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from robustbench_mat import training
from robustbench_mat.runner import RunSpec, run, run_many

TOLERANCE = 1e-5
# Or a few float32 steps of the value: a diverging run's loss of 267 is held to 3e-5 in float32.
RELATIVE = 1e-6
SETTINGS = {  # settings of the method's own, per stacked model (None: the defaults)
    "reweight": None,
    "sqrtreweight": None,
    "cbloss": {"beta": [0.99, 0.999, 0.9999]},
    "focal": {"gamma": [0.5, 1.0, 2.0]},
    "ldam": {"max_m": [0.1, 0.3, 0.5], "scale": [10.0, 30.0, 10.0]},
    "ldam-drw": {"max_m": [0.1, 0.3, 0.5], "drw": [True] * 3, "drw_start": [0.5] * 3},
    "bsoftmax": None,
    "cvardro": {"alpha": [0.05, 0.25, 1.0]},
}


def _specs(workdir, case: str) -> list[RunSpec]:
    specs = []
    for k in range(3):
        hparams = {
            "lr": [3e-3, 1e-2, 3e-2][k],
            "weight_decay": [0.0, 1e-4, 1e-3][k],
            "momentum": [0.0, 0.5, 0.9][k],
            "batch_size": 32,
        }
        for name, values in (SETTINGS[case] or {}).items():
            hparams[name] = values[k]
        specs.append(
            RunSpec(
                method=case.split("-")[0],
                dataset="synthetic",
                seed=[0, 1, 0][k],
                steps=20,
                eval_every=10,
                data_params={"n": 200, "dim": 20},
                hparams=hparams,
                workdir=workdir,
                show_progress=False,
                device="cpu",
            )
        )
    return specs


def _history(result, workdir) -> list[dict]:
    [path] = (workdir / "runs").glob(f"*-{result.run_key}/history.csv")
    return pd.read_csv(path).to_dict("records")


SLOW = {"reweight", "sqrtreweight", "ldam"}  # the same code paths as cbloss and ldam-drw


@pytest.mark.parametrize(
    "case",
    [pytest.param(case, marks=[pytest.mark.slow] if case in SLOW else []) for case in SETTINGS],
)
def test_stacked_runs_equal_runs_trained_alone(tmp_path, monkeypatch, case: str) -> None:
    stacks: list[int] = []
    grouped = training._stacks

    def record(models):
        groups = grouped(models)
        stacks.extend(len(group) for group in groups)
        return groups

    monkeypatch.setattr(training, "_stacks", record)
    alone_dir, stacked_dir = tmp_path / "alone", tmp_path / "stacked"
    alone = [run(spec) for spec in _specs(alone_dir, case)]
    stacked = run_many(_specs(stacked_dir, case))
    assert 3 in stacks
    for one, other in zip(alone, stacked, strict=True):
        assert not isinstance(other, BaseException), other
        assert one.selected_step == other.selected_step
        mine, theirs = _history(one, alone_dir), _history(other, stacked_dir)
        for record_, twin in zip(mine, theirs, strict=True):
            for key, value in record_.items():
                assert math.isclose(value, twin[key], rel_tol=RELATIVE, abs_tol=TOLERANCE), (
                    key,
                    value,
                    twin[key],
                )
