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
    """Average and worst-group accuracy per split at the selected step (and the last, if later)."""
    steps = [selected] if selected["step"] == final["step"] else [selected, final]
    headers = ["split"]
    for record in steps:
        headers += [f"avg @{record['step']}", f"worst-group @{record['step']}"]
    rows = []
    for split in ("train", "val", "test"):
        if f"{split}_avg" in selected:
            row = [split]
            for record in steps:
                row += [record[f"{split}_avg"], record[f"{split}_wga"]]
            rows.append(row)
    return tabulate(rows, headers=headers, floatfmt=".3f")


COMMANDS = {"run": command_run, "list": command_list}


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
