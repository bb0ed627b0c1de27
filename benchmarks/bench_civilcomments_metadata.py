"""Peak memory and time of converting and loading a CivilComments-sized metadata table.

Synthesises an `all_data_with_identities.csv` of about 448k comments (the WILDS v1.0 split
sizes 269,038 / 45,180 / 133,782, short texts, the identity columns and a few unused ones) in a
temporary folder, then, each in a fresh process so that peaks do not mix:

1. converts it (`prepare civilcomments`: the coarse metadata and text tables),
2. loads the three splits' metadata, labels, eval groups and tokens as a run does (twice:
   the first load tokenises every comment and caches the tokens, the second reads them).

Peak memory is the process's maximum resident set size (`resource.getrusage`), reported with
the baseline of a process that only imported the package.

    python benchmarks/bench_civilcomments_metadata.py [--scale 1.0]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPLITS = {"train": 269_038, "val": 45_180, "test": 133_782}

STEP = r"""
import json, resource, sys, time
from pathlib import Path
import robustbench_mat.datasets.civilcomments as cc
from robustbench_mat.download import prepare_dataset
data, action = Path(sys.argv[1]), sys.argv[2]
start = time.perf_counter()
rows = None
if action == "convert":
    prepare_dataset(cc.CivilComments, data, show_progress=False)
elif action == "load":
    dataset = cc.CivilComments(data, backbone="minilm")
    rows = {s: len(dataset.split(s)) for s in ("train", "val", "test")}
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": seconds, "peak_mib": peak, "rows": rows}))
"""


def synthesise(path: Path, scale: float) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from upstream_fixtures import civilcomments_frame

    splits = {name: round(n * scale) for name, n in SPLITS.items()}
    frame = civilcomments_frame(splits)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path)
    return len(frame)


def step(data: Path, action: str) -> dict:
    output = subprocess.run(
        [sys.executable, "-c", STEP, str(data), action], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the real size")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        source = data / "civilcomments" / "all_data_with_identities.csv"
        start = time.perf_counter()
        n = synthesise(source, args.scale)
        print(
            f"synthesised {n} comments ({source.stat().st_size / 2**20:.0f} MiB) in "
            f"{time.perf_counter() - start:.1f} s"
        )
        baseline = step(data, "import")
        convert = step(data, "convert")
        metadata = data / "civilcomments" / "metadata_civilcomments_coarse.csv"
        load = step(data, "load")
        cached = step(data, "load")
        print(f"baseline (import only): peak {baseline['peak_mib']:.0f} MiB")
        print(
            f"convert: {convert['seconds']:.1f} s, peak {convert['peak_mib']:.0f} MiB; metadata "
            f"{metadata.stat().st_size / 2**20:.1f} MiB"
        )
        print(
            f"load:    {load['seconds']:.1f} s, peak {load['peak_mib']:.0f} MiB, "
            f"rows {load['rows']} (first load: tokenises every comment once)"
        )
        print(
            f"load:    {cached['seconds']:.1f} s, peak {cached['peak_mib']:.0f} MiB "
            "(the tokens read from their cache)"
        )


if __name__ == "__main__":
    main()
