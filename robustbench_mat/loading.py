"""How on-disk inputs reach the device: DataLoader worker processes, pinned memory, and evaluation
loaders whose workers stay alive between evaluations.

Images are decoded in the loader; one process decodes and resizes about 350 (Waterbirds) to 800
(CelebA) images/s, far below what a GPU trains on, so a run on CUDA reads with worker processes
by default (the machine's cores per visible GPU, at most 8) into pinned memory. On the CPU the
default is 0 workers: the training process already uses every core. Inputs held in memory
(cached features, tokenised texts, the synthetic tasks) never go through a loader. A dataset
whose items need a last step per batch (images: uint8 to normalised floats, `batch_transform`)
gets it once the batch has arrived on the run's device: a quarter of the bytes travel from the
workers and to the GPU, and the normalisation is one vectorised pass over the batch (on the CPU
too, where the workers' float batches cost more to send than the pass). Every pass that reads a
split goes through here: training steps, evaluations, group inference, the stages of two-stage
methods and feature extraction. Workers change no number: the transforms are deterministic and
the batch order is the schedule's.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from robustbench_mat.errors import UserError

MAX_AUTO_WORKERS = 8
PREFETCH_BATCHES = 4  # per worker: enough to ride out one slow image

BatchTransform = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Loading:
    """How a run's loaders read on-disk inputs: `workers` processes (0: in the run's process);
    for a `gpu` run, into pinned host memory."""

    workers: int = 0
    gpu: bool = False

    def loader(
        self, dataset: torch.utils.data.Dataset, **options: Any
    ) -> torch.utils.data.DataLoader:
        """A DataLoader over `dataset` with these settings; `options` are the DataLoader's own
        (batch_size, batch_sampler, persistent_workers, ...)."""
        if self.workers:
            options.setdefault("prefetch_factor", PREFETCH_BATCHES)
        else:
            options.pop("persistent_workers", None)
        return torch.utils.data.DataLoader(
            dataset, num_workers=self.workers, pin_memory=self.gpu, **options
        )


def batch_transform(inputs: Any) -> BatchTransform | None:
    """The last step that a batch of `inputs`' items needs (`batch_transform` of the dataset,
    through subsets), or None."""
    while isinstance(inputs, torch.utils.data.Subset):
        inputs = inputs.dataset
    if isinstance(inputs, torch.Tensor):
        return None
    return getattr(inputs, "batch_transform", None)


def finish_batch(inputs: Any, x: torch.Tensor) -> torch.Tensor:
    """A batch `x` of `inputs`' items, where it now is (the run's device), as the model takes
    it: the dataset's batch transform applied, if it has one."""
    transform = batch_transform(inputs)
    return x if transform is None else transform(x)


def available_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_loading(workers: int | str | None, device: torch.device) -> Loading:
    """A run's loader settings: `workers` None or "auto" is the machine's cores per visible GPU
    (at most 8) on CUDA and 0 on the CPU."""
    cuda = device.type == "cuda"
    if workers is None or workers == "auto":
        if not cuda:
            return Loading(0, False)
        gpus = max(1, torch.cuda.device_count())
        return Loading(max(1, min(MAX_AUTO_WORKERS, available_cores() // gpus)), True)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise UserError(
            f"--loader-workers must be auto or an integer of 0 or more, got {workers!r}"
        )
    return Loading(workers, cuda)
