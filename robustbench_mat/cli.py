"""The `robustbench-mat` command line."""

from __future__ import annotations

import argparse
import difflib
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from tabulate import tabulate

from robustbench_mat.errors import UserError
from robustbench_mat.hparams import MAX_SEED, parse_assignments
from robustbench_mat.protocols import PROTOCOLS
from robustbench_mat.provenance import package_version
from robustbench_mat.regimes import REGIMES
from robustbench_mat.registry import DATASETS, plugin_listing


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, like every other error of the command."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _integer(low: int, high: int | None = None, noun: str = "an integer") -> Callable[[str], int]:
    """An argparse type: an integer in [low, high] (no upper limit when high is None)."""
    allowed = f"{noun} >= {low}" if high is None else f"{noun} from {low} to {high}"

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}")
        return value

    return convert


def _finite_float(positive: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite float, > 0 if `positive`."""
    allowed = "a finite number" + (" > 0" if positive else "")

    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or (positive and value <= 0):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}")
        return value

    return convert


class _Deprecated(argparse.Action):
    """An old spelling of an option: stores its value and says on stderr, in one line, which
    spelling replaces it."""

    def __init__(self, option_strings: list[str], dest: str, use: str, **kwargs) -> None:
        self.use = use
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        command = parser.prog.removeprefix("robustbench-mat ")
        print(
            f"robustbench-mat: warning: `{command} {option_string}` is deprecated; use {self.use}",
            file=sys.stderr,
        )
        setattr(namespace, self.dest, values)


# The selection criteria of evaluation.VALIDATION_CRITERIA and .PER_GROUP_CRITERIA (which import
# torch, so not at start-up; tests/test_cli.py checks that the lists agree).
CRITERIA = (
    "val_wga",
    "val_worst_class",
    "val_avg",
    "val_avg_train_weighted",
    "val_inferred_wga",
    "val_inferred_balanced",
    "val_mse",
)
CRITERION_PREFIXES = ("val_group_acc.", "val_class_acc.", "val_inferred_group_acc.")
CRITERIA_TEXT = ", ".join(CRITERIA) + ", or " + ", ".join(p + "<group>" for p in CRITERION_PREFIXES)
CRITERION_HELP = (
    f"model selection criterion, a validation metric: {CRITERIA_TEXT} (default: the regime's, "
    "val_wga in full and val-only, val_inferred_wga in none; val_mse for regression)"
)


def _criterion(text: str) -> str:
    """An argparse type: a selection criterion the evaluator produces."""
    if text in CRITERIA or any(text.startswith(p) and text != p for p in CRITERION_PREFIXES):
        return text
    if not text.startswith("val_"):
        why = "must be a validation metric (selecting on train or test data is not model selection)"
    else:
        close = difflib.get_close_matches(text, CRITERIA, n=1)
        why = "unknown criterion" + (f" (did you mean {close[0]}?)" if close else "")
    raise argparse.ArgumentTypeError(f"{why}: {text!r}; valid: {CRITERIA_TEXT}")


# Seeds: numpy's seed range, which training.seed_everything and the datasets accept unchanged.
SEED = _integer(0, MAX_SEED, "a seed")
POSITIVE = _integer(1)
NON_NEGATIVE = _integer(0)
PORT = _integer(1, 65535, "a port")


def _add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    """The settings of the group-inference run (XRM) that mat, xrm and the val_inferred_*
    criteria use."""
    parser.add_argument(
        "--infer-set",
        dest="inference_hparams",
        action="extend",
        nargs="+",
        metavar="KEY=VALUE",
        help="settings of the group-inference run, e.g. lr=0.01 zero_init_head=true",
    )
    parser.add_argument(
        "--infer-steps",
        dest="inference_steps",
        type=POSITIVE,
        help="training steps of the group-inference run (default: the dataset's)",
    )
    parser.add_argument(
        "--infer-data",
        dest="inference_data",
        action="extend",
        nargs="+",
        metavar="KEY=VALUE",
        help="dataset parameters of the group-inference run, e.g. features=resnet50",
    )
    parser.add_argument(
        "--infer-seed",
        dest="inference_seed",
        type=SEED,
        help="one group-inference run with this seed for every seed (the paper: 0); "
        "default: each seed infers its own groups",
    )


def _add_protocol_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="default",
        help="paper: the MAT/XRM code's budget, optimiser, data per phase, one inference seed "
        "(0) and, when tuning, its 10-configuration grid; flags you give still win",
    )


def _inference_settings(args: argparse.Namespace) -> dict:
    """The group-inference fields of a RunSpec or TuneSpec, from the parsed flags."""
    return {
        "inference_hparams": parse_assignments(args.inference_hparams, "--infer-set"),
        "inference_steps": args.inference_steps,
        "inference_data": parse_assignments(args.inference_data, "--infer-data"),
        "inference_seed": args.inference_seed,
    }


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", required=True, help="method name (see `list`)")
    parser.add_argument("--dataset", required=True, help="dataset name (see `list`)")
    parser.add_argument(
        "--seed", type=SEED, default=0, help=f"training seed, 0 to {MAX_SEED} (default 0)"
    )
    parser.add_argument(
        "--regime",
        choices=list(REGIMES),
        help="annotation regime: full (groups in train and val), val-only, none; "
        "default full for methods that need training groups, else val-only",
    )
    parser.add_argument("--criterion", type=_criterion, help=CRITERION_HELP)
    parser.add_argument("--steps", type=POSITIVE, help="training steps (default: the dataset's)")
    parser.add_argument("--eval-every", type=POSITIVE, help="steps between evaluations")
    parser.add_argument("--checkpoint-every", type=POSITIVE, help="steps between checkpoints")
    parser.add_argument(
        "--stop-loss",
        type=_finite_float(),
        help="stop early once the training loss falls below this",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    _add_acceleration_arguments(parser)
    parser.add_argument(
        "--data-dir", help="where datasets live (default $ROBUSTBENCH_MAT_DATA or ./data)"
    )
    parser.add_argument(
        "--workdir",
        help="runs, checkpoints and the MLflow store "
        "(default $ROBUSTBENCH_MAT_WORKDIR or ./robustbench-runs)",
    )
    parser.add_argument(
        "--set",
        dest="hparams",
        action="extend",
        nargs="+",
        metavar="KEY=VALUE",
        help="hyperparameters, e.g. --set lr=0.01 batch_size=0",
    )
    parser.add_argument(
        "--data",
        dest="data_params",
        action="extend",
        nargs="+",
        metavar="KEY=VALUE",
        help="dataset parameters, e.g. --data noise_std=0",
    )
    _add_inference_arguments(parser)
    _add_protocol_argument(parser)
    parser.add_argument(
        "--infer-trials",
        type=POSITIVE,
        default=1,
        help="group-inference configurations to draw from its search space; the one with the "
        "best label-free score (XRM: final flip rate) is used (default 1: its defaults)",
    )
    parser.add_argument(
        "--restart",
        action="store_true",
        help="discard a finished or interrupted run with the same settings",
    )
    parser.add_argument(
        "--workers",
        action=_Deprecated,
        use="--loader-workers N",
        type=NON_NEGATIVE,
        dest="num_workers",
        default=argparse.SUPPRESS,
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_show_command(commands: argparse._SubParsersAction) -> None:
    show = commands.add_parser(
        "show",
        help="a method's settings (defaults, ranges, search space, help), regimes and criterion, "
        "or a dataset's parameters, groups and budget",
    )
    show.add_argument("name", help="method or dataset name (see `list`)")
    show.add_argument(
        "--dataset", help="for a method: the dataset its settings are shown on (default synthetic)"
    )
    show.add_argument(
        "--data",
        dest="data_params",
        action="extend",
        nargs="+",
        metavar="KEY=VALUE",
        help="dataset parameters, which some defaults depend on, e.g. --data features=resnet50",
    )
    show.add_argument("--data-dir", help="where to look for a dataset's prepared files")


def command_show(args: argparse.Namespace) -> int:
    from robustbench_mat.show import show

    data_params = parse_assignments(args.data_params, "--data")
    print(show(args.name, args.dataset, data_params, args.data_dir))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="robustbench-mat",
        description="Train and compare group-robustness methods under subpopulation shift.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = commands.add_parser("run", help="train one method on one dataset and record it")
    _add_run_arguments(run)
    commands.add_parser("list", help="list the methods and datasets with where they come from")
    _add_show_command(commands)
    experiment = commands.add_parser(
        "experiment",
        help="reproduce a figure of the MAT paper (figure1, figure3), or measure what methods "
        "memorize (memorization)",
    )
    experiment.add_argument("name", choices=("figure1", "figure3", "memorization"))
    experiment.add_argument(
        "--seeds",
        type=SEED,
        nargs="+",
        help=f"data and training seeds, 0 to {MAX_SEED} (figure1 default: 1234)",
    )
    experiment.add_argument("--workdir", help="as for `run`")
    experiment.add_argument("--device", default="auto", help="auto, cpu or cuda")
    experiment.add_argument(
        "--no-plot",
        dest="plot",
        action="store_false",
        help="skip the PNG files (the table is still written)",
    )
    experiment.add_argument("--quiet", action="store_true", help="no progress bars")
    memorization = experiment.add_argument_group(
        "memorization", "self-influence of every training example (Feldman & Zhang 2020)"
    )
    memorization.add_argument("--dataset", help="memorization: the dataset")
    memorization.add_argument(
        "--methods", nargs="+", default=["erm", "mat"], help="memorization: default erm mat"
    )
    memorization.add_argument(
        "--models",
        type=POSITIVE,
        help="memorization: models per method (64; with --estimator tracin, 1)",
    )
    memorization.add_argument(
        "--estimator",
        choices=("subsample", "tracin"),
        default="subsample",
        help="memorization: subsample (Feldman & Zhang's leave-out estimate, the default) or "
        "tracin (Pruthi et al.'s gradient approximation from saved snapshots, for large networks)",
    )
    memorization.add_argument(
        "--checkpoints",
        type=POSITIVE,
        default=10,
        help="memorization: snapshots per model for --estimator tracin (10)",
    )
    memorization.add_argument(
        "--fraction",
        type=_finite_float(positive=True),
        default=0.5,
        help="memorization: share of the training set each model trains on (0.5)",
    )
    memorization.add_argument(
        "--seed", type=SEED, default=0, help="memorization: subsets and models' seeds (0)"
    )
    memorization.add_argument("--regime", help="memorization: as for `run`")
    memorization.add_argument("--steps", type=POSITIVE, help="memorization: as for `run`")
    memorization.add_argument(
        "--set", dest="hparams", action="extend", nargs="+", metavar="KEY=VALUE"
    )
    memorization.add_argument(
        "--data", dest="data_params", action="extend", nargs="+", metavar="KEY=VALUE"
    )
    memorization.add_argument("--data-dir", help="memorization: as for `run`")
    _add_data_commands(commands)
    _add_tuning_commands(commands)
    board = commands.add_parser("leaderboard", help="the table of final runs, from MLflow")
    board.add_argument("--workdir", help="as for `run`")
    board.add_argument(
        "--format",
        default="markdown",
        choices=("markdown", "html", "latex", "csv"),
        help="markdown (default) prints the notes and the table; html, latex and csv print only "
        "the table on stdout (notes on stderr), so `> FILE` works",
    )
    board.add_argument(
        "--out", help="also write the table to this file (missing folders are created)"
    )
    board.add_argument(
        "--published",
        action="store_true",
        help="add the MAT paper's published rows, marked as such, with a column for each "
        "dataset they cover (unless --datasets is given); says which on stderr",
    )
    board.add_argument(
        "--average",
        default="plain",
        choices=("plain", "train-weighted"),
        help="which average accuracy to show (default plain)",
    )
    board.add_argument("--datasets", nargs="+", help="columns (default: every measured one)")
    board.add_argument(
        "--criterion",
        metavar="VAL_METRIC",
        help="re-select each final run's evaluation step by this validation metric (val_avg, "
        "val_worst_class, ...) from its recorded history.csv, ties to the later step, without "
        "re-tuning: the configurations (hyperparameters) stay as tuned under the original "
        "criterion. Rows whose regime withholds the group labels it reads are left empty, and "
        "runs that did not record it are left out, as stderr says",
    )
    board.add_argument(
        "--metrics",
        nargs="+",
        choices=("balanced", "worst_class"),
        metavar="METRIC",
        help="extra columns per dataset, mean ± std over seeds like avg and wga: balanced (the "
        "mean over classes of the test class accuracies) and/or worst_class (the lowest one)",
    )
    ui = commands.add_parser("ui", help="the MLflow UI on 127.0.0.1 for the work directory")
    ui.add_argument("--workdir", help="as for `run`")
    ui.add_argument("--port", type=PORT, default=5000, help="1 to 65535, free (default 5000)")
    return parser


def command_leaderboard(args: argparse.Namespace) -> int:
    from robustbench_mat.leaderboard.table import build, record
    from robustbench_mat.tracking import resolve_workdir, tracking_uri

    workdir = resolve_workdir(args.workdir)
    board = build(
        tracking_uri(workdir),
        args.average,
        args.published,
        args.datasets,
        criterion=args.criterion,
        extra=args.metrics or (),
    )
    # Only markdown, the default, mixes notes and table on stdout: the others are for `> FILE`.
    notes = sys.stdout if args.format == "markdown" else sys.stderr
    if board.cells.empty:
        raise UserError(
            f"no finished final runs in {tracking_uri(workdir)}; run `robustbench-mat tune` or "
            "`sweep` first (plain `run`s and tuning trials are not on the leaderboard)"
        )
    text = board.render(args.format).rstrip("\n")
    if args.out:
        _write_out(Path(args.out), text + "\n")
    if args.published:  # after any error, which stays one line
        print(board.published_note(), file=sys.stderr)
    for note in board.notes:
        print(note, file=sys.stderr)
    print(board.header() + "\n", file=notes)
    print(text)
    path, run_id = record(board, workdir, board.render("markdown"))
    print(
        f"\nwritten to {path}; logged as MLflow run {run_id} (experiment 'leaderboard')", file=notes
    )
    return 0


def _write_out(path: Path, text: str) -> None:
    """Write `--out`, creating its missing parent folders."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except (FileExistsError, NotADirectoryError):
        blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), path.parent)
        raise UserError(
            f"--out {path}: {blocking} is a file, not a folder; choose another path"
        ) from None
    except OSError as error:
        raise UserError(
            f"--out {path}: cannot write it ({error.strerror or error}); choose another path"
        ) from None


def command_ui(args: argparse.Namespace) -> int:
    from robustbench_mat.tracking import resolve_workdir
    from robustbench_mat.ui import serve_ui

    return serve_ui(resolve_workdir(args.workdir), args.port)


def _add_tuning_commands(commands: argparse._SubParsersAction) -> None:
    tune = commands.add_parser(
        "tune", help="tune one method with Optuna, then re-run the best settings over seeds"
    )
    tune.add_argument("--method", required=True, help="method name (see `list`)")
    tune.add_argument("--dataset", required=True, help="dataset name (see `list`)")
    tune.add_argument("--regime", choices=list(REGIMES), help="as for `run`")
    sweep = commands.add_parser(
        "sweep", help="tune every allowed (method, dataset, regime) combination"
    )
    sweep.add_argument(
        "--methods",
        nargs="+",
        required=True,
        help="method names, or `all`: every registered method that trains a classifier "
        "(all but group-inference methods such as xrm-infer)",
    )
    sweep.add_argument("--datasets", nargs="+", required=True)
    sweep.add_argument("--regimes", nargs="+", choices=list(REGIMES), default=list(REGIMES))
    reproduce = commands.add_parser(
        "reproduce",
        help="tune and run every row of the MAT paper's Table 1 that the harness implements for "
        "one dataset, under --protocol paper, and compare with the published numbers",
    )
    reproduce.add_argument("name", choices=("table1",))
    reproduce.add_argument(
        "--dataset", required=True, choices=("waterbirds", "celeba", "multinli", "civilcomments")
    )
    reproduce.add_argument("--methods", nargs="+", help="only the rows of these methods")
    reproduce.set_defaults(protocol="paper")
    for sub in (tune, sweep, reproduce):
        sub.add_argument(
            "--trials", type=POSITIVE, help="finished trials (default 20; --grid paper: its 10)"
        )
        sub.add_argument(
            "--n-seeds",
            dest="seeds",
            type=POSITIVE,
            default=3,
            metavar="N",
            help="how many seeds (0..N-1) re-run the best settings (default 3)",
        )
        sub.add_argument(
            "--seeds",
            action=_Deprecated,
            use="--n-seeds N",
            type=POSITIVE,
            dest="seeds",
            default=argparse.SUPPRESS,
            help=argparse.SUPPRESS,
        )
        sub.add_argument("--criterion", type=_criterion, help=CRITERION_HELP)
        sub.add_argument("--steps", type=POSITIVE, help="training steps per run")
        sub.add_argument("--eval-every", type=POSITIVE, help="steps between evaluations")
        sub.add_argument("--device", default="auto", help="auto, cpu or cuda")
        _add_acceleration_arguments(sub)
        sub.add_argument("--data-dir", help="where datasets live")
        sub.add_argument("--workdir", help="as for `run`")
        sub.add_argument(
            "--set",
            dest="hparams",
            action="extend",
            nargs="+",
            metavar="KEY=VALUE",
            help="settings fixed in every trial",
        )
        sub.add_argument(
            "--data",
            dest="data_params",
            action="extend",
            nargs="+",
            metavar="KEY=VALUE",
            help="dataset parameters",
        )
        _add_inference_arguments(sub)
        if sub is not reproduce:
            _add_protocol_argument(sub)
        sub.add_argument(
            "--storage",
            help="Optuna storage URL (default sqlite in the workdir; "
            "postgresql://... to share a study between machines)",
        )
        sub.add_argument(
            "--grid",
            choices=("paper",),
            help="the 10 seeded configurations of the MAT/XRM code instead of TPE",
        )
        sub.add_argument("--workers", type=POSITIVE, default=1, help="worker processes (default 1)")
        sub.add_argument(
            "--devices",
            type=_gpu_list,
            metavar="0,1,...",
            help="GPUs the local workers share, worker i on the i-th modulo their number "
            "(default: every visible GPU with --device auto or cuda)",
        )
        sub.add_argument(
            "--parallel-trials",
            type=POSITIVE,
            default=1,
            metavar="K",
            help="trials each worker trains at once, as one stack of models where the method "
            "and network allow it (default 1)",
        )
        sub.add_argument(
            "--checkpoint-seconds",
            type=_finite_float(positive=False),
            default=60.0,
            metavar="S",
            help="write a trial's checkpoint at most every S seconds (default 60; 0: at every "
            "evaluation); an interrupted trial resumes from its last one",
        )
        sub.add_argument(
            "--launcher",
            default="local",
            choices=("local", "slurm", "submitit-local"),
            help="where workers run (slurm: via submitit)",
        )
        sub.add_argument(
            "--slurm",
            action="extend",
            nargs="+",
            metavar="KEY=VALUE",
            help="submitit Slurm parameters, e.g. partition=gpu time=240",
        )
        sub.add_argument(
            "--no-prune",
            dest="prune",
            action="store_false",
            help="never stop a trial early (default: median pruner)",
        )
        sub.add_argument(
            "--sampler-seed", type=SEED, default=0, help=f"TPE seed, 0 to {MAX_SEED} (default 0)"
        )
        sub.add_argument(
            "--stale-after",
            type=_finite_float(positive=True),
            default=600.0,
            help="seconds without news after which a running trial counts as dead",
        )
        sub.add_argument("--quiet", action="store_true", help="only the summary")


def _loader_workers(text: str) -> int | None:
    """`auto` -> None (the default of `loading.resolve_loading`), else a count of 0 or more."""
    if text == "auto":
        return None
    try:
        return NON_NEGATIVE(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be auto or an integer >= 0, got {text!r}") from None


def _add_acceleration_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--loader-workers",
        type=_loader_workers,
        default=None,
        dest="num_workers",
        metavar="N",
        help="data-loading worker processes for on-disk inputs (images), in every pass "
        "(training, evaluation, stages, feature extraction); auto (default): the cores per GPU "
        "(at most 8) on CUDA, 0 on the CPU",
    )
    parser.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp16", "fp32"),
        default="auto",
        help="autocast precision on a GPU: auto is bf16 where the GPU has it natively, else fp16 "
        "with loss scaling; the CPU trains in fp32",
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the network(s) (GPU, opt-in)"
    )
    parser.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic kernels and no cuDNN autotuning: bitwise-repeatable GPU runs, slower",
    )


def _gpu_list(text: str) -> list[int]:
    """`0,1,3` -> [0, 1, 3]: GPU indices for --devices."""
    try:
        devices = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of GPU indices (e.g. 0,1)"
        ) from None
    if not devices or any(d < 0 for d in devices):
        raise argparse.ArgumentTypeError(f"{text!r}: give GPU indices 0 or more, e.g. 0,1")
    return devices


def _tune_spec(args: argparse.Namespace, method: str, dataset: str, regime: str | None):
    from robustbench_mat.tuning import TuneSpec

    return TuneSpec(
        method=method,
        dataset=dataset,
        regime=regime,
        trials=args.trials,
        seeds=args.seeds,
        criterion=args.criterion,
        steps=args.steps,
        eval_every=args.eval_every,
        device=args.device,
        precision=args.precision,
        compile=args.compile,
        deterministic=args.deterministic,
        num_workers=args.num_workers,
        hparams=parse_assignments(args.hparams, "--set"),
        data_params=parse_assignments(args.data_params, "--data"),
        data_dir=args.data_dir,
        workdir=args.workdir,
        storage=args.storage,
        grid=args.grid,
        sampler_seed=args.sampler_seed,
        prune=args.prune,
        workers=args.workers,
        devices=args.devices,
        parallel_trials=args.parallel_trials,
        checkpoint_seconds=args.checkpoint_seconds,
        launcher=args.launcher,
        slurm=parse_assignments(args.slurm, "--slurm"),
        stale_after=args.stale_after,
        protocol=args.protocol,
        **_inference_settings(args),
    )


def _tune_summary(results: list) -> str:
    import statistics

    rows = []
    for name, result in results:
        row = [name, result.finished_trials, f"{result.best_value:.4f}"]
        for key in ("test_avg", "test_wga"):
            values = [r.selected[key] for r in result.final_runs]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            row.append(f"{statistics.mean(values):.3f} ± {spread:.3f}")
        rows.append(row)
    headers = ("study", "trials", "best val", "final test avg", "final test wga")
    return tabulate(rows, headers=headers, disable_numparse=True)


def _require_data(dataset: str, data_dir: str | None) -> None:
    """Fail in seconds when an on-disk dataset is not prepared, before a backbone is fetched."""
    from robustbench_mat.runner import require_prepared_data

    require_prepared_data(DATASETS.get(dataset), data_dir)


def command_tune(args: argparse.Namespace) -> int:
    from robustbench_mat.tuning import check_storage, tune

    check_storage(args.storage)
    _require_data(args.dataset, args.data_dir)
    log = (lambda line: None) if args.quiet else (lambda line: print(line, flush=True))
    result = tune(_tune_spec(args, args.method, args.dataset, args.regime), log=log)
    print(_tune_summary([(result.study_name, result)]))
    print(f"best settings: {result.best_params}")
    print(f"study in {result.storage}; MLflow parent run {result.parent_run_id}")
    return 0


def command_sweep(args: argparse.Namespace) -> int:
    from robustbench_mat.tuning import base_plan, check_storage, tune, with_protocol_grid

    check_storage(args.storage)  # before the loop, which reports a combination's errors as skips
    log = (lambda line: None) if args.quiet else (lambda line: print(line, flush=True))
    results, skipped = [], []
    for dataset in args.datasets:
        for method in _sweep_methods(args.methods):
            for regime in args.regimes:
                spec = _tune_spec(args, method, dataset, regime)
                try:
                    _require_data(dataset, args.data_dir)
                    the_plan = base_plan(with_protocol_grid(spec))
                    if regime == "full" and not the_plan.method_cls.needs_train_groups:
                        raise UserError(
                            "it reads no training group labels, so `full` would repeat its "
                            "val-only runs"
                        )
                except UserError as reason:
                    skipped.append((f"{method} {dataset} {regime}", str(reason)))
                    log(f"skipping {method} on {dataset} in {regime}: {reason}")
                    continue
                result = tune(spec, log=log)
                results.append((result.study_name, result))
    print(_tune_summary(results))
    for name, reason in skipped:
        print(f"skipped {name}: {reason}")
    return 0


def _sweep_methods(names: list[str]) -> list[str]:
    """`names`, with `all` expanded to every registered method but group-inference ones."""
    if "all" not in names:
        return names
    from robustbench_mat.registry import METHODS

    every = [info.name for info in METHODS if not info.cls.infers_groups]
    return list(dict.fromkeys(n for name in names for n in (every if name == "all" else [name])))


def _add_data_commands(commands: argparse._SubParsersAction) -> None:
    for name, text in (
        ("download", "fetch, verify, extract and convert a dataset's upstream files"),
        ("prepare", "convert upstream files placed by hand (no network)"),
    ):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("name", help="dataset name (see `list`)")
        sub.add_argument("--data-dir", help="default $ROBUSTBENCH_MAT_DATA or ./data")
        sub.add_argument("--quiet", action="store_true", help="no progress bar")
        sub.add_argument(
            "--skip-checksum",
            action="store_true",
            help="accept upstream files whose checksum differs from the published one (a "
            "re-packed copy you trust)",
        )


def command_reproduce(args: argparse.Namespace) -> int:
    from robustbench_mat.reproduce import reproduce_table1

    _require_data(args.dataset, args.data_dir)
    log = (lambda line: None) if args.quiet else (lambda line: print(line, flush=True))
    spec = _tune_spec(args, "erm", args.dataset, None)
    table, path = reproduce_table1(spec, args.methods, log=log)
    print(table)
    print(f"written to {path}")
    return 0


def command_data(args: argparse.Namespace) -> int:
    from robustbench_mat.download import dataset_class, download_dataset, prepare_dataset

    cls = dataset_class(args.name)
    action = download_dataset if args.command == "download" else prepare_dataset
    written = action(
        cls, args.data_dir, show_progress=not args.quiet, verify=not args.skip_checksum
    )
    print(f"{cls.name} is ready: " + ", ".join(str(path) for path in written))
    return 0


def command_list(_: argparse.Namespace) -> int:
    listing = plugin_listing()
    for title in ("Methods", "Datasets"):
        print(f"{title}:")
        print(tabulate(listing[title.lower()], headers=("name", "description", "source")))
        print()
    return 0


def command_run(args: argparse.Namespace) -> int:
    from robustbench_mat.runner import RunSpec, run

    spec = RunSpec(
        method=args.method,
        dataset=args.dataset,
        seed=args.seed,
        regime=args.regime,
        criterion=args.criterion,
        steps=args.steps,
        eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every,
        device=args.device,
        precision=args.precision,
        compile=args.compile,
        deterministic=args.deterministic,
        hparams=parse_assignments(args.hparams, "--set"),
        data_params=parse_assignments(args.data_params, "--data"),
        data_dir=args.data_dir,
        workdir=args.workdir,
        show_progress=not args.quiet,
        restart=args.restart,
        num_workers=args.num_workers,
        **_inference_settings(args),
        protocol=args.protocol,
        stop_loss=args.stop_loss,
        inference_trials=args.infer_trials,
    )
    result = run(spec)
    if result.reused:
        made = f" on {result.finished_at} with {result.code}" if result.code else ""
        print(
            f"An identical run had already finished{made}; its results "
            "(use --restart to train again):"
        )
    print(result_table(result.selected, result.final))
    print(
        f"selected step {result.selected_step} by {result.criterion} "
        f"(regime {result.regime}); MLflow run {result.run_id} in {result.tracking_uri}"
    )
    return 0


def result_table(selected: dict, final: dict) -> str:
    """The headline metrics per split at the selected step (and at the last, if later)."""
    records = [selected] if selected["step"] == final["step"] else [selected, final]
    metrics = [("avg", "avg"), ("wga", "worst-group")]
    if "val_avg" not in selected:
        metrics = [("mse", "mse")]
    headers = ["split"] + [f"{label} @{r['step']}" for r in records for _, label in metrics]
    rows = [
        [split] + [r[f"{split}_{key}"] for r in records for key, _ in metrics]
        for split in ("train", "val", "test")
        if f"{split}_{metrics[0][0]}" in selected
    ]
    return tabulate(rows, headers=headers, floatfmt=".3f" if len(metrics) > 1 else ".4g")


def command_experiment(args: argparse.Namespace) -> int:
    from robustbench_mat.tracking import resolve_workdir

    workdir = resolve_workdir(args.workdir)
    if args.name == "memorization":
        return _memorization(args, workdir)
    if args.name == "figure1":
        from robustbench_mat.experiments.figure1 import run_figure1

        table, out = run_figure1(
            args.seeds or [1234], workdir, args.device, args.plot, not args.quiet
        )
    else:
        from robustbench_mat.experiments.figure3 import run_figure3

        table, out = run_figure3(
            args.seeds or [123], workdir, args.device, args.plot, not args.quiet
        )
    print(table)
    print(f"written to {out}; summary logged to MLflow experiment 'experiments'")
    return 0


def _memorization(args: argparse.Namespace, workdir) -> int:
    from robustbench_mat.experiments.memorization import MemorizationSettings, run_memorization

    if args.dataset is None:
        raise UserError("experiment memorization needs --dataset (e.g. --dataset synthetic)")
    settings = MemorizationSettings(
        dataset=args.dataset,
        methods=args.methods,
        models=args.models,
        fraction=args.fraction,
        estimator=args.estimator,
        checkpoints=args.checkpoints,
        seed=args.seed,
        regime=args.regime,
        steps=args.steps,
        hparams=parse_assignments(args.hparams, "--set"),
        data_params=parse_assignments(args.data_params, "--data"),
        data_dir=args.data_dir,
        device=args.device,
        progress=not args.quiet,
    )
    table, out = run_memorization(settings, workdir)
    print(table)
    print(f"written to {out}; summary logged to MLflow experiment 'experiments'")
    return 0


COMMANDS = {"run": command_run, "list": command_list, "experiment": command_experiment}
COMMANDS.update(show=command_show)
COMMANDS.update(download=command_data, prepare=command_data)
COMMANDS.update(tune=command_tune, sweep=command_sweep, reproduce=command_reproduce)
COMMANDS.update(leaderboard=command_leaderboard, ui=command_ui)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 0
        return COMMANDS[args.command](args)
    except UserError as error:
        print(f"robustbench-mat: error: {error}", file=sys.stderr)
        return error.exit_code
    except BrokenPipeError:  # output piped into a command that stopped reading (e.g. head)
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("robustbench-mat: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
