"""The `robustbench-mat` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tabulate import tabulate

from robustbench_mat.errors import UserError
from robustbench_mat.hparams import parse_assignments
from robustbench_mat.regimes import REGIMES
from robustbench_mat.registry import DATASETS, METHODS


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", required=True, help="method name (see `list`)")
    parser.add_argument("--dataset", required=True, help="dataset name (see `list`)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    parser.add_argument(
        "--regime",
        choices=list(REGIMES),
        help="annotation regime: full (groups in train and val), val-only, none; "
        "default full for methods that need training groups, else val-only",
    )
    parser.add_argument("--criterion", help="model selection criterion (default: the regime's)")
    parser.add_argument("--steps", type=int, help="training steps (default: the dataset's)")
    parser.add_argument("--eval-every", type=int, help="steps between evaluations")
    parser.add_argument("--checkpoint-every", type=int, help="steps between checkpoints")
    parser.add_argument(
        "--stop-loss", type=float, help="stop early once the training loss falls below this"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    parser.add_argument("--data-dir", help="where datasets live (default ./data)")
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
    parser.add_argument(
        "--infer-set",
        dest="inference_hparams",
        action="extend",
        nargs="+",
        metavar="KEY=VALUE",
        help="settings of the group-inference run (XRM) that mat and xrm use, e.g. lr=0.01",
    )
    parser.add_argument(
        "--infer-trials",
        type=int,
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
        type=int,
        default=0,
        dest="num_workers",
        help="data-loading worker processes for on-disk datasets",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="robustbench-mat",
        description="Train and compare group-robustness methods under subpopulation shift.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = commands.add_parser("run", help="train one method on one dataset and record it")
    _add_run_arguments(run)
    commands.add_parser("list", help="list the methods and datasets with where they come from")
    experiment = commands.add_parser(
        "experiment", help="reproduce a figure of the MAT paper (figure1, figure3)"
    )
    experiment.add_argument("name", choices=("figure1", "figure3"))
    experiment.add_argument(
        "--seeds", type=int, nargs="+", help="data and training seeds (figure1 default: 1234)"
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
    return parser


def command_list(_: argparse.Namespace) -> int:
    for title, registry in (("Methods", METHODS), ("Datasets", DATASETS)):
        rows = [(p.name, p.description, p.source) for p in registry]
        print(f"{title}:")
        print(tabulate(rows, headers=("name", "description", "source")))
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
        hparams=parse_assignments(args.hparams, "--set"),
        data_params=parse_assignments(args.data_params, "--data"),
        data_dir=args.data_dir,
        workdir=args.workdir,
        show_progress=not args.quiet,
        restart=args.restart,
        num_workers=args.num_workers,
        inference_hparams=parse_assignments(args.inference_hparams, "--infer-set"),
        stop_loss=args.stop_loss,
        inference_trials=args.infer_trials,
    )
    result = run(spec)
    if result.reused:
        print("An identical run had already finished; its results (use --restart to train again):")
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


COMMANDS = {"run": command_run, "list": command_list, "experiment": command_experiment}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
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
