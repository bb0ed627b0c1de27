"""Small helpers shared by the test modules."""

from __future__ import annotations

import json
from pathlib import Path


def run_dirs(workdir: Path) -> list[Path]:
    return sorted(p for p in (workdir / "runs").glob("*") if p.is_dir())


def only_run_dir(workdir: Path) -> Path:
    dirs = run_dirs(workdir)
    assert len(dirs) == 1, dirs
    return dirs[0]


def stored_result(workdir: Path) -> dict:
    return json.loads((only_run_dir(workdir) / "result.json").read_text())
