"""Creating a work directory's MLflow store: a copy of the cached empty store, against MLflow's
migrations run in the new store (what happens where the cache folder cannot be written, and
what every new store cost before the cached copy), alternating in one process.

    python benchmarks/bench_new_store.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import robustbench_mat  # noqa: F401 (as the command line imports it)
from robustbench_mat import tracking


def created_in(folder: Path, cache: Path) -> float:
    os.environ["ROBUSTBENCH_MAT_CACHE_DIR"] = str(cache)
    start = time.perf_counter()
    tracking.ensure_store(f"sqlite:///{folder / 'mlflow.db'}", str(folder / "artifacts"))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    times: dict[str, list[float]] = {"copy": [], "migrations": []}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        (root / "a-file").write_text("")
        unwritable = root / "a-file" / "cache"  # below a file: no cache, so no copy
        first = created_in(root / "first", root / "cache")  # imports, and the cached store
        for i in range(args.repeats):
            times["copy"].append(created_in(root / f"copy-{i}", root / "cache"))
            times["migrations"].append(created_in(root / f"migrations-{i}", unwritable))
    copy, migrations = (statistics.median(times[k]) for k in ("copy", "migrations"))
    print(f"first store (MLflow's import and the cached empty store): {first:.3f} s")
    print(f"new store, median of {args.repeats}: copy {copy:.3f} s, migrations {migrations:.3f} s")
    print(f"migrations / copy: {migrations / copy:.1f}x")


if __name__ == "__main__":
    main()
