"""THE training loop shared by every method.

Step based; the method's hooks decide the loss, the sampling and what happens around a step.
Evaluates every `eval_every` steps (a small linear model's evaluations in blocks of steps, each
block one vectorised pass: `_EvaluationBlock`), checkpoints every `checkpoint_every` steps and
resumes from the last checkpoint; uses CUDA with bf16 autocast when present and the CPU
otherwise.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
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
from robustbench_mat.hardware import (
    Acceleration,
    autocast,
    grad_scaler,
    intra_op_threads,
    prepare_networks,
    step_threads,
)
from robustbench_mat.loading import finish_batch
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


def _rng_state(device: torch.device) -> dict[str, Any]:
    """The random states as plain data (tensors, ints, tuples), loadable with `weights_only`;
    on CUDA only the run's own GPU's generator, so that the checkpoint resumes on a machine
    with another number of GPUs."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    keys = torch.from_numpy(keys.astype(np.int64))
    state = {
        "python": random.getstate(),
        "numpy": (kind, keys, position, has_gauss, cached_gaussian),
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    kind, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state(
        (kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian)
    )
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and device.type == "cuda":
        if isinstance(cuda, list | tuple):  # older checkpoints kept every GPU's state
            index = device.index if device.index is not None else torch.cuda.current_device()
            cuda = cuda[index] if index < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)


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
    # A checkpoint due less than this many seconds after the previous one is skipped (the last
    # step always checkpoints): small models that train in seconds need not write at every
    # evaluation. 0 writes every one.
    checkpoint_seconds: float = 0.0
    # Train on these training examples only (indices into the training split; the memorization
    # experiment's random subsets); the method's own subset, if any, is restricted to them.
    train_subset: torch.Tensor | None = None
    evaluate_train: bool = False
    show_progress: bool = True
    description: str = "training"
    inferred_val_groups: EvalGroups | None = None
    stop_loss: float | None = None
    # Save the model (state and current learning rate) every `snapshot_every` steps and at the
    # last step into `snapshot_dir` (TracIn self-influence reads them); None saves none.
    snapshot_every: int | None = None
    snapshot_dir: Path | None = None
    acceleration: Acceleration = field(default_factory=Acceleration)


@dataclass
class LoopResult:
    """Every evaluation, the selected one, and the model state at the selected step."""

    history: list[dict[str, Any]]
    selected: dict[str, Any]
    selected_state: dict[str, torch.Tensor]
    resumed_from: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def cpu_copy(state: dict[str, Any]) -> dict[str, Any]:
    """A CPU copy of a state dict (`state_copy`)."""
    return state_copy(state, torch.device("cpu"))


def state_copy(state: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A copy of a state dict on `device`. A tensor reachable under several names (a module
    shared by two attributes, as AFR's and DFR's feature views) is copied once and stays
    shared, so it is also saved once."""
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
            copies[key] = value.detach().to(device, copy=True)
        copied[name] = copies[key]
    return copied


def rows(inputs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """`inputs[indices]` for integer indices of any shape, by `index_select`: it copies whole
    rows, 3-4 times faster than advanced indexing for a batch of 2048-d features on the CPU."""
    return inputs.index_select(0, indices.flatten()).view(*indices.shape, *inputs.shape[1:])


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

    def __init__(self, train: GroupedSplit, schedule: BatchSchedule, device: torch.device) -> None:
        self.train, self.schedule, self.device = train, schedule, device
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
                    yield idx, rows(self.x, idx), self.y[idx], self.a[idx]
            return
        # One loader for the whole range: its workers read ahead across evaluations.
        loader = self.train.loading.loader(
            _Indexed(self.train.inputs), batch_sampler=_Steps(self.schedule, start, stop)
        )
        for idx, x in loader:
            idx = idx.to(self.device)
            x = finish_batch(self.train.inputs, x.to(self.device, non_blocking=True))
            yield idx, x, self.y[idx], self.a[idx]


@dataclass
class TrainingJob:
    """One model for the loop to train: its method, settings, checkpoints and callbacks.

    `on_eval` receives every evaluation record (it may raise, e.g. `RunPruned`, to stop this
    model); `on_checkpoint` is called before each checkpoint is written."""

    method: Method
    settings: LoopSettings
    checkpoints: CheckpointStore | None = None
    on_eval: Callable[[dict[str, Any]], None] | None = None
    on_checkpoint: Callable[[], None] | None = None


def train(
    method: Method,
    dataset: BenchmarkDataset,
    settings: LoopSettings,
    checkpoints: CheckpointStore | None = None,
    on_eval: Callable[[dict[str, Any]], None] | None = None,
    on_checkpoint: Callable[[], None] | None = None,
) -> LoopResult:
    """Train `method` on `dataset` for `settings.steps` steps, resuming from `checkpoints`."""
    (outcome,) = train_jobs(
        [TrainingJob(method, settings, checkpoints, on_eval, on_checkpoint)], dataset
    )
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def train_jobs(
    jobs: Sequence[TrainingJob], dataset: BenchmarkDataset | None = None
) -> list[LoopResult | Exception]:
    """Train every job on `dataset`: jobs that can share a stack (`stacking.stack_key`: same
    method and settings but for the numbers it lets vary, same budget, same resume point) train
    together in one vectorised loop, the others one at a time. Returns each job's result, or the
    exception that stopped it (a pruned, diverged or failed model stops alone). Each job trains
    on `dataset`, by default its method's own."""
    # Re-stating the thread count pins MKL to it: left to its default, small matrix products ran
    # 20-60x slower on 2-core machines.
    torch.set_num_threads(torch.get_num_threads())
    models: list[_Model] = []
    outcomes: dict[int, Exception] = {}
    for index, job in enumerate(jobs):
        try:
            models.append(_Model(index, job, dataset or job.method.dataset))
        except Exception as error:  # this job cannot start; the others still train
            if len(jobs) == 1:
                raise
            outcomes[index] = error
    for group in _stacks(models):
        try:
            try:
                _loop(group)
            except _NotVectorisable as refusal:  # found at the first step: nothing has changed
                print(
                    f"robustbench-mat: {type(group[0].method).name} models train one at a time "
                    f"here (its hooks cannot be vectorised: {refusal})",
                    file=sys.stderr,
                    flush=True,
                )
                for model in group:
                    _loop([model])
        except Exception as error:
            if len(jobs) == 1:
                raise
            for model in group:
                model.fail(error)
    for model in models:
        outcomes[model.index] = model.outcome()
    return [outcomes[index] for index in range(len(jobs))]


def _acceleration_alone(settings: LoopSettings) -> str | None:
    """Why the device settings make a model train alone, or None."""
    if settings.acceleration.precision == "fp16":
        return "fp16 trains with a loss scaler, one model at a time"
    if settings.acceleration.compile:
        return "--compile compiles each network on its own"
    return None


def _stacks(models: list[_Model]) -> list[list[_Model]]:
    """Groups of models to train together; a model that cannot be stacked is alone (and says
    so once per method when it was asked to share)."""
    from robustbench_mat.stacking import stack_key, why_not_stackable

    if len(models) < 2:
        return [[model] for model in models]
    groups: dict[Any, list[_Model]] = {}
    alone, reasons = [], {}
    for model in models:
        reason = why_not_stackable(model.method) or _acceleration_alone(model.settings)
        if reason is not None:
            alone.append([model])
            reasons.setdefault(type(model.method).name, reason)
            continue
        s = model.settings
        key = stack_key(
            model.method,
            id(model.dataset),
            s.steps,
            s.eval_every,
            s.checkpoint_every,
            s.snapshot_every,
            s.acceleration,
            str(s.device),
            s.stop_loss,
            s.evaluate_train,
            s.train_groups_visible,
            s.criterion,
            model.schedule.batch_size,
            model.start,
            model.stopped,
        )
        groups.setdefault(key, []).append(model)
    for name, reason in reasons.items():
        print(
            f"robustbench-mat: {name} models train one at a time here ({reason})",
            file=sys.stderr,
            flush=True,
        )
    return [*groups.values(), *alone]


class _Model:
    """One job's state in the loop: its optimiser, batches, history and selection."""

    def __init__(self, index: int, job: TrainingJob, dataset: BenchmarkDataset) -> None:
        self.index, self.job, self.dataset = index, job, dataset
        self.method, self.settings = job.method, job.settings
        method, settings = self.method, self.settings
        method.to(settings.device)
        prepare_networks(method, settings.device, settings.acceleration.compile)
        self.optimizer = method.configure_optimizer()
        self.scheduler = method.configure_scheduler(self.optimizer, settings.steps)
        self.train_split = method.train_split()
        self.eval_splits = [method.eval_split(dataset.split(s)) for s in ("val", "test")]
        if settings.evaluate_train:
            self.eval_splits.insert(0, dataset.split("train"))
        self.weights = train_group_weights(dataset.split("train"))
        if method.hp.get("class_balanced") and dataset.task != "classification":
            raise UserError(
                f"class_balanced needs classes; {dataset.name} is a {dataset.task} task"
            )
        subset = method.train_subset(self.train_split)
        if settings.train_subset is not None:
            kept = settings.train_subset
            subset = kept if subset is None else subset[torch.isin(subset, kept)]
        self.schedule = BatchSchedule(
            len(self.train_split),
            int(method.hp["batch_size"]),
            settings.seed,
            subset=subset,
            weights=method.train_weights(self.train_split),
            class_labels=self.train_split.y if method.hp.get("class_balanced") else None,
        )
        self.start, self.history = 0, []
        self.best: dict[str, Any] | None = None
        self.best_state: dict[str, Any] | None = None
        self.stopped, self.loss_sum, self.loss_count = False, 0.0, 0
        self.rng: dict[str, Any] | None = None
        self.error: Exception | None = None
        self.maximize = higher_is_better(settings.criterion)
        state = job.checkpoints.load() if job.checkpoints else None
        if state is not None:
            method.load_state_dict(state["method"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scheduler is not None:
                self.scheduler.load_state_dict(state["scheduler"])
            self.rng = state["rng"]
            self.start, self.history = state["step"], state["history"]
            self.best, self.best_state = state["best"], state["best_state"]
            self.stopped = state.get("stopped", False)
            self.loss_sum = state.get("loss_sum", 0.0)
            self.loss_count = state.get("loss_count", 0)

    @property
    def training(self) -> bool:
        return self.error is None and not self.stopped

    def fail(self, error: Exception) -> None:
        if self.error is None:
            self.error = error

    def outcome(self) -> LoopResult | Exception:
        if self.error is not None:
            return self.error
        if self.best is None:  # resumed after the last step: nothing left to evaluate
            return RunFailed(f"{self.settings.description}: no evaluation was recorded")
        return LoopResult(self.history, self.best, self.best_state, resumed_from=self.start)

    def add_loss(self, step: int, value: float) -> None:
        if not math.isfinite(value):
            self.fail(
                RunFailed(
                    f"the loss became {value} at step {step} ({self.settings.description}); "
                    f"lower the learning rate (lr={self.method.hp['lr']}) or check the inputs"
                )
            )
            return
        self.loss_sum, self.loss_count = self.loss_sum + value, self.loss_count + 1
        stop_loss = self.settings.stop_loss
        self.stopped = stop_loss is not None and value < stop_loss

    def evaluate(
        self,
        step: int,
        mean_loss: float | None,
        logits_of: Callable[[GroupedSplit], torch.Tensor],
        kept: KeptState | None = None,
        metrics_of: Callable[[GroupedSplit], dict[str, float]] | None = None,
    ) -> dict[str, Any]:
        """Evaluate at `step`, keep the record and the best state; calls `on_eval`. `kept` is
        the method's state and logged state at `step` when it is evaluated later (blocks);
        `metrics_of` gives each split's metrics where they were computed with other models'."""
        settings, dataset = self.settings, self.dataset
        record: dict[str, Any] = {"step": step}
        if mean_loss is not None:
            record["train_loss"] = mean_loss
        for split in self.eval_splits:
            logits = logits_of(split)
            if metrics_of is None:
                record.update(dataset.metrics(split, logits, self.weights))
            else:
                record.update(metrics_of(split))
            if split.name == "val" and settings.inferred_val_groups is not None:
                record.update(
                    inferred_group_metrics("val", logits, split.y, settings.inferred_val_groups)
                )
        record.update(self.method.logged_state() if kept is None else kept.logged)
        self.history.append(record)
        if settings.criterion not in record:
            measured = ", ".join(k for k in record if k.startswith("val_"))
            raise UserError(
                f"selection criterion {settings.criterion!r} is not measured on "
                f"{dataset.name}; measured: {measured}"
            )
        previous = None if self.best is None else self.best[settings.criterion]
        if is_better(record[settings.criterion], previous, self.maximize):
            state = self.method.state_dict() if kept is None else kept.state
            self.best, self.best_state = record, cpu_copy(state)
        if self.job.on_eval is not None:
            self.job.on_eval(record)
        return record

    def snapshot(self, step: int) -> None:
        """Write the model at `step` with its learning rate to `snapshot_dir/step-NNNNNNN.pt`."""
        folder = self.settings.snapshot_dir
        if folder is None:
            raise ValueError("snapshot_every is set but snapshot_dir is not")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step-{step:07d}.pt"
        tmp = path.with_suffix(".tmp")
        lr = float(self.optimizer.param_groups[0]["lr"])
        torch.save({"step": step, "lr": lr, "method": cpu_copy(self.method.state_dict())}, tmp)
        os.replace(tmp, path)

    def checkpoint(self, step: int, optimizer_state: dict[str, Any]) -> None:
        if self.job.on_checkpoint is not None:
            self.job.on_checkpoint()
        if self.job.checkpoints is None:
            return
        self.job.checkpoints.save(
            {
                "step": step,
                "method": self.method.state_dict(),
                "optimizer": optimizer_state,
                "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
                "rng": _rng_state(self.settings.device),
                "history": self.history,
                "best": self.best,
                "best_state": self.best_state,
                "stopped": self.stopped,
                "loss_sum": self.loss_sum,
                "loss_count": self.loss_count,
            }
        )


class _Alone:
    """Steps one model with its own torch optimiser: today's plain loop, K = 1."""

    def __init__(self, model: _Model) -> None:
        self.model = model
        settings = model.settings
        self.stream = _Stream(model.train_split, model.schedule, settings.device)
        self.scaler = grad_scaler(settings.device, settings.acceleration.precision)
        if model.rng is not None:
            _set_rng_state(model.rng, settings.device)

    def steps(self, start: int, stop: int) -> Iterator[list[float]]:
        model = self.model
        show_groups = model.settings.train_groups_visible
        n_attributes = model.dataset.n_attributes
        threads = step_threads(model.settings.device, _step_multiply_adds([model]))
        for step, (idx, x, y, a) in enumerate(self.stream.batches(start, stop), start=start + 1):
            batch = Batch(idx, x, y, a if show_groups else None, n_attributes)
            with intra_op_threads(threads):
                value = self._step(batch, step)
            yield [value]

    def _step(self, batch: Batch, step: int) -> float:
        model, method = self.model, self.model.method
        with _autocast(model.settings):
            loss = method.loss(batch)
        value = loss.item()
        if math.isfinite(value):
            model.optimizer.zero_grad(set_to_none=True)
            if self.scaler is None:
                loss.backward()
                model.optimizer.step()
            else:
                self.scaler.scale(loss).backward()
                self.scaler.step(model.optimizer)
                self.scaler.update()
            if model.scheduler is not None:
                model.scheduler.step()
            method.after_step(batch, step)
        return value

    def logits_of(self, model: _Model) -> Callable[[GroupedSplit], torch.Tensor]:
        settings = model.settings

        def logits(split: GroupedSplit) -> torch.Tensor:
            with _autocast(settings):
                return predict(
                    model.method.predict,
                    split,
                    settings.device,
                    batch_size=model.dataset.eval_batch_size,
                )

        return logits

    def metrics_of(self, model: _Model) -> None:
        """None: `_Model.evaluate` computes the metrics from the logits."""

    def sync(self, model: _Model) -> None:
        """Nothing to do: the model trains in its own module."""

    def freeze(self, model: _Model) -> None:
        """Nothing to do: a stopped model ends the loop."""

    def optimizer_state(self, model: _Model) -> dict[str, Any]:
        return model.optimizer.state_dict()


class _Stacked:
    """Steps K models at once (`stacking.ModelStack`): one vectorised loss and update."""

    def __init__(self, models: list[_Model]) -> None:
        from robustbench_mat.stacking import ModelStack, StackedOptimizer

        self.models = models
        first = models[0]
        self.device = first.settings.device
        self.stack = ModelStack([m.method for m in models])
        self.optimizer = StackedOptimizer(self.stack)
        for k, model in enumerate(models):
            self.optimizer.load_member(k, model.optimizer)
        train = first.train_split
        self.x, self.y, self.a = (t.to(self.device) for t in (train.inputs, train.y, train.a))
        schedules = [m.schedule for m in models]
        self.shared = all(_same_schedule(schedules[0], other) for other in schedules[1:])
        # Full batches are gathered once, not at every step (one per model unless shared).
        self.full_x = self.full_idx = None
        if self.shared and first.schedule.full_batch:
            self.full_x = self.x[first.schedule.pool.to(self.device)]
        elif all(s.full_batch for s in schedules):
            self.full_idx = torch.stack([s.pool for s in schedules]).to(self.device)
            self.full_x = self.x[self.full_idx]
        self._logits: dict[tuple[int, str], torch.Tensor] = {}
        self._every: dict[str, torch.Tensor] = {}  # every model's logits on a split
        self._metrics: dict[tuple[int, str], dict[str, float]] = {}
        self.schedulers = [m.scheduler for m in models]

    def steps(self, start: int, stop: int) -> Iterator[list[float]]:
        threads = step_threads(self.device, _step_multiply_adds(self.models))
        for step in range(start + 1, stop + 1):
            with intra_op_threads(threads):
                values = self._step(step, first_step=step == start + 1)
            self._logits.clear()
            self._every.clear()
            self._metrics.clear()
            yield values

    def _step(self, step: int, first_step: bool) -> list[float]:
        models, stack, optimizer = self.models, self.stack, self.optimizer
        first = models[0]
        if self.shared:
            idx = first.schedule.indices(step - 1).to(self.device)
        elif self.full_idx is not None:
            idx = self.full_idx
        else:
            idx = torch.stack([m.schedule.indices(step - 1) for m in models]).to(self.device)
        a = self.a[idx] if first.settings.train_groups_visible else None
        x = self.full_x if self.full_x is not None else rows(self.x, idx)
        try:
            with _autocast(first.settings):
                losses, gradients = stack.losses_and_gradients(
                    idx, x, self.y[idx], a, first.dataset.n_attributes, not self.shared
                )
        except RuntimeError as error:  # e.g. `.item()` or an `if` on a tensor in a hook
            if first_step and "vmap" in str(error):
                raise _NotVectorisable(first_line(error)) from error
            raise
        values = losses.tolist()
        for k, value in enumerate(values):
            if not math.isfinite(value):
                optimizer.active[k] = 0.0
        schedulers = self.schedulers
        scale = None
        if schedulers[0] is not None:
            scale = torch.tensor(
                [s.get_last_lr()[0] / s.base_lrs[0] for s in schedulers], dtype=torch.float64
            )
        optimizer.step(gradients, scale)
        if schedulers[0] is not None:
            with warnings.catch_warnings():  # the members' own optimisers never step
                warnings.filterwarnings(
                    "ignore", "Detected call of `lr_scheduler.step", UserWarning
                )
                for scheduler in schedulers:
                    scheduler.step()
        return values

    def logits_of(self, model: _Model) -> Callable[[GroupedSplit], torch.Tensor]:
        """Logits of `model` on a split, computed for every model of the stack at once (the
        first member evaluated after a step pays for all of them)."""
        k = self.models.index(model)
        size = model.dataset.eval_batch_size

        def logits(split: GroupedSplit) -> torch.Tensor:
            if (k, split.name) not in self._logits:
                with _autocast(model.settings):
                    every = predict(self.stack.predict, split, self.device, size, stacked=True)
                self._every[split.name] = every
                for j in range(len(self.models)):
                    self._logits[(j, split.name)] = every[j]
            return self._logits[(k, split.name)]

        return logits

    def metrics_of(self, model: _Model) -> Callable[[GroupedSplit], dict[str, float]]:
        """Metrics of `model` on a split, computed for every model of the stack at once."""
        k = self.models.index(model)
        logits = self.logits_of(model)

        def metrics(split: GroupedSplit) -> dict[str, float]:
            if (k, split.name) not in self._metrics:
                logits(split)
                every = self._every[split.name]
                computed = model.dataset.metrics_many(split, every, model.weights)
                for j, one in enumerate(computed):
                    self._metrics[(j, split.name)] = one
            return self._metrics[(k, split.name)]

        return metrics

    def sync(self, model: _Model) -> None:
        self.stack.unstack(self.models.index(model))

    def freeze(self, model: _Model) -> None:
        self.optimizer.active[self.models.index(model)] = 0.0

    def optimizer_state(self, model: _Model) -> dict[str, Any]:
        return self.optimizer.export_member(self.models.index(model), model.optimizer)


@dataclass
class KeptState:
    """A model's state dict (copies) and logged state at a step it is evaluated after."""

    state: dict[str, torch.Tensor]
    logged: dict[str, Any]


EVALUATION_BLOCK = 64  # evaluations of a small linear model computed together
EVALUATION_BLOCK_NUMBERS = 2**24  # at most this many kept state numbers per block


class _EvaluationBlock:
    """Evaluations of one small linear model gathered over several steps and computed together.

    Evaluating an in-memory split reads all of its inputs for a product with a few weights,
    which at every step cost small runs more than their updates. Here each evaluation keeps a
    copy of the model's state at its step, and at a flush (the block is full, or a checkpoint,
    a failure or the end is due) the logits of every kept state on a split come from one
    vectorised pass (`stacking.predict_states`): one matrix product per layer for the block.
    The evaluations are then recorded in step order, as they would have been one by one.

    Each evaluation has a fixed place in the block, from its step, and the block is always
    computed at its full width, so a step's logits do not depend on which other steps share
    its block: a run resumed from a checkpoint evaluates exactly as an uninterrupted one."""

    def __init__(self, model: _Model, size: int) -> None:
        self.model, self.size = model, size
        self.pending: dict[int, tuple[int, float | None, KeptState]] = {}
        self.threads = step_threads(
            model.settings.device, size * (_step_multiply_adds([model], evaluation=True) or 0)
        )

    @staticmethod
    def size_for(models: Sequence[_Model]) -> int:
        """The block size for a loop over `models`: 0 (evaluate at once) unless one small
        linear model whose checkpoints, which need its evaluations, are rarer than them."""
        from robustbench_mat.stacking import why_not_stackable

        if len(models) != 1:  # a stack's evaluations are already one product
            return 0
        model = models[0]
        settings = model.settings
        if (
            why_not_stackable(model.method) is not None
            or settings.acceleration.compile
            or settings.acceleration.precision == "fp16"
            or not all(s.in_memory and len(s) == len(s.inputs) for s in model.eval_splits)
        ):
            return 0
        state = model.method.state_dict()
        if not all(torch.is_tensor(value) for value in state.values()):
            return 0
        numbers = sum(value.numel() for value in state.values())
        size = min(
            EVALUATION_BLOCK,
            EVALUATION_BLOCK_NUMBERS // max(1, numbers),
            settings.steps // settings.eval_every + 1,  # no wider than the run's evaluations
        )
        if settings.checkpoint_seconds <= 0:
            every = settings.checkpoint_every or settings.eval_every
            size = min(size, every // settings.eval_every)
        return size if size > 1 else 0

    def add(self, step: int, mean_loss: float | None, record: Callable[..., None]) -> None:
        """Keep the evaluation of `step` (flushing first when its place is taken)."""
        slot = step // self.model.settings.eval_every % self.size
        if slot in self.pending:
            self.flush(record)
        method = self.model.method
        state = state_copy(method.state_dict(), self.model.settings.device)
        self.pending[slot] = (step, mean_loss, KeptState(state, method.logged_state()))

    def flush(self, record: Callable[..., None]) -> None:
        """Compute the pending evaluations and hand each to `record(model, step, mean_loss,
        logits_of, kept, metrics_of)` in step order, until the model stops (e.g. pruned)."""
        from robustbench_mat.stacking import predict_states

        if not self.pending:
            return
        pending, self.pending = self.pending, {}
        model = self.model
        filler = next(iter(pending.values()))[2].state
        states = [pending[k][2].state if k in pending else filler for k in range(self.size)]
        size, device, logits = model.dataset.eval_batch_size, model.settings.device, {}

        def kept_logits(x: torch.Tensor) -> torch.Tensor:
            return predict_states(model.method, states, x)

        model.method.eval()
        try:
            with intra_op_threads(self.threads), _autocast(model.settings):
                for split in model.eval_splits:
                    logits[split.name] = predict(kept_logits, split, device, size, stacked=True)
        finally:
            model.method.train()
        slots, metrics = sorted(pending), {}
        for split in model.eval_splits:
            many = model.dataset.metrics_many(split, logits[split.name][slots], model.weights)
            metrics[split.name] = dict(zip(slots, many, strict=True))
        for slot, (step, mean_loss, kept) in sorted(pending.items(), key=lambda p: p[1][0]):
            if model.error is not None:
                return

            def logits_of(split: GroupedSplit, slot: int = slot) -> torch.Tensor:
                return logits[split.name][slot]

            def metrics_of(split: GroupedSplit, slot: int = slot) -> dict[str, float]:
                return metrics[split.name][slot]

            record(model, step, mean_loss, logits_of, kept, metrics_of)


class _NotVectorisable(Exception):
    """A stack's hooks failed under `vmap` at its first step."""


def _same_schedule(one: BatchSchedule, other: BatchSchedule) -> bool:
    def same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
        return (a is None and b is None) or (
            a is not None and b is not None and a.shape == b.shape and torch.equal(a, b)
        )

    return (
        one.seed == other.seed
        and one.batch_size == other.batch_size
        and same(one.pool, other.pool)
        and same(one.weights, other.weights)
    )


def _loop(models: list[_Model]) -> None:
    """The shared loop over one group of models that step together."""
    first = models[0]
    settings = first.settings
    stepper = _Alone(first) if len(models) == 1 else _Stacked(models)
    description = settings.description
    if len(models) > 1:
        description = f"{len(models)} stacked models: {description}"
    bar = tqdm(
        total=settings.steps,
        initial=first.start,
        desc=description,
        disable=not settings.show_progress,
        dynamic_ncols=True,
        leave=True,
    )
    checkpoint_every = settings.checkpoint_every or settings.eval_every
    snapshot_every = settings.snapshot_every or 0
    written = time.monotonic()
    eval_threads = step_threads(settings.device, _step_multiply_adds(models, evaluation=True))
    block_size = _EvaluationBlock.size_for(models)
    block = _EvaluationBlock(first, block_size) if block_size else None

    def record(
        model: _Model,
        step: int,
        mean_loss: float | None,
        logits_of: Callable[[GroupedSplit], torch.Tensor],
        kept: KeptState | None = None,
        metrics_of: Callable[[GroupedSplit], dict[str, float]] | None = None,
    ) -> None:
        model.method.eval()
        try:
            with intra_op_threads(eval_threads):
                result = model.evaluate(step, mean_loss, logits_of, kept, metrics_of)
        except Exception as error:  # e.g. RunPruned from on_eval: this model stops here
            model.fail(error)
            stepper.freeze(model)
            return
        finally:
            model.method.train()
        postfix = {"loss": f"{result['train_loss']:.4g}"} if mean_loss is not None else {}
        shown = dict.fromkeys(("val_wga", settings.criterion))
        postfix.update({k: f"{result[k]:.3f}" for k in shown if k in result})
        bar.set_postfix(postfix, refresh=False)

    def evaluate(model: _Model, step: int, mean_loss: float | None) -> None:
        if block is not None:
            block.add(step, mean_loss, record)
            return
        stepper.sync(model)
        record(model, step, mean_loss, stepper.logits_of(model), None, stepper.metrics_of(model))

    def settle() -> None:
        """Record the evaluations kept in the block: before a checkpoint, which saves them,
        and before a model stops."""
        if block is not None:
            block.flush(record)

    for model in models:
        model.method.train()
    try:
        if settings.steps == 0 and first.best is None:  # a main loop that trains nothing (DFR)
            for model in models:
                evaluate(model, 0, None)
                settle()
                if model.error is None:
                    model.checkpoint(0, stepper.optimizer_state(model))
        stop = first.start if first.stopped else settings.steps
        for step, values in enumerate(stepper.steps(first.start, stop), start=first.start + 1):
            bar.update(1)
            last = step == settings.steps
            scheduled = step % checkpoint_every == 0
            if scheduled and time.monotonic() - written < settings.checkpoint_seconds:
                scheduled = False
            elif scheduled:
                written = time.monotonic()
            for model, value in zip(models, values, strict=True):
                if not model.training:
                    continue
                if not math.isfinite(value):  # the evaluations before it are recorded
                    settle()
                model.add_loss(step, value)
                if model.error is not None:
                    stepper.freeze(model)
                    continue
                if step % settings.eval_every == 0 or last or model.stopped:
                    evaluate(model, step, model.loss_sum / model.loss_count)
                    model.loss_sum, model.loss_count = 0.0, 0
                due = snapshot_every and (step % snapshot_every == 0 or last or model.stopped)
                if model.error is None and due:
                    stepper.sync(model)
                    model.snapshot(step)
                if scheduled or last or model.stopped:
                    settle()  # the checkpoint saves the history
                    if model.error is None:
                        stepper.sync(model)
                        model.checkpoint(step, stepper.optimizer_state(model))
                if model.stopped:
                    stepper.freeze(model)
            if not any(model.training for model in models):
                break
        for model in models:
            if model.error is None and not model.stopped:
                stepper.sync(model)
    finally:
        bar.close()


def _step_multiply_adds(models: Sequence[_Model], evaluation: bool = False) -> int | None:
    """Multiply-adds of one step of `models` together (or, with `evaluation`, of their forward
    pass over the largest evaluated split), estimated as rows x parameters; None unless every
    network is made of linear layers (a convolution's work is not its parameter count)."""
    from robustbench_mat.stacking import other_layer

    total = 0
    for model in models:
        if other_layer(model.method) is not None:
            return None
        if evaluation:
            rows = max(len(split) for split in model.eval_splits)
            parameters = sum(p.numel() for p in model.method.parameters())
        else:
            rows = model.schedule.batch_size
            parameters = sum(p.numel() for p in model.method.parameters() if p.requires_grad)
        total += rows * parameters
    return total


def _autocast(settings: LoopSettings) -> contextlib.AbstractContextManager:
    return autocast(settings.device, settings.acceleration.precision)
