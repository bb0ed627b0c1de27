"""Device settings: precision resolved per device, switches recorded, deterministic kernels on
request and restored after, CPU numbers unchanged."""

from __future__ import annotations

import pytest
import torch
from helpers import run_tiny

from robustbench_mat import hardware
from robustbench_mat.errors import UserError
from robustbench_mat.hardware import Acceleration, backends, resolve_precision
from robustbench_mat.runner import RunSpec, plan

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_precision_on_the_cpu_is_fp32_and_mixed_precision_is_refused() -> None:
    assert resolve_precision("auto", CPU) == resolve_precision("fp32", CPU) == "fp32"
    for name in ("bf16", "fp16"):
        with pytest.raises(UserError, match=f"--precision {name}: mixed precision is for CUDA"):
            resolve_precision(name, CPU)


def test_auto_precision_on_a_gpu_follows_native_bf16(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_precision("auto", CUDA) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    assert resolve_precision("auto", CUDA) == "fp16"
    assert resolve_precision("fp32", CUDA) == "fp32"
    with pytest.raises(UserError, match="Tesla V100 has no native bf16; use --precision fp16"):
        resolve_precision("bf16", CUDA)


def test_autocast_and_loss_scaling_only_where_they_apply() -> None:
    assert hardware.grad_scaler(CPU, "fp32") is None
    assert hardware.grad_scaler(CUDA, "bf16") is None  # bf16 keeps float32's exponent range
    with hardware.autocast(CPU, "fp32"):
        assert not torch.is_autocast_enabled("cpu")


def test_deterministic_kernels_are_on_inside_the_run_and_restored_after(monkeypatch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert not torch.are_deterministic_algorithms_enabled()
    with backends(CPU, deterministic=True):
        assert torch.are_deterministic_algorithms_enabled()
        assert hardware.os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert not torch.backends.cudnn.benchmark
    assert not torch.are_deterministic_algorithms_enabled()
    assert "CUBLAS_WORKSPACE_CONFIG" not in hardware.os.environ


def test_gpu_switches_are_recorded() -> None:
    assert Acceleration("bf16").params(CUDA) == {
        "precision": "bf16",
        "compile": False,
        "deterministic": False,
        "cudnn_benchmark": True,
        "tf32": True,
        "channels_last": True,
    }
    assert Acceleration("fp32", deterministic=True).params(CUDA)["cudnn_benchmark"] is False
    assert Acceleration().params(CPU)["tf32"] is False


def test_cpu_runs_keep_their_keys_and_numbers(workdir) -> None:
    spec = dict(method="erm", dataset="synthetic", data_params={"n": 50, "dim": 8}, device="cpu")
    assert plan(RunSpec(**spec)).key == plan(RunSpec(**spec, precision="fp32")).key
    assert plan(RunSpec(**spec)).key != plan(RunSpec(**spec, deterministic=True)).key
    with pytest.raises(UserError, match="--precision fp16"):
        plan(RunSpec(**spec, precision="fp16"))
    plain = run_tiny(workdir, "erm")
    deterministic = run_tiny(workdir, "erm", deterministic=True)
    assert deterministic.run_key != plain.run_key
    assert deterministic.final == plain.final  # the CPU's kernels are deterministic already


def test_a_run_records_its_device_settings(workdir) -> None:
    import mlflow

    result = run_tiny(workdir, "erm", deterministic=True)
    params = mlflow.MlflowClient(result.tracking_uri).get_run(result.run_id).data.params
    assert (params["precision"], params["deterministic"], params["compile"]) == (
        "fp32",
        "True",
        "False",
    )


def test_cached_features_are_extracted_on_the_runs_device(tmp_path, monkeypatch) -> None:
    from upstream_fixtures import write_waterbirds

    from robustbench_mat import features
    from robustbench_mat.datasets.waterbirds import Waterbirds
    from robustbench_mat.download import prepare_dataset

    write_waterbirds(tmp_path / "data" / "waterbirds")
    prepare_dataset(Waterbirds, tmp_path / "data", show_progress=False)
    devices = []
    extract = features.extract_features

    def recording(*args, device=None, **kwargs):
        devices.append(device)
        return extract(*args, device=device, **kwargs)

    monkeypatch.setattr(features, "extract_features", recording)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # `auto` would pick CUDA
    spec = RunSpec(
        method="erm",
        dataset="waterbirds",
        device="cpu",
        data_params={"features": "resnet50", "weights": "none", "image_size": 32},
        data_dir=str(tmp_path / "data"),
        workdir=tmp_path / "work",
    )
    plan(spec).dataset.split("train")
    assert devices == [CPU]


def test_a_checkpoint_keeps_only_the_run_devices_cuda_generator(monkeypatch) -> None:
    """Saved: the run's GPU's state alone (not every GPU's). Restored: onto the run's GPU; an
    older checkpoint's list of every GPU's states gives the run's own one."""
    from robustbench_mat import training

    calls = []
    monkeypatch.setattr(
        torch.cuda,
        "get_rng_state",
        lambda device: calls.append(("get", device)) or torch.tensor([7]),
    )
    monkeypatch.setattr(
        torch.cuda, "get_rng_state_all", lambda: pytest.fail("every GPU's state saved")
    )
    monkeypatch.setattr(
        torch.cuda, "set_rng_state", lambda state, device: calls.append(("set", int(state), device))
    )
    gpu = torch.device("cuda", 1)
    state = training._rng_state(gpu)
    assert calls == [("get", gpu)] and int(state["cuda"]) == 7
    assert "cuda" not in training._rng_state(torch.device("cpu"))
    training._set_rng_state(state, gpu)
    training._set_rng_state({**state, "cuda": [torch.tensor([5]), torch.tensor([6])]}, gpu)
    training._set_rng_state(state, torch.device("cpu"))  # a CUDA checkpoint resumed on the CPU
    assert calls[1:] == [("set", 7, gpu), ("set", 6, gpu)]
