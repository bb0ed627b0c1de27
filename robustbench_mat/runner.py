"""One training run from end to end: resolve the plugins, train, select, record.

Data flows one way: dataset -> loop (method hooks) -> evaluator -> selection -> tracker. A run
is identified by a key hashed from everything that determines its numbers, the code that
computes them included (`provenance`); its directory under `<workdir>/runs/` holds the checkpoint
(for resume) and, once finished, `result.json`. A lock in `<workdir>/locks/` is held while it
trains, so identical runs started at once train one at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import math
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from filelock import FileLock, Timeout

from robustbench_mat.data import BenchmarkDataset, stable_hash
from robustbench_mat.errors import RunFailed, RunPruned, UserError, first_line
from robustbench_mat.group_inference import ARTIFACT_NAME, InferredGroups
from robustbench_mat.hardware import Acceleration, backends, resolve_precision
from robustbench_mat.hparams import resolve, sample_configurations
from robustbench_mat.loading import Loading, resolve_loading
from robustbench_mat.method import Method
from robustbench_mat.protocols import Protocol, get_protocol
from robustbench_mat.provenance import CodeVersion, code_version, package_version
from robustbench_mat.regimes import (
    Regime,
    check_allowed,
    check_criterion_allowed,
    default_regime,
    get_regime,
)
from robustbench_mat.registry import DATASETS, METHODS
from robustbench_mat.show import default_criterion
from robustbench_mat.tracking import HISTORY_PREFIX, TAGS, Tracker, resolve_workdir
from robustbench_mat.training import (
    PREVIOUS_SUFFIX,
    CheckpointStore,
    LoopResult,
    LoopSettings,
    TrainingJob,
    cpu_copy,
    resolve_device,
    seed_everything,
    train,
    train_jobs,
)

DEFAULT_INFERRER = "xrm-infer"
# Datasets shared by the runs of a `dataset_pool` block, by `_dataset_key`; None outside one.
_POOL: dict[tuple[Any, ...], BenchmarkDataset] | None = None


@dataclass
class RunSpec:
    """Everything a user chooses about one run; unset fields take the dataset's defaults."""

    method: str
    dataset: str
    seed: int = 0
    regime: str | None = None
    criterion: str | None = None
    steps: int | None = None
    eval_every: int | None = None
    checkpoint_every: int | None = None
    checkpoint_seconds: float = 0.0  # see LoopSettings; never changes the numbers
    # Train on a random subset of the training split: round(train_fraction * n) examples drawn
    # without replacement by `train_subset_seed` (the memorization experiment).
    train_fraction: float | None = None
    train_subset_seed: int = 0
    # Save this many evenly spaced snapshots of the model (TracIn self-influence reads them).
    snapshots: int | None = None
    name: str | None = None  # the MLflow run name, when not "<method> <regime> seed <seed>"
    device: str = "auto"
    # How the device is used (`hardware`): autocast precision, torch.compile, deterministic
    # kernels. On the CPU only `auto`/`fp32` precision exists and the numbers never change.
    precision: str = "auto"
    compile: bool = False
    deterministic: bool = False
    hparams: dict[str, Any] = field(default_factory=dict)
    data_params: dict[str, Any] = field(default_factory=dict)
    data_dir: str | Path | None = None
    workdir: str | Path | None = None
    kind: str = "run"
    tags: dict[str, str] = field(default_factory=dict)
    show_progress: bool = True
    restart: bool = False
    # DataLoader worker processes for on-disk inputs; None: `loading.resolve_loading`'s default
    # (the cores per GPU on CUDA, 0 on the CPU). Never changes the numbers.
    num_workers: int | None = None
    inference_hparams: dict[str, Any] = field(default_factory=dict)
    stop_loss: float | None = None
    inference_trials: int = 1
    inference_steps: int | None = None
    inference_data: dict[str, Any] = field(default_factory=dict)
    inference_seed: int | None = None
    protocol: str = "default"
    on_evaluation: Callable[[dict[str, Any]], None] | None = field(default=None, compare=False)


@dataclass
class RunPlan:
    """A `RunSpec` resolved against the plugins: validated, with every default filled in."""

    spec: RunSpec
    method_cls: type[Method]
    dataset: BenchmarkDataset
    regime: Regime
    criterion: str
    hparams: dict[str, Any]
    steps: int  # the run's budget (--steps); first stages may take a fraction of it
    main_steps: int  # the shared loop's length: `steps` unless the method says otherwise
    eval_every: int
    checkpoint_every: int
    device: torch.device
    workdir: Path
    protocol: Protocol = field(default_factory=Protocol)

    @property
    def method_name(self) -> str:
        return self.method_cls.name

    @property
    def inferrer(self) -> str | None:
        """The group-inference method this run needs, if any."""
        if self.method_cls.group_inference is not None:
            return self.method_cls.group_inference
        return DEFAULT_INFERRER if self.criterion.startswith("val_inferred") else None

    @functools.cached_property
    def code(self) -> CodeVersion:
        """The code that computes this run: a different one never reuses its results."""
        return code_version(self.method_cls, type(self.dataset))

    @property
    def key(self) -> str:
        return stable_hash(
            {
                "code": self.code.fingerprint,
                "protocol": self.protocol.name,
                "method": self.method_name,
                "dataset": self.dataset.name,
                "data": self.dataset.config,
                "hparams": self.hparams,
                "seed": self.spec.seed,
                "regime": self.regime.name,
                "criterion": self.criterion,
                "steps": self.steps,
                "eval_every": self.eval_every,
                "device": self.device.type,
                "inferrer": self.inferrer,
                "inference": self.inference_settings(),
                "stop_loss": self.spec.stop_loss,
                **self._subset_key(),
                **self._acceleration_key(),
            }
        )

    @functools.cached_property
    def loading(self) -> Loading:
        """How on-disk inputs are read: the resolved loader workers and pinned memory."""
        return resolve_loading(self.spec.num_workers, self.device)

    @functools.cached_property
    def acceleration(self) -> Acceleration:
        """The resolved device settings (precision `auto` becomes the device's)."""
        return Acceleration(
            resolve_precision(self.spec.precision, self.device),
            self.spec.compile,
            self.spec.deterministic,
        )

    def _acceleration_key(self) -> dict[str, Any]:
        # CPU runs (fp32, default kernels) keep the keys they always had.
        key: dict[str, Any] = {}
        if self.device.type == "cuda":
            key["precision"] = self.acceleration.precision
        if self.spec.compile:
            key["compile"] = True
        if self.spec.deterministic:
            key["deterministic"] = True
        return key

    def _subset_key(self) -> dict[str, Any]:
        # Runs on the whole training split, without snapshots, keep the keys they always had.
        key: dict[str, Any] = {}
        if self.spec.train_fraction is not None:
            key["train_subset"] = [self.spec.train_fraction, self.spec.train_subset_seed]
        if self.spec.snapshots is not None:
            key["snapshots"] = self.spec.snapshots
        return key

    @property
    def snapshot_every(self) -> int | None:
        """Steps between the model snapshots the run saves, or None."""
        if self.spec.snapshots is None:
            return None
        return max(1, math.ceil(self.main_steps / self.spec.snapshots))

    @property
    def run_dir(self) -> Path:
        name = f"{self.dataset.name}-{self.method_name}-{self.regime.name}-s{self.spec.seed}"
        return self.workdir / "runs" / f"{name}-{self.key}"

    @property
    def run_name(self) -> str:
        if self.spec.name is not None:
            return self.spec.name
        return f"{self.method_name} {self.regime.name} seed {self.spec.seed}"

    def params(self) -> dict[str, Any]:
        return {
            **self.hparams,
            "method": self.method_name,
            "dataset": self.dataset.name,
            "regime": self.regime.name,
            "seed": self.spec.seed,
            "criterion": self.criterion,
            "protocol": self.protocol.name,
            "steps": self.steps,
            "main_steps": self.main_steps,
            "eval_every": self.eval_every,
            "device": self.device.type,
            "package_version": package_version(),
            "code_fingerprint": self.code.fingerprint,
            "torch_version": torch.__version__,
            **{f"data.{k}": v for k, v in self.dataset.config.items()},
            **{f"inference.{k}": v for k, v in (self.inference_settings() or {}).items()},
            **(
                {}
                if self.spec.train_fraction is None
                else {
                    "train_fraction": self.spec.train_fraction,
                    "train_subset_seed": self.spec.train_subset_seed,
                }
            ),
            **({} if self.spec.snapshots is None else {"snapshots": self.spec.snapshots}),
            **self.acceleration.params(self.device),
            "loader_workers": self.loading.workers,
        }

    def inference_settings(self) -> dict[str, Any] | None:
        """How the group-inference runs are set up (None when the run infers no groups); the
        seed is the run's own unless one inference seed serves every seed (the paper: 0)."""
        if self.inferrer is None:
            return None
        spec, protocol = self.spec, self.protocol
        seed = _first_set(spec.inference_seed, protocol.inference_seed, spec.seed)
        return {
            "trials": spec.inference_trials,
            "grid": protocol.grid if spec.inference_trials == 1 else None,
            "steps": spec.inference_steps,
            "data": {**protocol.inference_data, **spec.inference_data},
            "seed": seed,
            "hparams": spec.inference_hparams,
        }

    def tags(self) -> dict[str, Any]:
        return {
            TAGS.METHOD: self.method_name,
            TAGS.DATASET: self.dataset.name,
            TAGS.REGIME: self.regime.name,
            TAGS.SEED: self.spec.seed,
            TAGS.CRITERION: self.criterion,
            TAGS.KIND: self.spec.kind,
            TAGS.PROTOCOL: self.protocol.name,
            TAGS.RUN_KEY: self.key,
            **self.spec.tags,
        }


@dataclass
class RunContext:
    """What a method's hooks may use: the plan, the tracker, the run's directory and, for
    methods that consume them, the inferred groups."""

    plan: RunPlan
    tracker: Tracker
    run_id: str
    settings: LoopSettings
    inferred: InferredGroups | None = None

    @property
    def run_dir(self) -> Path:
        return self.plan.run_dir

    def train_stage(
        self, name: str, method: Method, steps: int, eval_every: int | None = None
    ) -> LoopResult:
        """Train `method` (e.g. JTT's first model) on the shared loop for `steps` steps, with its
        own checkpoint in the run directory, so that a resumed run does not train it again.
        Its evaluations are logged under `<name>/history/...`; the model is left in its final
        state and the returned result holds the selected one."""
        settings = dataclasses.replace(
            self.settings,
            steps=steps,
            eval_every=min(eval_every or self.settings.eval_every, steps),
            description=f"{self.settings.description}, {name}",
            stop_loss=None,
        )
        outcome = train(
            method, self.plan.dataset, settings, CheckpointStore(self.run_dir / f"{name}.pt")
        )
        self.tracker.log_many(
            self.run_id, [(r["step"], r) for r in outcome.history], f"{name}/{HISTORY_PREFIX}"
        )
        return outcome


@dataclass
class RunResult:
    """The outcome of a finished run, as stored in `result.json`."""

    run_id: str
    run_key: str
    method: str
    dataset: str
    regime: str
    seed: int
    criterion: str
    selected_step: int
    selected: dict[str, Any]
    final: dict[str, Any]
    hparams: dict[str, Any]
    tracking_uri: str
    finished_at: str = ""
    code: str = ""
    reused: bool = False


def require_prepared_data(dataset_cls: type[BenchmarkDataset], data_dir: str | Path | None) -> None:
    """Fail at once (UserError) when an on-disk dataset's prepared files are missing, saying
    where it looked and how to get them. `run` (and the command line, before tuning) calls it
    before `plan` builds the dataset, which may fetch a backbone over the network (the text
    datasets); `plan` itself needs no data."""
    prepared_files = getattr(dataset_cls, "prepared_files", None)
    missing = [
        path for path in (prepared_files(data_dir) if prepared_files else []) if not path.exists()
    ]
    if missing:
        from robustbench_mat.metadata import resolve_data_dir

        folder, data = missing[0].parent, resolve_data_dir(data_dir)
        raise UserError(
            f"dataset {dataset_cls.name} is not prepared: looked in {folder.absolute()} for "
            f"{', '.join(path.name for path in missing)}; run `robustbench-mat download "
            f"{dataset_cls.name} --data-dir {data}` (or, with its upstream files placed there by "
            f"hand, `robustbench-mat prepare {dataset_cls.name} --data-dir {data}`)"
        )


def plan(spec: RunSpec) -> RunPlan:
    """Validate `spec` and fill in the defaults; raises `UserError` on any bad input."""
    method_cls = METHODS.get(spec.method)
    dataset_cls = DATASETS.get(spec.dataset)
    protocol = get_protocol(spec.protocol, dataset_cls)
    dataset = dataset_cls(spec.data_dir, **{**protocol.data, **spec.data_params})
    if _POOL is not None:
        dataset = _POOL.setdefault(_dataset_key(dataset), dataset)
    regime = (
        get_regime(spec.regime) if spec.regime else default_regime(method_cls.needs_train_groups)
    )
    check_allowed(
        method_cls.name,
        method_cls.needs_train_groups,
        regime,
        method_cls.needs_val_groups,
        method_cls.inferred_groups_variant,
    )
    criterion = spec.criterion or default_criterion(method_cls, dataset, regime)
    check_criterion_allowed(criterion, regime)
    hparams = resolve(
        method_cls.hparam_specs(dataset),
        {**protocol.hparams, **spec.hparams},
        f"method {method_cls.name!r}",
    )
    steps = _first_set(spec.steps, protocol.steps, dataset.default_steps)
    if steps < 1:
        raise UserError(f"--steps must be a positive number of steps, got {steps}")
    main_steps = method_cls.main_steps(hparams, steps)
    eval_every = _first_set(spec.eval_every, protocol.eval_every, dataset.default_eval_every)
    eval_every = min(eval_every, max(main_steps, 1))
    checkpoint_every = spec.checkpoint_every
    if checkpoint_every is None:
        checkpoint_every = dataset.default_checkpoint_every or eval_every
    for flag, value in (
        ("--eval-every", eval_every),
        ("--checkpoint-every", checkpoint_every),
    ):
        if value < 1:
            raise UserError(f"{flag} must be a positive number of steps, got {value}")
    the_plan = RunPlan(
        spec,
        method_cls,
        dataset,
        regime,
        criterion,
        hparams,
        steps,
        main_steps,
        eval_every,
        checkpoint_every,
        resolve_device(spec.device),
        resolve_workdir(spec.workdir),
        protocol,
    )
    resolve_precision(spec.precision, the_plan.device)  # fails before anything starts
    dataset.place(the_plan.device, the_plan.loading)
    if the_plan.inferrer is not None:
        if spec.inference_trials < 1:
            raise UserError(f"--infer-trials must be at least 1, got {spec.inference_trials}")
        for inference in inference_specs(the_plan):
            plan(inference)  # bad inference settings fail before anything starts
    elif (
        spec.inference_hparams
        or spec.inference_trials != 1
        or spec.inference_steps is not None
        or spec.inference_data
        or spec.inference_seed is not None
    ):
        raise UserError(
            f"--infer-set, --infer-steps, --infer-data, --infer-seed and --infer-trials apply to "
            f"methods that infer groups first (mat, xrm) or to the val_inferred_* criteria; "
            f"{method_cls.name!r} with {criterion!r} infers none"
        )
    return the_plan


def random_subset(n: int, fraction: float, seed: int) -> torch.Tensor:
    """Sorted indices of round(fraction * n) of n examples, drawn without replacement."""
    if not 0 < fraction <= 1:
        raise UserError(f"a training fraction must be in (0, 1], got {fraction}")
    generator = torch.Generator().manual_seed(seed)
    size = max(1, round(fraction * n))
    return torch.sort(torch.randperm(n, generator=generator)[:size]).values


def _first_set(*values: Any) -> Any:
    return next(value for value in values if value is not None)


def run(spec: RunSpec) -> RunResult:
    """Train, select and record one run; a finished identical run is reused, an interrupted one
    resumed from its last checkpoint. Identical runs started at once train one at a time: the
    later one waits, then reuses the result."""
    require_prepared_data(DATASETS.get(spec.dataset), spec.data_dir)  # in seconds, offline
    (outcome,) = run_many([spec])
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def run_many(specs: list[RunSpec]) -> list[RunResult | Exception]:
    """`run` for several specs at once: the runs whose models can be stacked (same method and
    dataset, settings differing only in numbers, see `stacking`) train together in one
    vectorised loop, each still its own run (key, directory, checkpoint, MLflow run, result).
    Returns each spec's result or the exception that stopped it; identical specs share one run.
    With a single spec, its exception is raised instead."""
    if len(specs) == 1:
        the_plan = plan(specs[0])
        try:
            with _exclusive(the_plan.run_dir, specs[0].show_progress):
                return [_reuse_or_train([the_plan])[0]]
        finally:
            the_plan.dataset.release_loaders()
    outcomes: dict[int, RunResult | Exception] = {}
    plans: dict[int, RunPlan] = {}
    for index, spec in enumerate(specs):
        try:
            plans[index] = plan(spec)
        except Exception as error:
            outcomes[index] = error
    _share_datasets(plans)
    unique = {the_plan.key: the_plan for the_plan in plans.values()}
    try:
        with contextlib.ExitStack() as held:
            for the_plan in unique.values():
                held.enter_context(_exclusive(the_plan.run_dir, the_plan.spec.show_progress))
            results = dict(zip(unique, _reuse_or_train(list(unique.values())), strict=True))
    finally:
        for the_plan in unique.values():
            the_plan.dataset.release_loaders()
    for index, the_plan in plans.items():
        outcomes[index] = results[the_plan.key]
    return [outcomes[index] for index in range(len(specs))]


def _dataset_key(dataset: BenchmarkDataset) -> tuple[Any, ...]:
    """Datasets with equal keys hold the same data: same class, parameters and folder."""
    return (type(dataset), dataset.fingerprint(), str(getattr(dataset, "data_dir", None)))


def _share_datasets(plans: dict[int, RunPlan]) -> None:
    """Let plans of the same data hold one dataset object: loaded once, and stackable."""
    shared: dict[tuple[Any, ...], BenchmarkDataset] = {}
    for index, the_plan in plans.items():
        dataset = shared.setdefault(_dataset_key(the_plan.dataset), the_plan.dataset)
        plans[index] = dataclasses.replace(the_plan, dataset=dataset)


@contextlib.contextmanager
def dataset_pool() -> Iterator[None]:
    """Within it, every run of the same data holds one dataset object, loaded once, as the
    models of one stack do: a tuning worker's trials read a dataset's files (or draw it) once,
    not once per trial. Runs never change a dataset; each places it on its device, and ends
    its loader workers, as before."""
    global _POOL
    outer, _POOL = _POOL, {} if _POOL is None else _POOL
    try:
        yield
    finally:
        _POOL = outer


def _reuse_or_train(plans: list[RunPlan]) -> list[RunResult | Exception]:
    """Each plan's stored result, or a new one trained (together where possible); the run
    locks are held by the caller. A single plan's exception is raised."""
    outcomes: list[RunResult | Exception | None] = []
    for the_plan in plans:
        if the_plan.spec.restart and the_plan.run_dir.exists():
            shutil.rmtree(the_plan.run_dir)
        outcomes.append(_stored_result(the_plan.run_dir / "result.json"))
    pending = [i for i, outcome in enumerate(outcomes) if outcome is None]
    for i, outcome in zip(pending, _train_many([plans[i] for i in pending]), strict=True):
        outcomes[i] = outcome
    return outcomes  # type: ignore[return-value]


@contextlib.contextmanager
def _exclusive(run_dir: Path, show_progress: bool) -> Iterator[None]:
    """Hold a lock on one run while it trains (the OS releases it if the process dies). It
    lives outside the run's directory, which `--restart` deletes."""
    locks = run_dir.parent.parent / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    lock = FileLock(locks / f"{run_dir.name}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if show_progress:
            print(
                f"another process is running this same run ({run_dir.name}); waiting for it",
                file=sys.stderr,
                flush=True,
            )
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _stored_result(path: Path) -> RunResult | None:
    """The finished run stored at `path`; an unreadable file is set aside, so that the run is
    recorded again from its last checkpoint."""
    if not path.exists():
        return None
    try:
        return RunResult(**{**json.loads(path.read_text()), "reused": True})
    except (ValueError, TypeError) as error:
        print(
            f"robustbench-mat: {path} is unreadable ({type(error).__name__}: {error}); "
            "recording the run again from its last checkpoint",
            file=sys.stderr,
            flush=True,
        )
        os.replace(path, path.with_suffix(".json.unreadable"))
        return None


@dataclass
class _Started:
    """A run whose MLflow run is open and whose model is ready for the loop."""

    plan: RunPlan
    tracker: Tracker
    run_id: str
    job: TrainingJob | None = None
    context: RunContext | None = None


def _train_many(plans: list[RunPlan]) -> list[RunResult | Exception]:
    """Start, train (stacked where possible) and record `plans`; with one plan, its exception
    is raised, else each plan's exception is returned in its place."""
    if not plans:
        return []
    deterministic = any(the_plan.spec.deterministic for the_plan in plans)
    with backends(plans[0].device, deterministic):
        return _start_train_record(plans)


def _start_train_record(plans: list[RunPlan]) -> list[RunResult | Exception]:
    alone = len(plans) == 1
    outcomes: list[RunResult | Exception | None] = [None] * len(plans)
    started: list[tuple[int, _Started]] = []
    for i, the_plan in enumerate(plans):
        try:
            started.append((i, _start(the_plan)))
        except Exception as error:
            if alone:
                raise
            outcomes[i] = error
    ready = []
    for i, run_ in started:
        try:
            with _recording(run_):
                _prepare(run_)
            ready.append((i, run_))
        except Exception as error:
            if alone:
                raise
            outcomes[i] = error
    with contextlib.ExitStack() as recording:  # an interrupt ends every run as killed
        for _, run_ in ready:
            recording.enter_context(_recording(run_))
        trained = train_jobs([run_.job for _, run_ in ready]) if ready else []
    for (i, run_), outcome in zip(ready, trained, strict=True):
        try:
            with _recording(run_):
                if isinstance(outcome, BaseException):
                    raise outcome
                outcomes[i] = _record(run_, outcome)
        except Exception as error:
            if alone:
                raise
            outcomes[i] = error
    return outcomes  # type: ignore[return-value]


def _start(the_plan: RunPlan) -> _Started:
    """Open (or reopen, on resume) the run's MLflow run."""
    run_dir = the_plan.run_dir
    the_plan.dataset.split("train")  # missing or malformed data fails before anything starts
    run_dir.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(the_plan.workdir)
    id_file = run_dir / "mlflow_run_id"
    previous = id_file.read_text().strip() if id_file.exists() else None
    run_id = tracker.start(
        the_plan.dataset.name,
        the_plan.run_name,
        the_plan.tags(),
        the_plan.params(),
        run_id=previous,
    )
    _write_atomic(id_file, run_id)
    return _Started(the_plan, tracker, run_id)


@contextlib.contextmanager
def _recording(run_: _Started) -> Iterator[None]:
    """Close the MLflow run as killed, pruned or failed when the block raises; a full disk is
    one line saying that the checkpoint and the store are intact."""
    try:
        yield
    except BaseException as error:
        state = {KeyboardInterrupt: "killed", RunPruned: "pruned"}.get(type(error), "failed")
        run_.tracker.end_after_error(run_.run_id, state)
        if _is_disk_full(error):
            raise RunFailed(
                f"no space left on device while recording {run_.plan.run_name} "
                f"({first_line(error)}); the last checkpoint in {run_.plan.run_dir} and the "
                "MLflow store are intact: free some space, then run the same command again to "
                "resume"
            ) from None
        raise


def _is_disk_full(error: BaseException) -> bool:
    """A full disk, as the file system (ENOSPC) or sqlite ("database or disk is full") says."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    return "database or disk is full" in str(error)


def obtain_inferred_groups(the_plan: RunPlan) -> tuple[InferredGroups, RunResult]:
    """The inferred groups `the_plan` needs, from the best of its inference runs by the
    inferrer's label-free score (XRM: the final flip rate). Each inference run is an ordinary
    run, so an identical finished one is reused instead of trained again."""
    spec = the_plan.spec
    candidates = []
    for inference in inference_specs(the_plan):
        inference_plan = plan(inference)
        artifact = inference_plan.run_dir / ARTIFACT_NAME
        if not (inference_plan.run_dir / "result.json").exists() and spec.show_progress:
            print(
                f"{the_plan.method_name} needs groups inferred by {the_plan.inferrer}: running "
                f"{the_plan.inferrer} on {the_plan.dataset.name} for {inference_plan.steps} steps "
                f"(seed {inference.seed}, {inference.hparams or 'default settings'}"
                f"{f', data {inference.data_params}' if spec.inference_data else ''}); "
                "--infer-steps, --infer-set and --infer-data change it",
                flush=True,
            )
        result = run(inference)
        if not artifact.exists():
            raise RunFailed(f"{the_plan.inferrer} finished without writing {artifact}")
        candidates.append((InferredGroups.load(artifact), result))
    return max(candidates, key=lambda candidate: candidate[0].score)


def inference_specs(the_plan: RunPlan) -> list[RunSpec]:
    """The group-inference runs that `the_plan` chooses from: one with the inferrer's defaults,
    or `inference_trials` configurations drawn from its search space; `inference_hparams` are
    fixed in all of them."""
    spec, settings = the_plan.spec, the_plan.inference_settings()
    configurations = [dict(spec.inference_hparams)]
    if settings["grid"] == "paper":  # the paper's 10 configurations, chosen by flip rate
        from robustbench_mat.tuning import paper_grid

        inferrer = METHODS.get(the_plan.inferrer)
        configurations = [
            {**configuration, **spec.inference_hparams}
            for configuration in paper_grid(inferrer, the_plan.dataset, spec.inference_hparams)
        ]
    elif spec.inference_trials > 1:
        inferrer = METHODS.get(the_plan.inferrer)
        space = {
            name: distribution
            for name, distribution in inferrer.search_space(the_plan.dataset).items()
            if name not in spec.inference_hparams
        }
        configurations = [
            {**sampled, **spec.inference_hparams}
            for sampled in sample_configurations(space, spec.inference_trials)
        ]
    return [
        RunSpec(
            method=the_plan.inferrer,
            dataset=the_plan.dataset.name,
            seed=settings["seed"],
            regime="none",
            steps=spec.inference_steps,
            device=spec.device,
            precision=spec.precision,
            compile=spec.compile,
            deterministic=spec.deterministic,
            hparams=configuration,
            data_params={**the_plan.dataset.config, **settings["data"]},
            protocol=spec.protocol,
            data_dir=spec.data_dir,
            workdir=the_plan.workdir,
            checkpoint_seconds=spec.checkpoint_seconds,
            kind="group-inference",
            show_progress=spec.show_progress,
            num_workers=spec.num_workers,
        )
        for configuration in configurations
    ]


def _prepare(run_: _Started) -> None:
    """Infer groups if needed, build the method, run its `prepare`, and set up its loop job."""
    the_plan, tracker, run_id = run_.plan, run_.tracker, run_.run_id
    spec = the_plan.spec
    inferred = None
    if the_plan.inferrer is not None:
        inferred, source = obtain_inferred_groups(the_plan)
        tracker.set_tags(
            run_id,
            {
                "robustbench.inferred_groups.run_id": source.run_id,
                "robustbench.inferred_groups.method": the_plan.inferrer,
                "robustbench.inferred_groups.score": inferred.score,
            },
        )
    settings = LoopSettings(
        steps=the_plan.main_steps,
        eval_every=the_plan.eval_every,
        checkpoint_every=the_plan.checkpoint_every,
        checkpoint_seconds=spec.checkpoint_seconds,
        train_subset=None
        if spec.train_fraction is None
        else random_subset(
            len(the_plan.dataset.split("train")), spec.train_fraction, spec.train_subset_seed
        ),
        seed=spec.seed,
        device=the_plan.device,
        criterion=the_plan.criterion,
        train_groups_visible=the_plan.regime.train_groups,
        evaluate_train=the_plan.dataset.evaluate_train,
        show_progress=spec.show_progress,
        description=f"{the_plan.method_name} on {the_plan.dataset.name} (seed {spec.seed})",
        stop_loss=spec.stop_loss,
        snapshot_every=the_plan.snapshot_every,
        snapshot_dir=the_plan.run_dir / "snapshots",
        acceleration=the_plan.acceleration,
        inferred_val_groups=None
        if inferred is None
        else inferred.eval_groups(
            "val", the_plan.dataset.split("val").y, the_plan.dataset.class_names
        ),
    )
    seed_everything(spec.seed)
    published_state = the_plan.dataset.model_rng_state()
    if published_state is not None:
        torch.set_rng_state(published_state)
    method = the_plan.method_cls(the_plan.dataset, the_plan.hparams)
    context = RunContext(the_plan, tracker, run_id, settings, inferred)
    method.prepare(context)
    run_dir = the_plan.run_dir
    evaluations = max(1, math.ceil(the_plan.main_steps / the_plan.eval_every))
    stride = tracker.history_stride(evaluations)

    def log_history(record: dict[str, Any]) -> None:
        index = math.ceil(record["step"] / the_plan.eval_every)
        if index % stride == 0 or record["step"] == the_plan.main_steps:
            tracker.buffer_history(run_id, record)
        if spec.on_evaluation is not None:
            spec.on_evaluation(record)

    run_.context = context
    run_.job = TrainingJob(
        method,
        settings,
        CheckpointStore(run_dir / "checkpoint.pt"),
        on_eval=log_history,
        on_checkpoint=tracker.flush,
    )


def _record(run_: _Started, outcome: LoopResult) -> RunResult:
    """Write and log the finished run's artifacts and result; close its MLflow run."""
    the_plan, tracker, run_id = run_.plan, run_.tracker, run_.run_id
    method, context, spec = run_.job.method, run_.context, the_plan.spec
    run_dir = the_plan.run_dir
    tracker.flush()
    method.finish(context, outcome)

    selected, final = outcome.selected, outcome.history[-1]
    tracker.log_metrics(
        run_id, {**selected, "selected_step": selected["step"]}, step=the_plan.main_steps
    )
    torch.save(outcome.selected_state, run_dir / "selected_model.pt")
    torch.save(cpu_copy(method.state_dict()), run_dir / "final_model.pt")  # loads anywhere
    pd.DataFrame(outcome.history).to_csv(run_dir / "history.csv", index=False)
    for name in ("selected_model.pt", "final_model.pt", "history.csv"):
        tracker.log_artifact(
            run_id, run_dir / name, "checkpoints" if name.endswith(".pt") else None
        )
    result = RunResult(
        run_id=run_id,
        run_key=the_plan.key,
        method=the_plan.method_name,
        dataset=the_plan.dataset.name,
        regime=the_plan.regime.name,
        seed=spec.seed,
        criterion=the_plan.criterion,
        selected_step=selected["step"],
        selected=selected,
        final=final,
        hparams=the_plan.hparams,
        tracking_uri=tracker.uri,
        finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        code=the_plan.code.describe(),
    )
    _write_atomic(run_dir / "result.json", json.dumps(asdict(result), indent=2))
    tracker.end(run_id, "finished", tags={"robustbench.selected_step": selected["step"]})
    for previous in run_dir.glob(f"*{PREVIOUS_SUFFIX}"):
        previous.unlink()  # kept only while a run can still be resumed
    return result


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
