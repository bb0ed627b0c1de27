"""A regular `pip install .` puts methods/ and datasets/ inside robustbench_mat, nowhere else."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers import pip_install_offline

ROOT = Path(__file__).resolve().parents[1]


def test_regular_install_maps_plugins_into_the_package_namespace(tmp_path: Path) -> None:
    target = tmp_path / "site"
    pip_install_offline(ROOT, target)
    assert (target / "robustbench_mat" / "methods" / "mat.py").is_file()
    assert (target / "robustbench_mat" / "datasets" / "synthetic.py").is_file()
    assert not (target / "methods").exists() and not (target / "datasets").exists()
    probe = (
        "import importlib.util, robustbench_mat\n"
        "from robustbench_mat.registry import METHODS, DATASETS\n"
        "print(robustbench_mat.__file__)\n"
        "print(importlib.util.find_spec('methods'))\n"
        "print(' '.join(METHODS.names()), '|', ' '.join(DATASETS.names()))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run(
        [sys.executable, "-c", probe],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert out[0].startswith(str(target))
    assert out[1] == "None"
    assert "mat" in out[2].split() and "synthetic" in out[2].split()
