"""robustbench-mat: a benchmark harness for group-robust training under subpopulation shift.

The public API for plugin authors:

- `register_method`, `Method`, `Batch`, `HParam` to write a method;
- `register_dataset`, `BenchmarkDataset`, `SplitArrays`, `EvalGroups` to write a dataset;
- `robustbench_mat.runner.RunSpec` and `robustbench_mat.runner.run` to start a run from Python.
"""

import os
import sys

# Idle OpenMP threads sleep instead of spinning: on small machines spinning threads made CPU
# training up to 50x slower. Effective only when set before torch is first imported.
_policy = os.environ.get("OMP_WAIT_POLICY") or ("" if "torch" in sys.modules else "PASSIVE")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Whether this process's idle OpenMP threads sleep (then waking them costs more than a small
# operation gains: see `hardware.step_threads`).
SLEEPING_THREADS = _policy.upper() == "PASSIVE"

from typing import TYPE_CHECKING, Any  # noqa: E402

if TYPE_CHECKING:
    from robustbench_mat.data import BenchmarkDataset, EvalGroups, SplitArrays
    from robustbench_mat.hparams import HParam
    from robustbench_mat.method import Batch, Method
    from robustbench_mat.registry import register_dataset, register_method

# The public names are imported on first use (PEP 562), so that importing the package, and with
# it the command line, does not import torch: `robustbench-mat --help` starts in a blink.
_LAZY = {
    "Batch": "robustbench_mat.method",
    "BenchmarkDataset": "robustbench_mat.data",
    "EvalGroups": "robustbench_mat.data",
    "HParam": "robustbench_mat.hparams",
    "Method": "robustbench_mat.method",
    "SplitArrays": "robustbench_mat.data",
    "register_dataset": "robustbench_mat.registry",
    "register_method": "robustbench_mat.registry",
}

__all__ = [
    "Batch",
    "BenchmarkDataset",
    "EvalGroups",
    "HParam",
    "Method",
    "SplitArrays",
    "register_dataset",
    "register_method",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
