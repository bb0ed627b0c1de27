"""The `robustbench-mat` command line: help, `list`, clean errors, and a small run."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import only_run_dir

from robustbench_mat import backbones
from robustbench_mat.cli import main, result_table
from robustbench_mat.runner import RunSpec, plan

PREFIX = "robustbench-mat: error: "
SCRIPT = shutil.which("robustbench-mat") or str(Path(sys.executable).with_name("robustbench-mat"))
SMALL = ["--steps", "50", "--eval-every", "10", "--quiet"]


def run_command(workdir: Path, *extra: str) -> list[str]:
    return ["run", "--method", "erm", "--dataset", "synthetic", "--workdir", str(workdir), *extra]


def assert_clean_error(captured, code: int, expected_code: int, *fragments: str) -> str:
    assert code == expected_code
    err = captured.err
    assert err.startswith(PREFIX), err
    assert err.endswith("\n") and err.count("\n") == 1, err  # a single line
    assert "Traceback" not in err + captured.out
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


def assert_nothing_finished(workdir: Path) -> None:
    assert not list(workdir.glob("runs/*/result.json"))


# --- help and list -----------------------------------------------------------------------------


def test_no_arguments_prints_help(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: robustbench-mat")
    assert "run" in out and "list" in out


def test_run_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["run", "--help"])
    assert caught.value.code == 0
    out = capsys.readouterr().out
    for option in ("--method", "--dataset", "--set", "--data", "--criterion", "--restart"):
        assert option in out


def test_list_shows_methods_and_datasets_with_their_source(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    methods, datasets = out.split("Datasets:")
    assert methods.startswith("Methods:")
    erm_line = next(line for line in methods.splitlines() if line.startswith("erm "))
    assert "Empirical risk minimisation" in erm_line and erm_line.rstrip().endswith("built-in")
    synthetic_line = next(line for line in datasets.splitlines() if line.startswith("synthetic"))
    assert "Figure 1 of the MAT paper" in synthetic_line
    assert synthetic_line.rstrip().endswith("built-in")


def test_version_prints_the_installed_package_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as caught:
        main(["--version"])
    assert caught.value.code == 0
    assert capsys.readouterr().out == f"robustbench-mat {version('robustbench-mat')}\n"


def test_missing_required_option_is_a_one_line_error(capsys):
    code = main(["run", "--method", "erm"])
    assert_clean_error(
        capsys.readouterr(),
        code,
        2,
        "the following arguments are required: --dataset",
        "(see `robustbench-mat run --help`)",
    )


def test_unknown_command_is_a_one_line_error(capsys):
    code = main(["bogus"])
    assert_clean_error(capsys.readouterr(), code, 2, "invalid choice: 'bogus'")


# --- errors ------------------------------------------------------------------------------------

BAD_INPUTS = {
    "unknown-method": (["--method", "ermm"], 2, ["unknown method 'ermm'", "did you mean erm"]),
    "unknown-dataset": (["--dataset", "synthetc"], 2, ["unknown dataset 'synthetc'", "synthetic"]),
    "unknown-set-key": (["--set", "learning_rate=0.1"], 2, ["learning_rate", "valid keys: "]),
    "wrong-type": (["--set", "batch_size=lots"], 2, ["'batch_size' expects int, got 'lots'"]),
    "bad-choice": (["--set", "optimizer=rmsprop"], 2, ["must be one of sgd, adam, adamw"]),
    "set-without-equals": (["--set", "lr"], 2, ["--set expects key=value, got 'lr'"]),
    "unknown-data-key": (["--data", "noise=0"], 2, ["unknown dataset 'synthetic' setting noise"]),
    "wrong-data-type": (["--data", "n=many"], 2, ["setting 'n' expects int"]),
    "criterion-on-test": (["--criterion", "test_wga"], 2, ["must be a validation metric"]),
    "criterion-on-train": (["--criterion", "train_avg"], 2, ["must be a validation metric"]),
    "group-criterion-without-groups": (
        ["--regime", "none", "--criterion", "val_wga"],
        2,
        ["reads validation group labels", "regime 'none' withholds"],
    ),
    "zero-steps": (["--steps", "0"], 2, ["argument --steps: must be an integer >= 1, got '0'"]),
    "bad-device": (["--device", "gpu"], 2, ["--device must be auto, cpu or cuda"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_one_line_error(case, workdir, capsys):
    extra, expected_code, fragments = BAD_INPUTS[case]
    # Later options win over the defaults given first.
    args = run_command(workdir, *SMALL)
    for flag, value in zip(extra[::2], extra[1::2], strict=True):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    code = main(args)
    assert_clean_error(capsys.readouterr(), code, expected_code, *fragments)
    assert_nothing_finished(workdir)
    assert not (workdir / "runs").exists()


MISSING_DATA_COMMANDS = {
    "run": ["run", "--method", "mat", "--dataset", "civilcomments"],
    "tune": ["tune", "--method", "mat", "--dataset", "civilcomments", "--regime", "none"],
    "reproduce": ["reproduce", "table1", "--dataset", "civilcomments"],
}


@pytest.fixture
def no_backbone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything tries to load a text or image backbone."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a backbone was loaded before the data was checked: {args}")

    for name in ("check_text_backbone", "load_tokenizer", "text_classifier", "resnet50"):
        monkeypatch.setattr(backbones, name, refuse)


@pytest.mark.parametrize("command", MISSING_DATA_COMMANDS.values(), ids=MISSING_DATA_COMMANDS)
def test_missing_data_fails_in_seconds_before_any_backbone_or_run(
    command, workdir, tmp_path, monkeypatch, no_backbone, capsys
):
    monkeypatch.delenv("ROBUSTBENCH_MAT_DATA", raising=False)  # the default: ./data
    start = time.monotonic()
    code = main([*command, "--workdir", str(workdir)])
    elapsed = time.monotonic() - start
    assert_clean_error(
        capsys.readouterr(),
        code,
        2,
        "dataset civilcomments is not prepared",
        f"looked in {tmp_path / 'data' / 'civilcomments'} for ",
        "metadata_civilcomments_coarse.csv, civilcomments_coarse.csv",
        "run `robustbench-mat download civilcomments --data-dir data`",
    )
    assert elapsed < 5, elapsed
    assert not (workdir / "runs").exists() and not (workdir / "optuna.db").exists()


def test_missing_data_names_only_the_files_that_are_missing(workdir, tmp_path, no_backbone, capsys):
    data = tmp_path / "elsewhere"
    (data / "civilcomments").mkdir(parents=True)
    (data / "civilcomments" / "metadata_civilcomments_coarse.csv").write_text("id\n")
    code = main([*MISSING_DATA_COMMANDS["run"], "--data-dir", str(data), "--workdir", str(workdir)])
    err = assert_clean_error(
        capsys.readouterr(),
        code,
        2,
        f"looked in {data / 'civilcomments'} for civilcomments_coarse.csv;",
        f"`robustbench-mat download civilcomments --data-dir {data}`",
        f"`robustbench-mat prepare civilcomments --data-dir {data}`",
    )
    assert "metadata_civilcomments_coarse.csv" not in err


def test_sweep_skips_a_dataset_without_data_at_once(workdir, no_backbone, capsys):
    code = main(
        ["sweep", "--methods", "erm", "--datasets", "civilcomments", "--regimes", "val-only"]
        + ["--workdir", str(workdir), "--quiet"]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "skipped erm civilcomments val-only: dataset civilcomments is not prepared" in out
    assert "robustbench-mat download civilcomments" in out


def test_missing_data_without_network_access_takes_seconds(workdir, tmp_path):
    """The console script as a user runs it, with Hugging Face online (no network here: a
    backbone lookup would retry for half a minute before failing)."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    }
    start = time.monotonic()
    completed = subprocess.run(
        [SCRIPT, *MISSING_DATA_COMMANDS["run"], "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    elapsed = time.monotonic() - start
    assert completed.returncode == 2, completed.stderr
    assert completed.stderr.startswith(f"{PREFIX}dataset civilcomments is not prepared")
    assert completed.stderr.count("\n") == 1, completed.stderr
    assert "huggingface" not in completed.stderr.lower()
    assert elapsed < 20, elapsed


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_device_cuda_without_cuda_is_a_one_line_error(workdir, capsys):
    code = main(run_command(workdir, *SMALL, "--device", "cuda"))
    assert_clean_error(
        capsys.readouterr(), code, 2, "--device cuda: CUDA is not available on this machine"
    )
    assert_nothing_finished(workdir)


def test_diverging_run_is_a_one_line_error_with_exit_code_1(workdir, capsys):
    code = main(run_command(workdir, *SMALL, "--set", "lr=1e38"))
    assert_clean_error(capsys.readouterr(), code, 1, "the loss became nan at step 2")
    assert_nothing_finished(workdir)


def test_error_in_a_subprocess_prints_no_traceback(workdir):
    completed = subprocess.run(
        [SCRIPT, *run_command(workdir, *SMALL, "--set", "lr=abc")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr
    error_lines = [line for line in completed.stderr.splitlines() if line.startswith(PREFIX)]
    assert error_lines == [f"{PREFIX}method 'erm' setting 'lr' expects float, got 'abc'"]
    assert completed.stdout == ""
    assert_nothing_finished(workdir)


# --- a successful run --------------------------------------------------------------------------


def test_small_run_prints_the_table_and_the_mlflow_run_id(workdir, capsys):
    assert main(run_command(workdir, *SMALL)) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].split()[:1] == ["split"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:5]}
    assert set(rows) == {"train", "val", "test"}
    run_dir = only_run_dir(workdir)
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    assert f"MLflow run {run_id} in sqlite:///{workdir / 'mlflow.db'}" in lines[-1]
    assert lines[-1].startswith("selected step ")
    assert "by val_wga (regime val-only)" in lines[-1]
    assert (run_dir / "result.json").exists()
    assert "Traceback" not in captured.err

    # The same command again reuses the finished run.
    assert main(run_command(workdir, *SMALL)) == 0
    again = capsys.readouterr().out
    assert again.startswith("An identical run had already finished")
    assert f"MLflow run {run_id}" in again
    assert again.splitlines()[1:] == lines


def test_set_and_data_reach_the_run(workdir, capsys):
    args = run_command(
        workdir, *SMALL, "--set", "lr=0.05", "momentum=0.5", "--data", "noise_std=0", "n=200"
    )
    assert main(args) == 0
    capsys.readouterr()
    expected = plan(
        RunSpec(
            "erm",
            "synthetic",
            steps=50,
            eval_every=10,
            hparams={"lr": 0.05, "momentum": 0.5},
            data_params={"noise_std": 0.0, "n": 200},
            workdir=workdir,
        )
    )
    assert only_run_dir(workdir) == expected.run_dir
    result = json.loads((expected.run_dir / "result.json").read_text())
    assert result["hparams"] == {**expected.hparams, "lr": 0.05, "momentum": 0.5}


def test_console_script_runs_end_to_end(workdir):
    completed = subprocess.run(
        [SCRIPT, *run_command(workdir, "--steps", "20", "--eval-every", "10", "--quiet")],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    assert [line.split()[0] for line in lines[2:5]] == ["train", "val", "test"]
    run_id = (only_run_dir(workdir) / "mlflow_run_id").read_text().strip()
    assert f"MLflow run {run_id}" in lines[-1]


def test_result_table_shows_the_last_step_when_it_differs():
    selected = {"step": 10, "val_avg": 0.5, "val_wga": 0.25, "test_avg": 0.75, "test_wga": 0.5}
    final = {"step": 20, "val_avg": 0.6, "val_wga": 0.3, "test_avg": 0.7, "test_wga": 0.4}
    table = result_table(selected, final).splitlines()
    assert table[0].split() == [
        "split",
        "avg",
        "@10",
        "worst-group",
        "@10",
        "avg",
        "@20",
        "worst-group",
        "@20",
    ]
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in table[2:]}
    assert rows == {"val": [0.5, 0.25, 0.6, 0.3], "test": [0.75, 0.5, 0.7, 0.4]}
    # No train row when train was not evaluated; one pair of columns when nothing came later.
    assert len(table) == 4
    assert result_table(selected, selected).splitlines()[0].split() == [
        "split",
        "avg",
        "@10",
        "worst-group",
        "@10",
    ]


# --- known bugs --------------------------------------------------------------------------------


def test_unknown_validation_criterion_is_a_one_line_error(workdir, capsys):
    code = main(run_command(workdir, *SMALL, "--criterion", "val_wgaa"))
    assert_clean_error(capsys.readouterr(), code, 2, "val_wgaa")
    assert_nothing_finished(workdir)


@pytest.mark.parametrize("flag", ["--eval-every", "--checkpoint-every"])
def test_zero_intervals_are_rejected(flag, workdir, capsys):
    args = run_command(workdir, "--steps", "20", "--quiet")
    code = main([*args, flag, "0"])
    assert_clean_error(capsys.readouterr(), code, 2, f"argument {flag}: must be an integer >= 1")


# --- values out of range -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "described"),
    [
        ("lr=nan", "'lr' must be a finite float > 0, got 'nan'"),
        ("lr=-0.1", "'lr' must be a finite float > 0, got '-0.1'"),
        ("lr=inf", "'lr' must be a finite float > 0, got 'inf'"),
        ("weight_decay=-1", "'weight_decay' must be a finite float >= 0, got '-1'"),
        ("batch_size=-3", "'batch_size' must be an int >= 0, got '-3'"),
        ("momentum=1.5", "'momentum' must be a finite float in [0, 1), got '1.5'"),
    ],
)
def test_set_out_of_range_names_the_setting_and_the_allowed_range(
    setting, described, workdir, capsys
):
    code = main(run_command(workdir, *SMALL, "--set", setting))
    assert_clean_error(capsys.readouterr(), code, 2, f"method 'erm' setting {described}")
    assert not (workdir / "runs").exists()


def test_infer_set_out_of_range_is_refused_before_anything_runs(workdir, capsys):
    code = main(
        [
            "run",
            "--method",
            "mat",
            "--dataset",
            "synthetic",
            "--workdir",
            str(workdir),
            *SMALL,
            "--infer-set",
            "lr=nan",
        ]
    )
    assert_clean_error(
        capsys.readouterr(), code, 2, "method 'xrm-infer' setting 'lr' must be a finite float > 0"
    )
    assert not (workdir / "runs").exists()


def test_data_out_of_range_names_the_parameter(workdir, capsys):
    code = main(run_command(workdir, *SMALL, "--data", "majority=1.5"))
    assert_clean_error(
        capsys.readouterr(),
        code,
        2,
        "dataset 'synthetic' setting 'majority' must be a finite float in [0, 1], got '1.5'",
    )


SEED_RANGE = "must be a seed from 0 to 4294967295"


@pytest.mark.parametrize("seed", ["99999999999999999999", "-1", "4294967296", "1.5", "x"])
def test_run_seed_outside_the_seed_range_is_refused(seed, workdir, capsys):
    code = main(run_command(workdir, *SMALL, "--seed", seed))
    assert_clean_error(capsys.readouterr(), code, 2, f"argument --seed: {SEED_RANGE}, got {seed!r}")
    assert not (workdir / "runs").exists()


def test_largest_seed_is_accepted(workdir, capsys):
    args = run_command(workdir, "--steps", "2", "--eval-every", "1", "--quiet", "--data", "n=20")
    # Minibatches: the batch schedule seeds its generators from the seed too.
    assert main([*args, "--set", "batch_size=5", "--seed", "4294967295"]) == 0
    assert "seed" not in capsys.readouterr().err


def tune_command(workdir: Path, *extra: str) -> list[str]:
    return ["tune", "--method", "erm", "--dataset", "synthetic", "--workdir", str(workdir), *extra]


SWEEP = ["sweep", "--methods", "erm", "--datasets", "synthetic"]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--sampler-seed", "-3"], f"argument --sampler-seed: {SEED_RANGE}, got '-3'"),
        (["--sampler-seed", "1" * 20], f"argument --sampler-seed: {SEED_RANGE}"),
        (["--trials", "0"], "argument --trials: must be an integer >= 1, got '0'"),
        (["--n-seeds", "-2"], "argument --n-seeds: must be an integer >= 1, got '-2'"),
        (["--workers", "0"], "argument --workers: must be an integer >= 1, got '0'"),
        (["--steps", "0"], "argument --steps: must be an integer >= 1, got '0'"),
        (["--eval-every", "-5"], "argument --eval-every: must be an integer >= 1, got '-5'"),
        (["--stale-after", "nan"], "argument --stale-after: must be a finite number > 0"),
    ],
)
@pytest.mark.parametrize("command", ["tune", "sweep"])
def test_tuning_numbers_out_of_range_are_one_line_errors(command, args, fragment, workdir, capsys):
    base = tune_command(workdir) if command == "tune" else [*SWEEP, "--workdir", str(workdir)]
    code = main([*base, *args])
    assert_clean_error(capsys.readouterr(), code, 2, fragment, f"robustbench-mat {command} --help")
    assert not (workdir / "optuna.db").exists()


@pytest.mark.parametrize(
    ("flag", "value", "fragment"),
    [
        (
            "--loader-workers",
            "-1",
            "argument --loader-workers: must be auto or an integer >= 0, got '-1'",
        ),
        ("--infer-trials", "0", "argument --infer-trials: must be an integer >= 1, got '0'"),
        ("--stop-loss", "nan", "argument --stop-loss: must be a finite number, got 'nan'"),
    ],
)
def test_run_numbers_out_of_range_are_one_line_errors(flag, value, fragment, workdir, capsys):
    code = main(run_command(workdir, *SMALL, flag, value))
    assert_clean_error(capsys.readouterr(), code, 2, fragment)


# --- flag names: counts are --n-seeds, data-loader workers --loader-workers --------------------
TRAINING_COMMANDS = {
    "tune": ["tune", "--method", "erm", "--dataset", "synthetic"],
    "sweep": SWEEP,
    "reproduce": ["reproduce", "table1", "--dataset", "waterbirds"],
    "run": ["run", "--method", "erm", "--dataset", "synthetic"],
}


@pytest.mark.parametrize(
    ("command", "old", "new", "dest", "value"),
    [
        ("tune", "--seeds", "--n-seeds", "seeds", 5),
        ("sweep", "--seeds", "--n-seeds", "seeds", 5),
        ("reproduce", "--seeds", "--n-seeds", "seeds", 5),
        ("run", "--workers", "--loader-workers", "num_workers", 2),
    ],
)
def test_old_flag_spellings_still_work_with_a_one_line_deprecation(
    command, old, new, dest, value, capsys
):
    from robustbench_mat.cli import build_parser

    base = TRAINING_COMMANDS[command]
    parser = build_parser()
    assert getattr(parser.parse_args([*base, new, str(value)]), dest) == value
    assert capsys.readouterr().err == ""
    assert getattr(parser.parse_args([*base, old, str(value)]), dest) == value
    err = capsys.readouterr().err
    assert err == f"robustbench-mat: warning: `{command} {old}` is deprecated; use {new} N\n"
    default = parser.parse_args(base)
    assert getattr(default, dest) == (None if command == "run" else 3)  # run: auto


@pytest.mark.parametrize("command", ["run", "tune", "sweep", "reproduce"])
def test_loader_workers_reach_every_training_command(command):
    from robustbench_mat.cli import build_parser

    base = TRAINING_COMMANDS[command]
    parser = build_parser()
    assert parser.parse_args([*base, "--loader-workers", "3"]).num_workers == 3
    assert parser.parse_args([*base, "--loader-workers", "auto"]).num_workers is None
    assert parser.parse_args(base).num_workers is None


@pytest.mark.parametrize("command", ["run", "tune", "sweep", "reproduce"])
def test_help_shows_the_new_spellings_only(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    if command == "run":
        assert "--loader-workers N" in out and "--workers" not in out
    else:
        assert "--n-seeds N" in out and "--seeds" not in out
        assert "--workers WORKERS" in out  # tuning processes keep their name


def test_tune_workers_still_means_tuning_processes(capsys):
    from robustbench_mat.cli import build_parser

    args = build_parser().parse_args(tune_command(Path("w"), "--workers", "4"))
    assert args.workers == 4 and capsys.readouterr().err == ""


def test_criterion_lists_its_values_in_help_and_errors(workdir, capsys):
    from robustbench_mat.cli import CRITERIA, CRITERION_PREFIXES
    from robustbench_mat.evaluation import PER_GROUP_CRITERIA, VALIDATION_CRITERIA

    assert (CRITERIA, CRITERION_PREFIXES) == (VALIDATION_CRITERIA, PER_GROUP_CRITERIA)
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for value in (*CRITERIA, *(p + "<group>" for p in CRITERION_PREFIXES)):
        assert value in help_text
    for command in (run_command(workdir, *SMALL), tune_command(workdir, "--quiet")):
        code = main([*command, "--criterion", "val_wgx"])
        err = assert_clean_error(
            capsys.readouterr(), code, 2, "argument --criterion: unknown criterion", "val_wgx"
        )
        assert "did you mean val_wga?" in err
        assert all(value in err for value in CRITERIA)
    assert_nothing_finished(workdir)
    assert not (workdir / "optuna.db").exists()


@pytest.mark.parametrize("criterion", ["val_wga", "val_group_acc.y1-a0", "val_mse"])
def test_valid_criteria_parse(criterion):
    from robustbench_mat.cli import build_parser

    args = build_parser().parse_args(run_command(Path("w"), "--criterion", criterion))
    assert args.criterion == criterion


@pytest.mark.parametrize("seeds", [["-1"], ["1", "99999999999999999999"]])
def test_experiment_seeds_outside_the_seed_range_are_refused(seeds, workdir, capsys):
    code = main(["experiment", "figure1", "--workdir", str(workdir), "--seeds", *seeds])
    assert_clean_error(capsys.readouterr(), code, 2, f"argument --seeds: {SEED_RANGE}")


STORAGE_FORMS = "sqlite:///path/to/optuna.db or postgresql://user:password@host/database"


@pytest.mark.parametrize(
    ("storage", "fragment"),
    [
        ("notaurl", f"--storage 'notaurl' is not a database URL; expected {STORAGE_FORMS}"),
        ("", "is not a database URL"),
        ("postgresql://u:p@host:notaport/db", "is not a database URL"),
        ("foo://host/db", "--storage foo://host/db: unknown database kind 'foo'; expected"),
        pytest.param(
            "mysql://u@host/db",
            "--storage mysql://u@host/db: its database driver is not installed",
            marks=pytest.mark.skipif(
                importlib.util.find_spec("MySQLdb") is not None, reason="MySQLdb is installed"
            ),
        ),
    ],
)
@pytest.mark.parametrize("command", ["tune", "sweep"])
def test_bad_storage_url_is_one_line_before_anything_starts(
    command, storage, fragment, workdir, capsys
):
    base = tune_command(workdir) if command == "tune" else [*SWEEP, "--workdir", str(workdir)]
    code = main([*base, "--steps", "2", "--storage", storage])
    assert_clean_error(capsys.readouterr(), code, 2, fragment)
    assert not (workdir / "optuna.db").exists()
    assert not (workdir / "runs").exists()


def test_storage_password_is_not_printed(workdir, capsys):
    code = main([*tune_command(workdir), "--storage", "foo://user:secret@host/db"])
    err = assert_clean_error(capsys.readouterr(), code, 2, "foo://user:***@host/db")
    assert "secret" not in err


def test_sqlite_storage_in_a_missing_folder_is_named(workdir, tmp_path, capsys):
    missing = tmp_path / "no" / "such"
    code = main([*tune_command(workdir), "--storage", f"sqlite:///{missing}/optuna.db"])
    assert_clean_error(capsys.readouterr(), code, 2, f"folder {missing} does not exist")
    assert not missing.exists()


# --- leaderboard --out ---------------------------------------------------------------------------

PUBLISHED = ["--published", "--datasets", "waterbirds"]  # rows without any run in the store


def test_leaderboard_out_creates_missing_folders(workdir, tmp_path, capsys):
    out = tmp_path / "some" / "missing" / "dir" / "table.md"
    assert main(["leaderboard", "--workdir", str(workdir), *PUBLISHED, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.read_text().startswith("| tr ")
    assert out.read_text().strip() in printed


@pytest.mark.parametrize(
    ("target", "fragment"),
    [
        ("afile/table.md", "afile is a file, not a folder"),
        ("afile/deeper/table.md", "afile is a file, not a folder"),
        ("adir", "cannot write it (Is a directory)"),
    ],
)
def test_leaderboard_out_that_cannot_be_written_is_one_line(
    target, fragment, workdir, tmp_path, capsys
):
    (tmp_path / "afile").write_text("keep")
    (tmp_path / "adir").mkdir()
    out = tmp_path / target
    code = main(["leaderboard", "--workdir", str(workdir), *PUBLISHED, "--out", str(out)])
    assert_clean_error(capsys.readouterr(), code, 2, f"--out {out}: ", fragment)
    assert (tmp_path / "afile").read_text() == "keep"


def test_sweep_methods_all_expands_to_every_training_method() -> None:
    from robustbench_mat.cli import _sweep_methods
    from robustbench_mat.registry import METHODS

    every = _sweep_methods(["all"])
    assert "xrm-infer" not in every and "ula-proxy" not in every and "xrm" in every
    assert sorted(every) == sorted(i.name for i in METHODS if not i.cls.infers_groups)
    mat_first = _sweep_methods(["mat", "all"])
    assert mat_first[0] == "mat" and len(mat_first) == len(every)
    assert _sweep_methods(["erm", "mat"]) == ["erm", "mat"]


@pytest.mark.slow
def test_a_sweep_of_every_method_finishes_on_synthetic(workdir, capsys) -> None:
    """Every registered method tunes (1 trial) and runs its best configuration on a tiny
    synthetic task, in the regimes it allows (each allows full or val-only)."""
    code = main(
        ["sweep", "--methods", "all", "--datasets", "synthetic", "--regimes", "full", "val-only"]
        + ["--trials", "1", "--n-seeds", "1", "--steps", "20", "--eval-every", "10"]
        + ["--no-prune", "--quiet", "--workdir", str(workdir), "--data", "n=200", "dim=20"]
    )
    assert code == 0
    out = capsys.readouterr().out
    from robustbench_mat.cli import _sweep_methods

    for method in _sweep_methods(["all"]):
        assert f"\n{method}.synthetic." in out, method  # one study in full or val-only
