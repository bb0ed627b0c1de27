"""Tuning workers share the machine's GPUs: worker i runs on GPU devices[i % len(devices)]."""

from __future__ import annotations

import pytest
import torch

from robustbench_mat import tuning
from robustbench_mat.cli import build_parser
from robustbench_mat.errors import UserError
from robustbench_mat.tuning import TuneSpec, worker_device


def _spec(**fields) -> TuneSpec:
    return TuneSpec(method="erm", dataset="synthetic", **fields)


def test_workers_take_the_visible_gpus_in_turn() -> None:
    spec = _spec(workers=5)
    assert [worker_device(spec, i, 2) for i in range(5)] == [
        "cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"
    ]  # fmt: skip
    chosen = _spec(workers=3, devices=[1, 3], device="cuda")
    assert [worker_device(chosen, i, 4) for i in range(3)] == ["cuda:1", "cuda:3", "cuda:1"]


def test_cpu_and_pinned_devices_are_left_alone() -> None:
    assert worker_device(_spec(device="cpu"), 1, 4) == "cpu"
    assert worker_device(_spec(device="cuda:2"), 1, 4) == "cuda:2"
    assert worker_device(_spec(), 3, 0) == "auto"  # no GPU: the CPU, as `auto` says


def test_a_gpu_that_is_not_visible_is_refused() -> None:
    with pytest.raises(UserError, match=r"--devices 0,2: GPU\(s\) \[2\] not visible here"):
        worker_device(_spec(devices=[0, 2]), 0, 2)


def test_each_worker_process_runs_on_its_gpu(monkeypatch) -> None:
    seen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(tuning, "worker_loop", lambda spec, worker, log: seen.append(spec.device))
    fields = {**_spec(workers=3).__dict__}
    for worker in range(3):
        assert tuning._worker_main(fields, worker) is None
    assert seen == ["cuda:0", "cuda:1", "cuda:0"]
    seen.clear()
    tuning._worker_main({**fields, "launcher": "slurm"}, 1)  # the job's own GPU
    assert seen == ["auto"]


def test_devices_flag_parses_a_comma_separated_list() -> None:
    parser = build_parser()
    tune = ["tune", "--method", "erm", "--dataset", "synthetic", "--devices"]
    assert parser.parse_args([*tune, "0,2"]).devices == [0, 2]
    with pytest.raises(UserError, match="comma-separated list of GPU indices"):
        parser.parse_args([*tune, "a"])
