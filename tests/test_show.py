"""`robustbench-mat show`: a method's settings, regimes and criterion; a dataset's parameters,
groups, budget and data; one-line errors with the closest names."""

from __future__ import annotations

from pathlib import Path

import pytest

from robustbench_mat import backbones
from robustbench_mat.cli import main
from robustbench_mat.method import TRAINING_HPARAMS
from robustbench_mat.regimes import allowed_regimes
from robustbench_mat.registry import DATASETS, METHODS
from robustbench_mat.runner import RunSpec, plan
from robustbench_mat.show import declared_dataset, describe_search

PREFIX = "robustbench-mat: error: "


@pytest.fixture
def no_backbone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything tries to load a text or image backbone."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a backbone was loaded: {args}")

    for name in ("check_text_backbone", "load_tokenizer", "text_classifier", "resnet50"):
        monkeypatch.setattr(backbones, name, refuse)


def show(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["show", *args]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    return captured.out


def field(out: str, label: str) -> str:
    """The value of the `  label: value` line of `out`."""
    line = next(line for line in out.splitlines() if line.startswith(f"  {label}:"))
    return line.split(":", 1)[1].strip()


def settings(out: str) -> dict[str, str]:
    """`name = default  (details)` lines, by name, with the help text that follows each joined."""
    found: dict[str, str] = {}
    name = None
    for line in out.split("\n\n")[1].splitlines()[1:]:
        if line.startswith("      "):
            found[name] += "\n" + line.strip()
        else:
            name = line.split(" = ", 1)[0].strip()
            found[name] = line.strip()
    return found


def one_line_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["show", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(PREFIX) and captured.err.count("\n") == 1, captured.err
    return captured.err


def test_method_shows_every_setting_with_default_type_bounds_search_and_help(capsys):
    out = show(capsys, "mat")
    dataset = declared_dataset(DATASETS.get("synthetic"), {})
    specs = METHODS.get("mat").hparam_specs(dataset)
    shown = settings(out)
    assert list(shown) == list(specs)  # every setting, in declaration order
    for name, spec in specs.items():
        assert " ".join(shown[name].splitlines()[1:]) == spec.help
    # The synthetic dataset's defaults and search space, MAT's own settings after the loop's.
    assert shown["lr"].startswith(
        "lr = 0.01  (a finite float > 0; tuned over log-uniform in [0.001, 0.1])"
    )
    assert shown["momentum"].startswith("momentum = 0.0  (a finite float in [0, 1))")
    assert shown["optimizer"].startswith("optimizer = sgd  (one of sgd, adam, adamw)")
    assert shown["class_balanced"].startswith("class_balanced = false  (a bool)")
    assert shown["temperature"].startswith(
        "temperature = 0.1  (a finite float > 0; tuned over one of 0.001, 0.01, 0.1)"
    )
    assert shown["calibration"].startswith("calibration = batch  (one of batch, global)")
    assert "Settings on synthetic" in out


def test_method_shows_its_regimes_criterion_group_inference_and_paper(capsys):
    out = show(capsys, "mat")
    assert out.startswith("method mat: MAT (Bayat, Pezeshki et al. 2024)")
    assert field(out, "paper") == METHODS.get("mat").paper
    assert field(out, "source") == "built-in"
    assert field(out, "regimes").startswith("full, val-only (default), none")
    assert field(out, "default criterion").startswith(
        "full: val_wga, val-only: val_wga, none: val_inferred_wga"
    )
    assert field(out, "group inference").startswith("runs xrm-infer first")

    out = show(capsys, "groupdro")
    assert field(out, "regimes") == (
        "full (default); refused: val-only, none (without group labels use 'xrm')"
    )
    assert field(out, "default criterion").startswith("full: val_wga")
    assert "group inference" not in out


@pytest.mark.parametrize("method", sorted(METHODS.names()))
def test_shown_criteria_and_settings_are_what_a_run_uses(method, capsys, tmp_path):
    """What `show` prints for every regime is what `runner.plan` resolves for a run."""
    out = show(capsys, method)
    method_cls = METHODS.get(method)
    shown = dict(part.split(": ") for part in field(out, "default criterion").split(", "))
    shown[list(shown)[-1]] = shown[list(shown)[-1]].split(" (")[0]
    regimes = allowed_regimes(method_cls.needs_train_groups, method_cls.needs_val_groups)
    assert list(shown) == regimes
    for regime in regimes:
        the_plan = plan(RunSpec(method, "synthetic", regime=regime, workdir=tmp_path))
        assert shown[regime] == the_plan.criterion, regime
    defaults = {name: line.split(" = ")[1].split("  (")[0] for name, line in settings(out).items()}
    assert list(defaults) == list(the_plan.hparams)


def test_method_settings_follow_the_dataset_and_its_parameters(capsys, no_backbone):
    shown = settings(show(capsys, "erm", "--dataset", "civilcomments"))
    assert shown["optimizer"].startswith("optimizer = adamw ")
    assert shown["lr"].startswith("lr = 1e-05  (a finite float > 0; tuned over log-uniform in ")
    assert shown["class_balanced"].startswith("class_balanced = true ")
    assert set(shown) == set(TRAINING_HPARAMS)

    on_images = settings(show(capsys, "erm", "--dataset", "waterbirds"))
    on_features = settings(
        show(capsys, "erm", "--dataset", "waterbirds", "--data", "features=resnet50")
    )
    assert on_images["batch_size"].startswith("batch_size = 32 ")
    assert on_features["batch_size"].startswith("batch_size = 128 ")


def test_dataset_shows_parameters_groups_budget_family_and_data(capsys, tmp_path, no_backbone):
    data = tmp_path / "data"
    out = show(capsys, "civilcomments", "--data-dir", str(data))
    assert out.startswith("dataset civilcomments: CivilComments, coarse")
    assert field(out, "task") == "classification, model family text"
    assert field(out, "training groups") == (
        "4: non-toxic/identity, non-toxic/no-identity, toxic/identity, toxic/no-identity"
    )
    assert field(out, "default budget") == (
        "10000 steps, evaluated every 1000; --protocol paper: 60001 steps, every 250"
    )
    assert "class_balanced=true" in field(out, "training defaults")
    assert field(out, "data") == (
        f"not prepared in {data / 'civilcomments'}; `robustbench-mat download civilcomments "
        f"--data-dir {data}` fetches it"
    )
    shown = settings(out)
    assert list(shown) == ["backbone", "max_length"]
    assert shown["max_length"].startswith("max_length = 220  (an int >= 1)")
    assert "16 WILDS" in out.split("Description:")[1]  # the evaluation groups, from the docs

    for path in DATASETS.get("civilcomments").prepared_files(data):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    out = show(capsys, "civilcomments", "--data-dir", str(data))
    assert field(out, "data") == f"prepared in {data / 'civilcomments'}"


def test_dataset_shows_its_declared_download_size(capsys, no_backbone):
    assert field(show(capsys, "celeba"), "download size") == "1.37 GiB in 3 files"
    assert field(show(capsys, "civilcomments"), "download size") == "86.4 MiB in 1 file"
    assert field(show(capsys, "multinli"), "download size") == "size unknown (2 files)"


def test_in_memory_dataset_needs_no_download(capsys):
    out = show(capsys, "synthetic")
    assert field(out, "data") == "generated in memory (no download)"
    assert "download size" not in out
    assert field(out, "default budget").startswith("1000 steps, evaluated every 10")
    assert settings(out)["noise_std"].startswith("noise_std = 0.5  (a finite float >= 0)")
    assert (
        field(out, "default criterion")
        == "full: val_wga, val-only: val_wga, none: val_inferred_wga"
    )
    assert field(show(capsys, "good-bad-ugly"), "default criterion") == "val_mse"


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["matt"], ["unknown method or dataset 'matt'", "did you mean mat", "methods: afr, "]),
        (["synthetc"], ["did you mean synthetic?", "datasets: celeba, "]),
        (["zzzz"], ["unknown method or dataset 'zzzz'; methods: "]),
        (["erm", "--dataset", "waterbird"], ["unknown dataset 'waterbird'", "waterbirds"]),
        (["erm", "--data", "nosie_std=1"], ["setting nosie_std", "valid keys: "]),
        (["waterbirds", "--dataset", "celeba"], ["--dataset applies to a method"]),
    ],
)
def test_unknown_names_are_one_line_errors_with_the_closest_ones(args, fragments, capsys):
    err = one_line_error(capsys, *args)
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def test_search_distributions_in_words():
    from optuna.distributions import FloatDistribution, IntDistribution

    assert describe_search(None) == ""
    assert describe_search(IntDistribution(2, 100, log=True)) == "int log-uniform in [2, 100]"
    assert describe_search(FloatDistribution(0.0, 1.0, step=0.25)) == (
        "uniform in [0.0, 1.0] step 0.25"
    )


def test_show_reads_no_data(capsys, tmp_path: Path, no_backbone):
    """Declarations only: a dataset whose files are missing is still described."""
    out = show(capsys, "jtt", "--dataset", "multinli")
    assert "Settings on multinli" in out
    assert not (tmp_path / "data").exists()
