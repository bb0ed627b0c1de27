"""Optuna tuning of one method on one dataset under one regime, then the best configuration
re-run over seeds.

One study per (method, dataset, regime, budget), named predictably, stored by URL (a sqlite file
in the work directory by default; PostgreSQL to share a study between machines). Each trial is
one run on the shared loop, logged as an MLflow child run of the study's parent run; the
selection criterion at each evaluation feeds the pruner. The study holds exactly `trials`
finished (complete or pruned) trials however many workers share it and however often the
command is interrupted and started again: a trial whose worker died is marked failed and
retried with the same parameters, and its run resumes from its last checkpoint.

Why `recover_dead_trials` is not Optuna's heartbeat (Optuna 5.0.0): `RDBStorage(
heartbeat_interval=..., grace_period=..., heartbeat_stale_trial_callback=
RetryHeartbeatStaleTrialCallback())` with `optuna.storages.fail_stale_trials` fails only trials
that have a recorded heartbeat (`RDBStorage._get_stale_trial_ids` skips the others), and only
`Study.optimize` records one: `optuna.study._optimize._run_trial` wraps each trial in the private
`optuna.storages._heartbeat.get_heartbeat_thread`. The workers here run trials by ask/tell (K
asked at once, a surplus one given up, the K trained stacked), which `optimize` cannot do; under
ask/tell `Study.ask` warns that the heartbeat "is supposed to be used with Study.optimize", and a
trial whose worker died stays RUNNING, so the study never reaches exactly `trials` finished
trials. Starting that private thread by hand would rest the resume guarantee on an undocumented,
experimental interface; the check of a dead pid on this host, which no heartbeat reports before
its grace period, would stay hand-written anyway; and `RetryHeartbeatStaleTrialCallback` copies
the dead trial's user attributes (its host and pid) into the retry, which that check would read
as dead again. tests/test_tuning.py::test_optuna_heartbeat_misses_a_dead_ask_tell_trial shows it.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import math
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import FrozenTrial, TrialState

from robustbench_mat.data import BenchmarkDataset, stable_hash
from robustbench_mat.errors import RunPruned, UserError
from robustbench_mat.evaluation import higher_is_better
from robustbench_mat.method import Method
from robustbench_mat.protocols import get_protocol
from robustbench_mat.registry import DATASETS, METHODS
from robustbench_mat.runner import (
    RunPlan,
    RunResult,
    RunSpec,
    dataset_pool,
    plan,
    run,
    run_many,
)
from robustbench_mat.tracking import TAGS, Tracker

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
LAUNCHERS = ("local", "slurm", "submitit-local")
PAPER_GRID_SIZE = 10
DEFAULT_TRIALS = 20


@dataclass
class TuneSpec:
    """What `robustbench-mat tune` is asked to do; run settings not tuned are fixed for all."""

    method: str
    dataset: str
    regime: str | None = None
    trials: int | None = None  # None: DEFAULT_TRIALS, or the grid's size with `grid`
    seeds: int = 3
    criterion: str | None = None
    steps: int | None = None
    eval_every: int | None = None
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    deterministic: bool = False
    num_workers: int | None = None  # loader workers of every run (None: the device's default)
    hparams: dict[str, Any] = field(default_factory=dict)
    data_params: dict[str, Any] = field(default_factory=dict)
    data_dir: str | None = None
    workdir: str | None = None
    storage: str | None = None
    grid: str | None = None
    sampler_seed: int = 0
    trial_seed: int = 0
    prune: bool = True
    workers: int = 1
    # GPU indices the local workers share, worker i on devices[i % len]; None: every visible GPU
    # when `device` is auto or cuda (a Slurm worker uses the GPU its job was given).
    devices: list[int] | None = None
    parallel_trials: int = 1  # trials each worker asks for at once and trains stacked
    # Trials and seed runs checkpoint at most this often: a trial of a small model takes
    # seconds, and writing at every evaluation cost more than its training.
    checkpoint_seconds: float = 60.0
    launcher: str = "local"
    slurm: dict[str, str] = field(default_factory=dict)
    stale_after: float = 600.0
    inference_hparams: dict[str, Any] = field(default_factory=dict)
    inference_steps: int | None = None
    inference_data: dict[str, Any] = field(default_factory=dict)
    inference_seed: int | None = None
    protocol: str = "default"
    show_progress: bool = True

    def run_spec(self, hparams: dict[str, Any], seed: int, kind: str, tags: dict) -> RunSpec:
        return RunSpec(
            method=self.method,
            dataset=self.dataset,
            seed=seed,
            regime=self.regime,
            criterion=self.criterion,
            steps=self.steps,
            eval_every=self.eval_every,
            checkpoint_seconds=self.checkpoint_seconds,
            device=self.device,
            precision=self.precision,
            compile=self.compile,
            deterministic=self.deterministic,
            num_workers=self.num_workers,
            hparams={**hparams, **self.hparams},
            data_params=dict(self.data_params),
            data_dir=self.data_dir,
            workdir=self.workdir,
            kind=kind,
            tags=tags,
            show_progress=False,
            inference_hparams=dict(self.inference_hparams),
            inference_steps=self.inference_steps,
            inference_data=dict(self.inference_data),
            inference_seed=self.inference_seed,
            protocol=self.protocol,
        )


@dataclass
class TuneResult:
    """The finished study and the runs of the best configuration over seeds."""

    study_name: str
    storage: str
    best_params: dict[str, Any]
    best_value: float
    finished_trials: int
    final_runs: list[RunResult]
    parent_run_id: str


# --- the study --------------------------------------------------------------------------------
def with_protocol_grid(spec: TuneSpec) -> TuneSpec:
    """`spec` with its protocol's grid (`--protocol paper`: the paper's) unless it names one."""
    if spec.grid is not None or spec.protocol == "default":
        return spec
    grid = get_protocol(spec.protocol, DATASETS.get(spec.dataset)).grid
    return dataclasses.replace(spec, grid=grid)


def base_plan(spec: TuneSpec) -> RunPlan:
    """Validates the spec against the plugins and regimes before anything starts."""
    check_storage(spec.storage)
    counts = (spec.seeds, spec.workers, spec.parallel_trials)
    if (spec.trials is not None and spec.trials < 1) or min(counts) < 1:
        raise UserError("--trials, --seeds, --workers and --parallel-trials must be at least 1")
    if spec.launcher not in LAUNCHERS:
        raise UserError(f"--launcher must be one of {', '.join(LAUNCHERS)}")
    if spec.grid not in (None, "paper"):
        raise UserError(f"--grid must be 'paper', got {spec.grid!r}")
    if spec.grid == "paper" and spec.trials not in (None, PAPER_GRID_SIZE):
        raise UserError(
            f"--grid paper runs its {PAPER_GRID_SIZE} configurations: leave out --trials "
            f"(or give --trials {PAPER_GRID_SIZE}), got --trials {spec.trials}"
        )
    return plan(spec.run_spec({}, spec.trial_seed, "trial", {}))


def search_space(the_plan: RunPlan, fixed: dict[str, Any]) -> dict[str, BaseDistribution]:
    space = the_plan.method_cls.search_space(the_plan.dataset)
    space = {name: dist for name, dist in space.items() if name not in fixed}
    if not space:
        raise UserError(
            f"method {the_plan.method_name!r} has nothing left to tune on "
            f"{the_plan.dataset.name} once {', '.join(fixed)} are fixed"
        )
    return space


def trial_space(spec: TuneSpec, the_plan: RunPlan) -> dict[str, BaseDistribution]:
    """The distributions every trial asks Optuna for: the grid's own under `--grid paper` (the
    method's settings the grid does not set keep their defaults), else the method's search space."""
    if spec.grid == "paper":
        return paper_space(the_plan.method_cls, the_plan.dataset, spec.hparams)
    return search_space(the_plan, spec.hparams)


def study_name(spec: TuneSpec, the_plan: RunPlan) -> str:
    """`<method>.<dataset>.<regime>.steps<N>.<hash>`, the hash covering the code (a study never
    mixes trials of two versions of a method) and every other fixed setting."""
    name = (
        f"{the_plan.method_name}.{the_plan.dataset.name}.{the_plan.regime.name}."
        f"steps{the_plan.steps}"
    )
    fixed = {
        "code": the_plan.code.fingerprint,
        "protocol": spec.protocol,
        "data": spec.data_params,
        "fixed": spec.hparams,
        "criterion": the_plan.criterion,
        "eval_every": the_plan.eval_every,
        "grid": spec.grid,
        "seed": spec.trial_seed,
        "inference": the_plan.inference_settings(),
        "device": the_plan.device.type,
    }
    return f"{name}.{stable_hash(fixed, 8)}"


STORAGE_FORMS = "sqlite:///path/to/optuna.db or postgresql://user:password@host/database"


def check_storage(url: str | None) -> None:
    """Fail in one line unless `url` (--storage) is a database URL that Optuna can open: one
    SQLAlchemy parses, of a database kind whose driver is installed, and for a sqlite file, in
    an existing folder."""
    if url is None:
        return
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise UserError(
            f"--storage {url!r} is not a database URL; expected {STORAGE_FORMS}"
        ) from None
    shown = parsed.render_as_string(hide_password=True)
    try:
        dialect = parsed.get_dialect()
    except NoSuchModuleError:
        raise UserError(
            f"--storage {shown}: unknown database kind {parsed.drivername!r}; expected "
            f"{STORAGE_FORMS}"
        ) from None
    try:
        dialect.import_dbapi()
    except ImportError as error:
        raise UserError(
            f"--storage {shown}: its database driver is not installed ({error}); install it, "
            "or use postgresql+psycopg://... (pip install 'robustbench-mat[postgres]')"
        ) from None
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        folder = Path(parsed.database).absolute().parent
        if not folder.is_dir():
            raise UserError(
                f"--storage {shown}: folder {folder} does not exist; create it or choose "
                "another path"
            )


def storage_url(spec: TuneSpec, workdir: Path) -> str:
    return spec.storage or f"sqlite:///{workdir / 'optuna.db'}"


def open_study(spec: TuneSpec, the_plan: RunPlan, worker: int = 0) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    the_plan.workdir.mkdir(parents=True, exist_ok=True)
    direction = "maximize" if higher_is_better(the_plan.criterion) else "minimize"
    pruner = (
        optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0)
        if spec.prune
        else optuna.pruners.NopPruner()
    )
    study = optuna.create_study(
        study_name=study_name(spec, the_plan),
        storage=storage_url(spec, the_plan.workdir),
        direction=direction,
        pruner=pruner,
        load_if_exists=True,
    )
    # A process that resumes a study must not replay the random stream of the first one (it
    # would propose the same configurations again): the seed also depends on the progress.
    progress = len(study.get_trials(deepcopy=False))
    seed = int(stable_hash({"seed": spec.sampler_seed, "worker": worker, "n": progress}), 16)
    # Trials asked together are proposed before any of them reports: the constant liar keeps
    # TPE from proposing the same configuration to all of them.
    study.sampler = optuna.samplers.TPESampler(
        seed=seed % 2**31, constant_liar=spec.parallel_trials > 1
    )
    return study


# --- the paper's grid -------------------------------------------------------------------------
# The random grid of the MAT code (registry.py, the same as XRM's): configuration `combo` draws
# from numpy's RandomState(combo), in this order, lr = 10^U(lr range) and batch size =
# int(2^U(batch range)) by model family, weight decay = 10^U(-6, -3), then (GroupDRO) eta =
# 10^U(-3, -1); MAT's temperature is a choice from a fresh RandomState(combo).
PAPER_FAMILY_RANGES = {  # family: (exponents of 10 of lr, exponents of 2 of the batch size)
    "image": ((-5, -3), (5, 7)),
    "text": ((-6, -4), (4, 6)),
    "mlp": ((-5, -3), (3, 6)),
}
PAPER_WEIGHT_DECAY = (-6, -3)  # exponents of 10
PAPER_ETA = (-3, -1)  # exponents of 10
PAPER_TEMPERATURES = (0.001, 0.01, 0.1)
# Method settings the code draws for one method only (and here for the methods built on it: XRM
# is GroupDRO on inferred groups). Another method's setting of the same name (LC's temperature)
# is not the grid's and keeps its default.
PAPER_METHOD_SETTINGS = {"eta": "groupdro", "temperature": "mat"}


def paper_configuration(combo: int, family: str) -> dict[str, Any]:
    """Configuration `combo` of the MAT/XRM code's random grid (numpy RandomState(combo)):
    lr, batch size and weight decay by model family, then GroupDRO's eta; MAT's temperature
    comes from a fresh RandomState(combo)."""
    rs = np.random.RandomState(combo)
    lr_range, batch_range = PAPER_FAMILY_RANGES[family]
    config: dict[str, Any] = {
        "lr": 10 ** rs.uniform(*lr_range),
        "batch_size": int(2 ** rs.uniform(*batch_range)),
        "weight_decay": 10 ** rs.uniform(*PAPER_WEIGHT_DECAY),
    }
    if family == "text":
        rs.choice([0.0, 0.1, 0.5])  # the code draws a last-layer dropout it never applies
    config["eta"] = 10 ** rs.uniform(*PAPER_ETA)
    config["temperature"] = float(np.random.RandomState(combo).choice(PAPER_TEMPERATURES))
    return config


def paper_distributions(family: str) -> dict[str, BaseDistribution]:
    """The ranges the grid draws each setting from, as Optuna distributions: every grid value
    lies in its own (a method's search space need not hold them: the grid's batch sizes are any
    integer of the family's range, a search space's a few categories)."""
    (lr_low, lr_high), (batch_low, batch_high) = PAPER_FAMILY_RANGES[family]
    return {
        "lr": FloatDistribution(10.0**lr_low, 10.0**lr_high, log=True),
        "batch_size": IntDistribution(2**batch_low, 2**batch_high, log=True),
        "weight_decay": FloatDistribution(
            10.0 ** PAPER_WEIGHT_DECAY[0], 10.0 ** PAPER_WEIGHT_DECAY[1], log=True
        ),
        "eta": FloatDistribution(10.0 ** PAPER_ETA[0], 10.0 ** PAPER_ETA[1], log=True),
        "temperature": CategoricalDistribution(PAPER_TEMPERATURES),
    }


def paper_settings(
    method_cls: type[Method], dataset: BenchmarkDataset, fixed: dict[str, Any]
) -> list[str]:
    """The settings the grid sets for `method_cls` on `dataset`: the grid's settings that the
    method has, less the fixed ones and those drawn for another method. The method's other
    settings keep their defaults."""
    family = dataset.hparam_family
    if family not in PAPER_FAMILY_RANGES:
        raise UserError(
            f"--grid paper has no ranges for {dataset.name}'s model family {family!r}; "
            f"it knows {', '.join(PAPER_FAMILY_RANGES)}"
        )
    specs = method_cls.hparam_specs(dataset)
    settings = []
    for name in paper_distributions(family):
        owner = PAPER_METHOD_SETTINGS.get(name)
        if name not in specs or name in fixed:
            continue
        if owner is not None and not issubclass(method_cls, METHODS.get(owner)):
            continue
        settings.append(name)
    return settings


def paper_space(
    method_cls: type[Method], dataset: BenchmarkDataset, fixed: dict[str, Any]
) -> dict[str, BaseDistribution]:
    """The distributions of the settings the grid sets (see `paper_settings`)."""
    settings = paper_settings(method_cls, dataset, fixed)
    if not settings:
        raise UserError(
            f"--grid paper has nothing left to set for method {method_cls.name!r} "
            f"on {dataset.name} once {', '.join(fixed)} are fixed"
        )
    distributions = paper_distributions(dataset.hparam_family)
    return {name: distributions[name] for name in settings}


def paper_grid(
    method_cls: type[Method], dataset: BenchmarkDataset, fixed: dict[str, Any]
) -> list[dict[str, Any]]:
    """The 10 configurations of the paper's grid, restricted to `paper_settings`."""
    settings = paper_settings(method_cls, dataset, fixed)
    configurations = [
        paper_configuration(combo, dataset.hparam_family) for combo in range(PAPER_GRID_SIZE)
    ]
    return [{k: v for k, v in config.items() if k in settings} for config in configurations]


# --- trials -----------------------------------------------------------------------------------
def recover_dead_trials(study: optuna.Study, stale_after: float) -> int:
    """Mark failed, and enqueue again with the same parameters, every running trial whose
    worker is gone: a dead process on this host, or no sign of life for `stale_after` s."""
    storage = study._storage  # noqa: SLF001 - Optuna exposes no public setter of trial states
    host, now, recovered = socket.gethostname(), time.time(), 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = trial.user_attrs
        dead_here = attrs.get("host") == host and "pid" in attrs and not _pid_alive(attrs["pid"])
        silent = now - attrs.get("alive", attrs.get("started", now)) > stale_after
        if not (dead_here or silent):
            continue
        try:
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)  # noqa: SLF001
        except RuntimeError:  # finished or failed meanwhile by another worker
            continue
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
        recovered += 1
    return recovered


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _slots_taken(study: optuna.Study) -> int:
    states = (*FINISHED, TrialState.RUNNING)
    return len(study.get_trials(deepcopy=False, states=states))


def target_trials(spec: TuneSpec) -> int:
    """How many finished trials the study ends with: the grid's size under `--grid paper`
    (`base_plan` refuses any other `--trials`), else `--trials` (default DEFAULT_TRIALS)."""
    if spec.grid == "paper":
        return PAPER_GRID_SIZE
    return DEFAULT_TRIALS if spec.trials is None else spec.trials


def ask_trial(study: optuna.Study, space: dict[str, BaseDistribution]) -> optuna.Trial:
    """`study.ask(space)`, except that a value Optuna refuses (its ValueError: say an enqueued
    value outside its distribution) fails the trial, queues its enqueued values again for a
    later attempt, and raises a one-line `UserError`."""
    trial = study.ask()
    try:
        for name, distribution in space.items():
            trial._suggest(name, distribution)  # noqa: SLF001 - what study.ask(space) does
    except ValueError as error:
        enqueued = trial._fixed_params  # noqa: SLF001 - the values of an enqueued trial
        study.tell(trial, state=TrialState.FAIL)
        if enqueued:
            study.enqueue_trial(enqueued, user_attrs={"retry_of": trial.number})
        reason = " ".join(str(error).split())
        raise UserError(
            f"study {study.study_name}: Optuna refused trial {trial.number}'s settings: {reason}"
        ) from None
    return trial


def worker_loop(spec: TuneSpec, worker: int = 0, log: Callable[[str], None] = print) -> None:
    """Run trials until the study holds `target_trials(spec)` finished or running trials. The
    worker's trials load their dataset once (`dataset_pool`)."""
    with dataset_pool():
        _work(spec, worker, log)


def _work(spec: TuneSpec, worker: int, log: Callable[[str], None]) -> None:
    the_plan = base_plan(spec)
    study = open_study(spec, the_plan, worker)
    space = trial_space(spec, the_plan)
    parent = study.user_attrs.get("mlflow_parent_run_id")
    if parent is None:  # the study's name hashes the code: it changed since `tune` started
        raise UserError(
            f"worker {worker} found no study {study.study_name} started by `tune`: the source "
            "code changed while the command ran; run the same command again"
        )
    target = target_trials(spec)
    while True:
        recover_dead_trials(study, spec.stale_after)
        trials = _ask_batch(study, space, spec.parallel_trials, target)
        if not trials:
            return
        _run_trials(spec, study, trials, parent, target, log)


def _ask_batch(
    study: optuna.Study, space: dict[str, BaseDistribution], size: int, target: int
) -> list[optuna.Trial]:
    """Up to `size` new trials while the study has fewer than `target` finished or running
    ones (enqueued trials always run). The study is read three times per batch, not three
    times per trial; a trial that another worker's trials pushed past `target` meanwhile is
    given up (told failed, tagged `surplus`), with every later one of the batch."""
    taken = _slots_taken(study)
    waiting = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
    trials = []
    for _ in range(size):
        if taken >= target and not waiting:
            break
        trials.append(ask_trial(study, space))
        taken, waiting = taken + 1, max(0, waiting - 1)
    if not trials:
        return trials
    states = (*FINISHED, TrialState.RUNNING)
    numbers = sorted(t.number for t in study.get_trials(deepcopy=False, states=states))
    for k, trial in enumerate(trials):
        if bisect.bisect_left(numbers, trial.number) >= target:
            for surplus in trials[k:]:
                surplus.set_user_attr("surplus", True)
                study.tell(surplus, state=TrialState.FAIL)
            return trials[:k]
    return trials


def _run_trials(
    spec: TuneSpec,
    study: optuna.Study,
    trials: list[optuna.Trial],
    parent: str,
    target: int,
    log: Callable[[str], None],
) -> None:
    """Train `trials` (together where their models stack), each its own run, and tell Optuna
    each outcome; a pruned trial stops alone. The first failure is raised once every trial
    has been told."""
    the_plan = base_plan(spec)
    criterion = the_plan.criterion
    specs = []
    for trial in trials:
        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr("started", time.time())
        trial.set_user_attr("host", socket.gethostname())  # last: with it, the others are set
        tags = {
            "mlflow.parentRunId": parent,
            "robustbench.study": study.study_name,
            "robustbench.trial": trial.number,
        }
        run_spec = spec.run_spec(dict(trial.params), spec.trial_seed, "trial", tags)
        run_spec.on_evaluation = _reporter(trial, criterion, spec.stale_after, spec.prune)
        specs.append(run_spec)
    outcomes = run_many(specs) if len(specs) > 1 else [_outcome(run, specs[0])]
    failure = None
    # One read of the study for the progress lines, not two per trial (each a database query);
    # trials that other workers finish meanwhile show in the next batch's lines.
    done = study.get_trials(deepcopy=False, states=FINISHED)
    finished = len(done)
    pick = max if study.direction == optuna.study.StudyDirection.MAXIMIZE else min
    values = [t.value for t in done if t.state == TrialState.COMPLETE]
    best = pick(values) if values else None
    for trial, outcome in zip(trials, outcomes, strict=True):
        if isinstance(outcome, RunPruned):
            study.tell(trial, state=TrialState.PRUNED)
            finished += 1
            log(f"trial {trial.number}: pruned")
            continue
        if isinstance(outcome, BaseException):
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            failure = failure or outcome
            continue
        trial.set_user_attr("mlflow_run_id", outcome.run_id)
        value = outcome.selected[criterion]
        study.tell(trial, value)
        finished, best = finished + 1, value if best is None else pick(best, value)
        log(
            f"trial {trial.number} ({finished} of {target} finished): {criterion} = "
            f"{value:.4f} with {_short(trial.params)}; best so far {best:.4f}"
        )
    if failure is not None:
        raise failure


def _reporter(
    trial: optuna.Trial, criterion: str, stale_after: float, prune: bool
) -> Callable[[dict[str, Any]], None]:
    """Reports each evaluation to Optuna and stops the trial's model when it is pruned; without
    pruning, nothing is reported (a database commit per evaluation that no pruner reads: the
    history is in the trial's MLflow run). The trial's sign of life ("alive") is written at
    most every `stale_after / 4` seconds (one commit fewer per evaluation of a fast trial)."""
    every = min(60.0, stale_after / 4)
    last_sign = -math.inf

    def report(record: dict[str, Any]) -> None:
        nonlocal last_sign
        now = time.time()
        if now - last_sign >= every:
            trial.set_user_attr("alive", now)
            last_sign = now
        if not prune:
            return
        trial.report(record[criterion], record["step"])
        if trial.should_prune():
            raise RunPruned(f"trial {trial.number} pruned at step {record['step']}")

    return report


def _outcome(function: Callable[[RunSpec], RunResult], spec: RunSpec) -> RunResult | Exception:
    try:
        return function(spec)
    except RunPruned as pruned:
        return pruned


def _short(params: dict[str, Any]) -> str:
    return ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
    )


# --- workers ----------------------------------------------------------------------------------
def worker_device(spec: TuneSpec, worker: int, gpus: int) -> str:
    """The `--device` of local worker `worker` on a machine with `gpus` visible GPUs: GPU
    `devices[worker % len(devices)]` (by default every visible GPU in turn) when the spec asks
    for CUDA or auto and there is one; otherwise the spec's own device."""
    if spec.device == "cpu" or (spec.device == "auto" and gpus == 0):
        return spec.device
    if spec.device not in ("auto", "cuda"):
        return spec.device  # an explicit cuda:N pins every worker
    devices = spec.devices if spec.devices else list(range(gpus))
    if not devices:
        return spec.device
    unknown = [d for d in devices if not 0 <= d < gpus]
    if unknown:
        raise UserError(
            f"--devices {','.join(map(str, spec.devices or []))}: GPU(s) {unknown} not visible "
            f"here ({gpus} visible: 0 to {gpus - 1}; CUDA_VISIBLE_DEVICES renumbers them)"
        )
    return f"cuda:{devices[worker % len(devices)]}"


def _worker_main(spec_fields: dict[str, Any], worker: int) -> str | None:
    """Entry point of a worker process (local or on a cluster): None, or the message of the
    `UserError` that stopped it."""
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, spec_fields["workers"])))
    try:
        spec = TuneSpec(**spec_fields)
        if spec.launcher != "slurm":
            gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
            spec = dataclasses.replace(spec, device=worker_device(spec, worker, gpus))
        worker_loop(spec, worker, log=lambda line: print(line, flush=True))
    except UserError as error:
        return str(error)
    return None


def _worker_process(spec_fields: dict[str, Any], worker: int) -> None:
    """A local worker process: its `UserError` is one line on stderr and exit status 1."""
    message = _worker_main(spec_fields, worker)
    if message is not None:
        print(f"robustbench-mat: error: worker {worker}: {message}", file=sys.stderr, flush=True)
        sys.exit(1)


def launch_workers(spec: TuneSpec, workdir: Path, log: Callable[[str], None] = print) -> None:
    fields = dataclasses.asdict(spec)
    if spec.workers == 1 and spec.launcher == "local":
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        worker_loop(dataclasses.replace(spec, device=worker_device(spec, 0, gpus)), log=log)
        return
    if spec.launcher == "local":
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        processes = [
            context.Process(target=_worker_process, args=(fields, i)) for i in range(spec.workers)
        ]
        for process in processes:
            process.start()
        for process in processes:
            process.join()
        failed = [p.exitcode for p in processes if p.exitcode != 0]
        if failed:
            raise UserError(
                f"{len(failed)} tuning worker(s) failed (exit codes {failed}); "
                "run the same command again to retry their trials"
            )
        return
    import submitit

    folder = workdir / "submitit"
    if spec.launcher == "slurm":
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
        executor.update_parameters(**{f"slurm_{k}": v for k, v in spec.slurm.items()})
    else:
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=int(spec.slurm.get("time", 60)))
    jobs = [executor.submit(_worker_main, fields, i) for i in range(spec.workers)]
    messages = [message for message in (job.result() for job in jobs) if message is not None]
    if messages:
        raise UserError(
            f"{len(messages)} tuning worker(s) failed, the first with: {messages[0]}; "
            "run the same command again to retry their trials"
        )


# --- the command ------------------------------------------------------------------------------
def tune(spec: TuneSpec, log: Callable[[str], None] = print) -> TuneResult:
    """Tune, then re-run the best configuration for `spec.seeds` seeds (0, 1, ...)."""
    spec = with_protocol_grid(spec)
    the_plan = base_plan(spec)
    trial_space(spec, the_plan)
    study = open_study(spec, the_plan)
    tracker = Tracker(the_plan.workdir)
    parent = _parent_run(study, tracker, the_plan)
    if spec.grid == "paper" and not study.user_attrs.get("grid_enqueued"):
        for config in paper_grid(the_plan.method_cls, the_plan.dataset, spec.hparams):
            study.enqueue_trial(config)
        study.set_user_attr("grid_enqueued", True)
    target = target_trials(spec)
    recovered = recover_dead_trials(study, spec.stale_after)
    if recovered:
        log(f"{recovered} interrupted trial(s) marked failed and queued again")
    log(
        f"study {study.study_name} in {storage_url(spec, the_plan.workdir)}: "
        f"{len(study.get_trials(states=FINISHED))} of {target} trials finished"
    )
    with _failing_parent(tracker, parent):
        launch_workers(spec, the_plan.workdir, log)

    finished = study.get_trials(states=FINISHED)
    if len(finished) < target or not study.get_trials(states=(TrialState.COMPLETE,)):
        raise UserError(
            f"study {study.study_name} has {len(finished)} of {target} finished trials "
            "(some are still running elsewhere or failed); run the same command again"
        )
    best = study.best_trial
    with _failing_parent(tracker, parent), dataset_pool():
        finals = _final_runs(spec, study, best, parent, tracker, log)
    _close_parent(tracker, parent, study, best, finals, the_plan.criterion)
    return TuneResult(
        study.study_name,
        storage_url(spec, the_plan.workdir),
        best.params,
        best.value,
        len(finished),
        finals,
        parent,
    )


def _parent_run(study: optuna.Study, tracker: Tracker, the_plan: RunPlan) -> str:
    parent = study.user_attrs.get("mlflow_parent_run_id")
    if parent is None:
        tags = {
            TAGS.METHOD: the_plan.method_name,
            TAGS.DATASET: the_plan.dataset.name,
            TAGS.REGIME: the_plan.regime.name,
            TAGS.CRITERION: the_plan.criterion,
            TAGS.KIND: "study",
            "robustbench.study": study.study_name,
        }
        parent = tracker.start(
            the_plan.dataset.name,
            f"tune {study.study_name}",
            tags,
            {"study": study.study_name, "direction": study.direction.name},
        )
        study.set_user_attr("mlflow_parent_run_id", parent)
    elif tracker.client.get_run(parent).info.status == "FAILED":  # the study resumes
        tracker.client.update_run(parent, status="RUNNING")
        tracker.set_tags(parent, {TAGS.STATE: "running"})
    return parent


@contextlib.contextmanager
def _failing_parent(tracker: Tracker, parent: str) -> Iterator[None]:
    """Mark the study's MLflow parent run FAILED when a `UserError` (a trial refused by Optuna,
    a failed run or worker) leaves the block; the same command resumes the study."""
    try:
        yield
    except UserError:
        tracker.end_after_error(parent, "failed")
        raise


def _final_runs(
    spec: TuneSpec,
    study: optuna.Study,
    best: FrozenTrial,
    parent: str,
    tracker: Tracker,
    log: Callable[[str], None],
) -> list[RunResult]:
    """The best configuration for seeds 0..S-1, each tagged `robustbench.final=true`. The run
    of the trial seed is the best trial's own run (identical settings), tagged, not retrained."""
    tags = {
        "mlflow.parentRunId": parent,
        "robustbench.study": study.study_name,
        "robustbench.best_trial": best.number,
        TAGS.FINAL: "true",
    }
    specs = [spec.run_spec(dict(best.params), seed, "final", tags) for seed in range(spec.seeds)]
    outcomes = run_many(specs) if spec.parallel_trials > 1 else [run(s) for s in specs]
    finals = []
    for seed, result in enumerate(outcomes):
        if isinstance(result, BaseException):
            raise result
        tracker.set_tags(result.run_id, tags)
        finals.append(result)
        log(
            f"final run seed {seed}: test_avg {result.selected['test_avg']:.4f}, "
            f"test_wga {result.selected['test_wga']:.4f}"
        )
    return finals


def _close_parent(
    tracker: Tracker,
    parent: str,
    study: optuna.Study,
    best: FrozenTrial,
    finals: list[RunResult],
    criterion: str,
) -> None:
    metrics: dict[str, float] = {"best_value": best.value, "best_trial": best.number}
    for key in ("test_avg", "test_wga", criterion):
        values = [r.selected[key] for r in finals if key in r.selected]
        if values:
            metrics[f"final_{key}_mean"] = statistics.mean(values)
            metrics[f"final_{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    # The study's row in the MLflow UI shows the same headline columns as its runs.
    metrics.update(
        {
            k: metrics[f"final_{k}_mean"]
            for k in ("test_avg", "test_wga")
            if f"final_{k}_mean" in metrics
        }
    )
    tracker.log_metrics(parent, metrics)
    tracker.set_tags(parent, {f"best.{k}": v for k, v in best.params.items()})
    tracker.end(parent, "finished")
