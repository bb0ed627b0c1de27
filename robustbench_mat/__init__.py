"""robustbench-mat: a benchmark harness for group-robust training under subpopulation shift.

The public API for plugin authors:

- `register_method`, `Method`, `Batch`, `HParam` to write a method;
- `register_dataset`, `BenchmarkDataset`, `SplitArrays`, `EvalGroups` to write a dataset;
- `RunSpec` and `run` to start a run from Python.
"""

from robustbench_mat.data import BenchmarkDataset, EvalGroups, SplitArrays
from robustbench_mat.hparams import HParam
from robustbench_mat.method import Batch, Method
from robustbench_mat.registry import register_dataset, register_method

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
