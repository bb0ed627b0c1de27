"""Images per second that the input pipeline delivers with 0 and N loader workers.

Writes a Waterbirds-format dataset (the upstream `waterbird_complete95_forest2water2/` folder
and `metadata.csv`, prepared as `robustbench-mat prepare waterbirds` does) whose JPEGs have the
size of the real ones (CUB photographs, at most 500 px wide: 500x375 by default), then reads it
side by side, in one run, through the paths a run uses:

- training: the loop's batch stream (`training._Stream`, batches of 32 drawn by the run's batch
  schedule, the standard ResNet-50 transform), timed after its first batch so that the workers'
  start-up (reported apart) does not count;
- evaluation: `GroupedSplit.eval_loader`, whose workers persist, on its second pass.

Both include the normalisation of each batch, done where the batch arrives (the workers send
uint8 images).

No network is trained: this is the rate at which images reach the model, which bounds a GPU run
(ResNet-50 training consumes about 2,500 images/s on one A100).

    python benchmarks/bench_input_pipeline.py [--images 1024] [--workers 2] [--size 500x375]
                                              [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

import robustbench_mat  # noqa: F401  (sets the thread settings before torch starts)
from robustbench_mat.data import BatchSchedule
from robustbench_mat.datasets.waterbirds import Waterbirds
from robustbench_mat.download import prepare_dataset
from robustbench_mat.loading import Loading, finish_batch
from robustbench_mat.training import _Stream

FOLDER = "waterbird_complete95_forest2water2"


def write_waterbirds(root: Path, images: int, size: tuple[int, int]) -> None:
    """`images` photographs-like JPEGs (smooth scenes plus sensor noise, quality 90), all in
    the training split, with the upstream metadata.csv."""
    rng = np.random.default_rng(0)
    folder = root / "waterbirds" / FOLDER
    (folder / "birds").mkdir(parents=True)
    width, height = size
    ramp = np.linspace(0, 1, width)[None, :, None] * np.linspace(0, 1, height)[:, None, None]
    rows = []
    for index in range(images):
        base = rng.uniform(0, 255, size=(1, 1, 3)) * ramp + rng.uniform(0, 60, size=(1, 1, 3))
        noisy = base + rng.normal(0, 12, size=(height, width, 3))
        name = f"birds/Bird_{index:05d}.jpg"
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(folder / name, quality=90)
        rows.append((index + 1, name, index % 2, 0, (index // 2) % 2, f"places/{index}.jpg"))
    columns = ["img_id", "img_filename", "y", "split", "place", "place_filename"]
    pd.DataFrame(rows, columns=columns).to_csv(folder / "metadata.csv", index=False)
    prepare_dataset(Waterbirds, root, show_progress=False)


def training_rate(data: Path, workers: int, batch_size: int, epochs: int) -> tuple[float, float]:
    """(images/s after the first batch, seconds until the first batch) of the training stream."""
    dataset = Waterbirds(data, weights="none")
    dataset.place(torch.device("cpu"), Loading(workers))
    train = dataset.split("train")
    steps = epochs * len(train) // batch_size
    stream = _Stream(train, BatchSchedule(len(train), batch_size, seed=0), torch.device("cpu"))
    start = time.perf_counter()
    batches = stream.batches(0, steps)
    next(batches)
    first = time.perf_counter()
    count = sum(len(x) for _, x, _, _ in batches)
    return count / (time.perf_counter() - first), first - start


def evaluation_rate(data: Path, workers: int, batch_size: int) -> float:
    """Images/s of the second evaluation pass over the split (its workers already running)."""
    dataset = Waterbirds(data, weights="none")
    dataset.place(torch.device("cpu"), Loading(workers))
    split = dataset.split("train")
    for _ in split.eval_loader(batch_size):
        pass
    start = time.perf_counter()
    count = sum(len(finish_batch(split.inputs, x)) for x in split.eval_loader(batch_size))
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=2, help="N, compared with 0")
    parser.add_argument("--size", default="500x375", help="JPEG width x height")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2, help="training passes timed")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    size = tuple(int(side) for side in args.size.split("x"))
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder)
        write_waterbirds(data, args.images, size)
        measured: dict[int, list[tuple[float, float, float]]] = {0: [], args.workers: []}
        for _ in range(args.repeats):  # interleaved, so that a slow spell hits both settings
            for workers in measured:
                train_rate, startup = training_rate(data, workers, args.batch_size, args.epochs)
                eval_rate = evaluation_rate(data, workers, 4 * args.batch_size)
                measured[workers].append((train_rate, startup, eval_rate))
    rows = [
        (workers, *(statistics.median(column) for column in zip(*runs, strict=True)))
        for workers, runs in measured.items()
    ]
    print(
        f"{args.images} JPEGs of {size[0]}x{size[1]}, standard transform to 224x224, "
        f"{torch.get_num_threads()} torch threads in the main process; medians of "
        f"{args.repeats} interleaved repetitions"
    )
    print("| loader workers | training images/s | start-up (s) | evaluation images/s |")
    print("|---|---|---|---|")
    for workers, train_rate, startup, eval_rate in rows:
        print(f"| {workers} | {train_rate:.0f} | {startup:.2f} | {eval_rate:.0f} |")
    (_, base_train, _, base_eval), (_, train_rate, _, eval_rate) = rows
    print(
        f"ratio {args.workers} workers / 0: training {train_rate / base_train:.2f}x, "
        f"evaluation {eval_rate / base_eval:.2f}x"
    )


if __name__ == "__main__":
    main()
