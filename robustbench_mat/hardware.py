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

import robustbench_mat
from robustbench_mat.errors import UserError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
# A CPU training step of at most this many multiply-adds (batch rows x trained parameters of
# linear networks) runs on one thread. Measured on a 2-core VM, one thread against two: a
# 2048-d linear head's SGD step at batch 250 took 0.63 against 1.07 ms, 16 stacked heads'
# 2.0 against 3.1 ms, a full batch of 900 x 1800 0.92 against 1.35 ms; a full batch of
# 4795 x 2048 (2e7) was even, and 1e8 multiply-adds or more ran 1.4-1.7x faster on two threads.
# Waking sleeping OpenMP threads (OMP_WAIT_POLICY=PASSIVE, the package's default) costs more
# than small operations gain; where threads spin (torch imported first, with no policy set), two
# threads ran the full batch of 900 x 1800 faster (0.8 against 1.0 ms), and the rule is off.
SMALL_STEP = 2**25
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


def step_threads(device: torch.device, multiply_adds: int | None) -> int:
    """Intra-op threads for a training step: one for a small step on the CPU (`SMALL_STEP`)
    where idle threads sleep, otherwise torch's current count. `multiply_adds` is None where it
    cannot be estimated."""
    current = torch.get_num_threads()
    if device.type != "cpu" or multiply_adds is None or multiply_adds > SMALL_STEP:
        return current
    return 1 if robustbench_mat.SLEEPING_THREADS else current


@contextlib.contextmanager
def intra_op_threads(threads: int) -> Iterator[None]:
    """Run the block with `threads` intra-op threads, then restore the count."""
    previous = torch.get_num_threads()
    if threads == previous:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


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
