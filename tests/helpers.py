"""Small helpers shared by the test modules."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path


def pip_install_offline(source: Path, target: Path) -> None:
    """`pip install --target target source` without dependencies or the network."""
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
        + ["--no-index", "--target", str(target), str(source)],
        check=True,
        capture_output=True,
        text=True,
    )


def run_dirs(workdir: Path) -> list[Path]:
    return sorted(p for p in (workdir / "runs").glob("*") if p.is_dir())


def only_run_dir(workdir: Path) -> Path:
    dirs = run_dirs(workdir)
    assert len(dirs) == 1, dirs
    return dirs[0]


def stored_result(workdir: Path) -> dict:
    return json.loads((only_run_dir(workdir) / "result.json").read_text())


class StageContext:
    """A stand-in for `RunContext` for unit tests of two-stage methods: `train_stage` trains on
    the shared loop (no checkpoint, no tracking) and records each stage's initial state."""

    def __init__(self, run_dir: Path, steps: int) -> None:
        from types import SimpleNamespace

        import torch

        self.run_dir, self.run_id = Path(run_dir), "test"
        self.settings = SimpleNamespace(steps=steps)
        self.plan = SimpleNamespace(device=torch.device("cpu"), steps=steps)
        self.tracker = SimpleNamespace(
            log_artifact=lambda *a, **k: None, log_metrics=lambda *a, **k: None
        )
        self.stages: list[tuple[str, dict, int]] = []

    def train_stage(self, name, method, steps, eval_every=None):
        from robustbench_mat.training import LoopSettings, train

        initial = {k: v.detach().clone() for k, v in method.state_dict().items()}
        self.stages.append((name, initial, steps))
        settings = LoopSettings(
            steps=steps,
            eval_every=steps,
            seed=0,
            device=self.plan.device,
            criterion="val_wga",
            train_groups_visible=False,
            show_progress=False,
        )
        return train(method, method.dataset, settings)


def run_tiny(workdir: Path, method: str, **overrides):
    """Run `method` end to end on a tiny synthetic task; assert its MLflow run FINISHED."""
    import mlflow

    from robustbench_mat.runner import RunSpec, run

    spec = dict(
        method=method,
        dataset="synthetic",
        seed=0,
        steps=20,
        eval_every=10,
        data_params={"n": 200, "dim": 20},
        workdir=workdir,
        show_progress=False,
    )
    spec.update(overrides)
    result = run(RunSpec(**spec))
    client = mlflow.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    assert client.get_run(result.run_id).info.status == "FINISHED"
    return result


@contextlib.contextmanager
def registered(registry, name: str, cls: type) -> Iterator[str]:
    """`cls` registered in `registry` (METHODS or DATASETS) as `name` for the block's duration."""
    registry.discover()
    registry.register(name)(cls)
    try:
        yield name
    finally:
        registry._plugins.pop(name)
