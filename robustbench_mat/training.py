"""THE training loop shared by every method.

Step based; the method's hooks decide the loss, the sampling and what happens around a step.
Evaluates every `eval_every` steps, checkpoints every `checkpoint_every` steps and resumes from
the last checkpoint; uses CUDA with bf16 autocast when present and the CPU otherwise.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import random
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from robustbench_mat.data import BatchSchedule, BenchmarkDataset, EvalGroups, GroupedSplit
from robustbench_mat.errors import RunFailed, UserError, first_line
from robustbench_mat.evaluation import (
    higher_is_better,
    inferred_group_metrics,
    is_better,
    predict,
    train_group_weights,
)
from robustbench_mat.method import Batch, Method


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present, else the CPU; `cuda` without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(
            f"--device {name}: CUDA is not available on this machine (torch "
            f"{torch.__version__}); use --device cpu or auto"
        )
    if name != "cpu" and not name.startswith("cuda"):
        raise UserError(f"--device must be auto, cpu or cuda[:N], got {name!r}")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    """The random states as plain data (tensors, ints, tuples), loadable with `weights_only`."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    keys = torch.from_numpy(keys.astype(np.int64))
    state = {
        "python": random.getstate(),
        "numpy": (kind, keys, position, has_gauss, cached_gaussian),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state(
        (kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian)
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointStore:
    """The resumable state of one training loop: the newest checkpoint and the one before it,
    each written atomically and read back as plain data only (`weights_only`: a crafted file
    cannot run code). An unreadable newest checkpoint falls back to the previous one."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.previous = self.path.with_suffix(PREVIOUS_SUFFIX)

    def load(self) -> dict[str, Any] | None:
        for path in (self.path, self.previous):
            if not path.exists():
                continue
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except Exception as error:  # truncated, corrupt, or more than plain data
                reason = first_line(error)
                fallback = "the previous one" if path == self.path else "the start"
                print(
                    f"robustbench-mat: checkpoint {path} cannot be read ({reason}); resuming "
                    f"from {fallback}",
                    file=sys.stderr,
                    flush=True,
                )
        return None

    def save(self, state: dict[str, Any]) -> None:
        """Write `state`, keeping the last checkpoint as the previous one. Serialised in memory
        first, so that a full disk raises `OSError(ENOSPC)` and leaves both files intact."""
        buffer = io.BytesIO()
        torch.save(state, buffer)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        try:
            with open(tmp, "wb") as file:
                file.write(buffer.getbuffer())
                file.flush()
                os.fsync(file.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if self.path.exists():
            os.replace(self.path, self.previous)
        os.replace(tmp, self.path)


PREVIOUS_SUFFIX = ".prev.pt"


@dataclass
class LoopSettings:
    """How long to train and how often to evaluate and checkpoint."""

    steps: int
    eval_every: int
    seed: int
    device: torch.device
    criterion: str
    train_groups_visible: bool
    checkpoint_every: int | None = None
    evaluate_train: bool = False
    show_progress: bool = True
    description: str = "training"
    num_workers: int = 0
    inferred_val_groups: EvalGroups | None = None
    stop_loss: float | None = None


@dataclass
class LoopResult:
    """Every evaluation, the selected one, and the model state at the selected step."""

    history: list[dict[str, Any]]
    selected: dict[str, Any]
    selected_state: dict[str, torch.Tensor]
    resumed_from: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _cpu_copy(state: dict[str, Any]) -> dict[str, Any]:
    """A CPU copy of a state dict. A tensor reachable under several names (a module shared by
    two attributes, as AFR's and DFR's feature views) is copied once and stays shared, so it is
    also saved once."""
    copies: dict[tuple[Any, ...], torch.Tensor] = {}
    copied: dict[str, Any] = {}
    for name, value in state.items():
        if not torch.is_tensor(value):
            copied[name] = value
            continue
        key = (
            value.device,
            value.untyped_storage().data_ptr(),
            value.storage_offset(),
            tuple(value.shape),
            value.stride(),
            value.dtype,
        )
        if key not in copies:
            copies[key] = value.detach().to("cpu", copy=True)
        copied[name] = copies[key]
    return copied


class _Indexed(torch.utils.data.Dataset):
    """An on-disk dataset whose items carry their index, so that batches know their examples."""

    def __init__(self, inputs: torch.utils.data.Dataset) -> None:
        self.inputs = inputs

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        return index, self.inputs[index]


class _Steps:
    """The batch schedule's index batches for steps [start, stop), as a DataLoader sampler."""

    def __init__(self, schedule: BatchSchedule, start: int, stop: int) -> None:
        self.schedule, self.start, self.stop = schedule, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.stop):
            yield self.schedule.indices(step).tolist()


class _Stream:
    """Each step's (indices, x, y, a) on the device, from in-memory tensors or a DataLoader."""

    def __init__(
        self, train: GroupedSplit, schedule: BatchSchedule, device: torch.device, num_workers: int
    ) -> None:
        self.train, self.schedule, self.device = train, schedule, device
        self.num_workers = num_workers
        self.y = train.y.to(device)
        self.a = train.a.to(device)
        self.x = train.inputs.to(device) if train.in_memory else None
        if schedule.full_batch and self.x is not None:
            pool = schedule.pool.to(device)
            self.full = (pool, self.x[pool], self.y[pool], self.a[pool])

    def batches(self, start: int, stop: int) -> Iterator[tuple[torch.Tensor, ...]]:
        if self.x is not None:
            for step in range(start, stop):
                if self.schedule.full_batch:
                    yield self.full
                else:
                    idx = self.schedule.indices(step).to(self.device)
                    yield idx, self.x[idx], self.y[idx], self.a[idx]
            return
        loader = torch.utils.data.DataLoader(
            _Indexed(self.train.inputs),
            batch_sampler=_Steps(self.schedule, start, stop),
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        for idx, x in loader:
            idx = idx.to(self.device)
            yield idx, x.to(self.device, non_blocking=True), self.y[idx], self.a[idx]


def train(
    method: Method,
    dataset: BenchmarkDataset,
    settings: LoopSettings,
    checkpoints: CheckpointStore | None = None,
    on_eval: Callable[[dict[str, Any]], None] | None = None,
    on_checkpoint: Callable[[], None] | None = None,
) -> LoopResult:
    """Train `method` on `dataset` for `settings.steps` steps, resuming from `checkpoints`."""
    device = settings.device
    # Re-stating the thread count pins MKL to it: left to its default, small matrix products ran
    # 20-60x slower on 2-core machines.
    torch.set_num_threads(torch.get_num_threads())
    method.to(device)
    optimizer = method.configure_optimizer()
    scheduler = method.configure_scheduler(optimizer, settings.steps)
    train_split = method.train_split()
    eval_splits = [method.eval_split(dataset.split(s)) for s in ("val", "test")]
    if settings.evaluate_train:
        eval_splits.insert(0, dataset.split("train"))
    weights = train_group_weights(dataset.split("train"))
    if method.hp.get("class_balanced") and dataset.task != "classification":
        raise UserError(f"class_balanced needs classes; {dataset.name} is a {dataset.task} task")
    schedule = BatchSchedule(
        len(train_split),
        int(method.hp["batch_size"]),
        settings.seed,
        subset=method.train_subset(train_split),
        weights=method.train_weights(train_split),
        class_labels=train_split.y if method.hp.get("class_balanced") else None,
    )
    stream = _Stream(train_split, schedule, device, settings.num_workers)

    start, history, best, best_state, stopped = 0, [], None, None, False
    loss_sum, loss_count = 0.0, 0
    state = checkpoints.load() if checkpoints else None
    if state is not None:
        method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        start, history = state["step"], state["history"]
        best, best_state = state["best"], state["best_state"]
        stopped = state.get("stopped", False)
        loss_sum, loss_count = state.get("loss_sum", 0.0), state.get("loss_count", 0)
    maximize = higher_is_better(settings.criterion)

    def evaluate(step: int, mean_loss: float | None) -> dict[str, Any]:
        method.eval()
        record: dict[str, Any] = {"step": step}
        if mean_loss is not None:
            record["train_loss"] = mean_loss
        with _autocast(device):
            for split in eval_splits:
                logits = predict(
                    method.predict,
                    split,
                    device,
                    batch_size=dataset.eval_batch_size,
                    num_workers=settings.num_workers,
                )
                record.update(dataset.metrics(split, logits, weights))
                if split.name == "val" and settings.inferred_val_groups is not None:
                    record.update(
                        inferred_group_metrics("val", logits, split.y, settings.inferred_val_groups)
                    )
        record.update(method.logged_state())
        method.train()
        return record

    def checkpoint(step: int) -> None:
        if on_checkpoint is not None:
            on_checkpoint()
        if checkpoints is not None:
            checkpoints.save(
                {
                    "step": step,
                    "method": method.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": None if scheduler is None else scheduler.state_dict(),
                    "rng": _rng_state(),
                    "history": history,
                    "best": best,
                    "best_state": best_state,
                    "stopped": stopped,
                    "loss_sum": loss_sum,
                    "loss_count": loss_count,
                }
            )

    def record_evaluation(step: int, mean_loss: float | None) -> None:
        nonlocal best, best_state
        record = evaluate(step, mean_loss)
        history.append(record)
        if settings.criterion not in record:
            measured = ", ".join(k for k in record if k.startswith("val_"))
            raise UserError(
                f"selection criterion {settings.criterion!r} is not measured on "
                f"{dataset.name}; measured: {measured}"
            )
        previous = None if best is None else best[settings.criterion]
        if is_better(record[settings.criterion], previous, maximize):
            best, best_state = record, _cpu_copy(method.state_dict())
        if on_eval is not None:
            on_eval(record)
        shown = dict.fromkeys(("val_wga", settings.criterion))
        postfix = {"loss": f"{record['train_loss']:.4g}"} if mean_loss is not None else {}
        postfix.update({k: f"{record[k]:.3f}" for k in shown if k in record})
        bar.set_postfix(postfix, refresh=False)

    checkpoint_every = settings.checkpoint_every or settings.eval_every
    show_groups = settings.train_groups_visible
    bar = tqdm(
        total=settings.steps,
        initial=start,
        desc=settings.description,
        disable=not settings.show_progress,
        dynamic_ncols=True,
        leave=True,
    )
    method.train()
    try:
        if settings.steps == 0 and best is None:  # a main loop that trains nothing (DFR)
            record_evaluation(0, None)
            checkpoint(0)
        batches = stream.batches(start, start if stopped else settings.steps)
        for step, (idx, x, y, a) in enumerate(batches, start=start + 1):
            batch = Batch(idx, x, y, a if show_groups else None, dataset.n_attributes)
            with _autocast(device):
                loss = method.loss(batch)
            value = loss.item()
            if not math.isfinite(value):
                raise RunFailed(
                    f"the loss became {value} at step {step} ({settings.description}); lower the "
                    f"learning rate (lr={method.hp['lr']}) or check the inputs"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            method.after_step(batch, step)
            loss_sum, loss_count = loss_sum + value, loss_count + 1
            bar.update(1)
            stopped = settings.stop_loss is not None and value < settings.stop_loss
            last = stopped or step == settings.steps

            if step % settings.eval_every == 0 or last:
                record_evaluation(step, loss_sum / loss_count)
                loss_sum, loss_count = 0.0, 0
            if step % checkpoint_every == 0 or last:
                checkpoint(step)
            if stopped:
                break
    finally:
        bar.close()

    if best is None:  # resumed after the last step: nothing left to evaluate
        raise RunFailed(f"{settings.description}: no evaluation was recorded")
    return LoopResult(history, best, best_state, resumed_from=start)


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
