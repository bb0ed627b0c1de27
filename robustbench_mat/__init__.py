"""robustbench-mat: a benchmark harness for group-robust training under subpopulation shift.

The public API for plugin authors:

- `register_method`, `Method`, `Batch`, `HParam` to write a method;
- `register_dataset`, `BenchmarkDataset`, `SplitArrays`, `EvalGroups` to write a dataset;
- `robustbench_mat.runner.RunSpec` and `robustbench_mat.runner.run` to start a run from Python.
"""

import os

# Idle OpenMP threads sleep instead of spinning: on small machines spinning threads made CPU
# training up to 50x slower. Effective only when set before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from robustbench_mat.data import BenchmarkDataset, EvalGroups, SplitArrays  # noqa: E402
from robustbench_mat.hparams import HParam  # noqa: E402
from robustbench_mat.method import Batch, Method  # noqa: E402
from robustbench_mat.registry import register_dataset, register_method  # noqa: E402

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
