"""How a run uses its device: mixed precision, cuDNN and TF32 switches, channels-last layout,
`torch.compile`, and deterministic kernels.

On the CPU every run trains in float32 with PyTorch's defaults, and the same seed gives the same
numbers bit for bit, resumed or not. On a CUDA GPU the defaults favour speed: bf16 autocast where
the GPU has native bf16 (Ampere and later), otherwise fp16 with loss scaling; cuDNN autotuning,
TF32 matrix products for float32 work, and channels-last memory for convolutional networks.
Those runs are reproducible only up to floating-point reordering (atomic adds in `index_add_`,
autotuned kernels); `deterministic` asks PyTorch for deterministic kernels instead (and turns
autotuning off), which fails loudly on an operation that has none.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from robustbench_mat.errors import UserError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
# cuBLAS needs this workspace setting for deterministic results (PyTorch's reproducibility notes).
CUBLAS_WORKSPACE = ":4096:8"


@dataclass(frozen=True)
class Acceleration:
    """A run's device settings, resolved: what the loop applies and the run records."""

    precision: str = "fp32"  # bf16 | fp16 | fp32: the autocast dtype of forward and loss
    compile: bool = False
    deterministic: bool = False

    def params(self, device: torch.device) -> dict[str, object]:
        """The run params that say how the device was used."""
        cuda = device.type == "cuda"
        return {
            "precision": self.precision,
            "compile": self.compile,
            "deterministic": self.deterministic,
            "cudnn_benchmark": cuda and not self.deterministic,
            "tf32": cuda,
            "channels_last": cuda,
        }


def resolve_precision(name: str, device: torch.device) -> str:
    """The precision a run on `device` trains in: `auto` is fp32 on the CPU, bf16 on a GPU with
    native bf16 and fp16 (with loss scaling) on an older one; an explicit choice the device
    cannot honour is refused."""
    if name not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    if device.type != "cuda":
        if name in ("auto", "fp32"):
            return "fp32"
        raise UserError(
            f"--precision {name}: mixed precision is for CUDA GPUs; on the {device.type} runs "
            "train in fp32 (use --precision auto or fp32)"
        )
    native_bf16 = torch.cuda.is_bf16_supported()
    if name == "auto":
        return "bf16" if native_bf16 else "fp16"
    if name == "bf16" and not native_bf16:
        raise UserError(
            f"--precision bf16: {torch.cuda.get_device_name(device)} has no native bf16; use "
            "--precision fp16 (with loss scaling) or fp32"
        )
    return name


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of forward passes and losses (none in fp32 or on the CPU)."""
    if device.type == "cuda" and precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """A loss scaler for fp16 training on a GPU (fp16 gradients underflow without one)."""
    if device.type == "cuda" and precision == "fp16":
        return torch.amp.GradScaler("cuda")
    return None


@contextlib.contextmanager
def backends(device: torch.device, deterministic: bool) -> Iterator[None]:
    """Set cuDNN autotuning, TF32 and deterministic kernels for a run; restore them after."""
    saved = (
        torch.backends.cudnn.benchmark,
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.are_deterministic_algorithms_enabled(),
        os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    )
    cuda = device.type == "cuda"
    try:
        if deterministic:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
            torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = cuda and not deterministic
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        yield
    finally:
        benchmark, matmul_tf32, cudnn_tf32, was_deterministic, workspace = saved
        torch.backends.cudnn.benchmark = benchmark
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
        torch.backends.cudnn.allow_tf32 = cudnn_tf32
        torch.use_deterministic_algorithms(was_deterministic)
        if workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = workspace


def prepare_networks(method: nn.Module, device: torch.device, compile_it: bool) -> None:
    """Channels-last memory for convolutional networks on a GPU (faster convolutions on tensor
    cores), and `torch.compile` of the method's network(s) in `model` when asked (in place, so
    state-dict keys and checkpoints are unchanged)."""
    if device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in method.modules()):
        method.to(memory_format=torch.channels_last)
    if compile_it:
        model = method.model
        for network in model if isinstance(model, nn.ModuleList) else [model]:
            network.compile()
