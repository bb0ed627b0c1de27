"""Hyperparameter declarations: parsing from text, choices, bounds, unknown keys, `key=value`
lists; every built-in declaration keeps its defaults and search ranges within its bounds."""

from __future__ import annotations

import math

import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from robustbench_mat.datasets.synthetic import Synthetic
from robustbench_mat.errors import UserError
from robustbench_mat.hparams import MAX_SEED, HParam, parse_assignments, resolve, search_range
from robustbench_mat.method import OPTIMIZERS, TRAINING_HPARAMS
from robustbench_mat.methods.erm import ERM
from robustbench_mat.registry import DATASETS, METHODS
from robustbench_mat.text import TextBenchmark

OWNER = "method 'erm'"


def parse(default, value, choices=None, name="key"):
    return HParam(default, "help", choices=choices).parse(name, value, OWNER)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("12", 12), ("-3", -3), (" 7 ", 7), ("1e3", 1000), ("64.0", 64), ("0", 0)],
)
def test_int_from_text(text, expected):
    value = parse(64, text)
    assert value == expected
    assert type(value) is int


@pytest.mark.parametrize(("text", "expected"), [("0.1", 0.1), ("1e-3", 1e-3), ("3", 3.0)])
def test_float_from_text(text, expected):
    value = parse(0.5, text)
    assert value == expected
    assert type(value) is float


@pytest.mark.parametrize("text", ["1", "true", "True", "YES", "on", " yes "])
def test_bool_true_from_text(text):
    assert parse(False, text) is True


@pytest.mark.parametrize("text", ["0", "false", "False", "no", "OFF"])
def test_bool_false_from_text(text):
    assert parse(True, text) is False


def test_bool_from_python_values():
    assert parse(False, True) is True
    assert parse(True, False) is False


def test_str_from_text():
    assert parse("sgd", "adam") == "adam"


def test_python_values_of_the_right_type_pass_through():
    assert parse(0.5, 2) == 2.0 and type(parse(0.5, 2)) is float
    assert parse(3, 5) == 5


@pytest.mark.parametrize(
    ("default", "text", "type_name"),
    [(64, "2.5", "int"), (64, "many", "int"), (0.1, "fast", "float"), (True, "maybe", "bool")],
)
def test_wrong_type_names_the_key_and_the_expected_type(default, text, type_name):
    with pytest.raises(UserError) as caught:
        parse(default, text, name="batch_size")
    message = str(caught.value)
    assert message == f"{OWNER} setting 'batch_size' expects {type_name}, got {text!r}"


def test_choices_accept_listed_values_and_reject_others():
    spec = TRAINING_HPARAMS["optimizer"]
    assert spec.choices == OPTIMIZERS
    for option in OPTIMIZERS:
        assert spec.parse("optimizer", option, OWNER) == option
    with pytest.raises(UserError) as caught:
        spec.parse("optimizer", "rmsprop", OWNER)
    assert str(caught.value) == (
        "method 'erm' setting 'optimizer' must be one of sgd, adam, adamw, got 'rmsprop'"
    )


def test_choices_apply_after_type_conversion():
    assert parse(1, "2", choices=(1, 2, 4)) == 2
    with pytest.raises(UserError, match="must be one of 1, 2, 4, got '3'"):
        parse(1, "3", choices=(1, 2, 4))


def test_with_default_keeps_the_rest():
    spec = HParam(0.1, "lr", choices=(0.1, 0.2))
    changed = spec.with_default(0.2)
    assert changed.default == 0.2
    assert (changed.help, changed.choices) == ("lr", (0.1, 0.2))
    assert spec.default == 0.1


# --- resolve -----------------------------------------------------------------------------------

SPECS = {
    "lr": HParam(0.1, "learning rate"),
    "steps": HParam(10, "steps"),
    "flag": HParam(False, "a switch"),
    "name": HParam("a", "a name", choices=("a", "b")),
}


def test_resolve_fills_defaults_and_parses_overrides():
    values = resolve(SPECS, {"lr": "0.5", "flag": "yes"}, OWNER)
    assert values == {"lr": 0.5, "steps": 10, "flag": True, "name": "a"}


def test_resolve_unknown_key_lists_the_valid_keys():
    with pytest.raises(UserError) as caught:
        resolve(SPECS, {"learning_rate": "0.5"}, OWNER)
    assert str(caught.value) == (
        "unknown method 'erm' setting learning_rate; valid keys: flag, lr, name, steps"
    )


def test_resolve_several_unknown_keys_are_all_named():
    with pytest.raises(UserError) as caught:
        resolve(SPECS, {"zz": 1, "aa": 2, "lr": 0.3}, OWNER)
    assert str(caught.value).startswith("unknown method 'erm' settings aa, zz; valid keys: ")


def test_resolve_with_no_settings_says_none():
    with pytest.raises(UserError, match=r"valid keys: \(none\)"):
        resolve({}, {"x": 1}, "dataset 'toy'")


def test_method_specs_take_the_dataset_defaults_and_parse_to_their_type():
    dataset = Synthetic()
    specs = ERM.hparam_specs(dataset)
    assert set(TRAINING_HPARAMS) <= set(specs)
    defaults = resolve(specs, {}, OWNER)
    assert defaults == {
        "lr": 1e-2,
        "weight_decay": 0.0,
        "batch_size": 0,
        "optimizer": "sgd",
        "momentum": 0.0,
        "class_balanced": False,
        "lr_schedule": "constant",
        "no_decay_groups": False,
        "zero_init_head": False,
    }
    assert resolve(specs, {"batch_size": "100", "lr": "3e-2"}, OWNER)["batch_size"] == 100
    assert set(ERM.search_space(dataset)) == {"lr", "weight_decay", "batch_size"}
    # The search space replaces the distribution but keeps the type and default.
    assert specs["batch_size"].default == 0
    assert specs["optimizer"].choices == OPTIMIZERS


def test_dataset_parameters_are_resolved_the_same_way():
    assert Synthetic(noise_std="0").config["noise_std"] == 0.0
    with pytest.raises(
        UserError,
        match=r"unknown dataset 'synthetic' setting noise; did you mean noise_std\? valid",
    ):
        Synthetic(noise="0")


def test_a_misspelt_method_setting_suggests_the_closest_key():
    specs = METHODS.get("lc").hparam_specs(Synthetic())
    with pytest.raises(UserError) as caught:
        resolve(specs, {"temperatur": "2"}, "method 'lc'")
    message = str(caught.value)
    assert message.startswith("unknown method 'lc' setting temperatur; did you mean temperature? ")
    assert "valid keys: " + ", ".join(sorted(specs)) in message
    assert "\n" not in message


def test_several_misspelt_keys_each_get_their_suggestion():
    with pytest.raises(UserError) as caught:
        resolve(SPECS, {"stepz": 1, "flg": 2, "zzz": 3}, OWNER)
    assert str(caught.value) == (
        "unknown method 'erm' settings flg, stepz, zzz; did you mean flag for flg, steps for "
        "stepz? valid keys: flag, lr, name, steps"
    )


def test_a_misspelt_dataset_parameter_suggests_the_closest_key():
    with pytest.raises(
        UserError, match=r"setting nosie_std; did you mean noise_std\? valid keys: "
    ):
        Synthetic(nosie_std="0")


# --- bounds ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bounds", "inside", "outside", "described"),
    [
        ({"gt": 0}, [1e-12, 5.0], [0.0, -0.1], "a finite float > 0"),
        ({"ge": 0}, [0.0, 3.0], [-1e-12, -1.0], "a finite float >= 0"),
        ({"ge": 0, "lt": 1}, [0.0, 0.99], [1.0, -0.5], "a finite float in [0, 1)"),
        ({"gt": 0, "le": 1}, [1.0, 0.5], [0.0, 1.5], "a finite float in (0, 1]"),
        ({"le": 2.5}, [2.5, -7.0], [2.6], "a finite float <= 2.5"),
        ({"lt": 0}, [-1.0], [0.0], "a finite float < 0"),
    ],
)
def test_float_bounds_accept_inside_and_reject_outside(bounds, inside, outside, described):
    spec = HParam(inside[0], "help", **bounds)
    assert spec.describe_range() == described
    for value in inside:
        assert spec.parse("key", str(value), OWNER) == value
    for value in outside:
        with pytest.raises(UserError) as caught:
            spec.parse("key", str(value), OWNER)
        assert str(caught.value) == f"{OWNER} setting 'key' must be {described}, got {str(value)!r}"


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "NaN", "1e999"])
def test_floats_must_be_finite_even_without_bounds(text):
    with pytest.raises(UserError) as caught:
        parse(0.5, text, name="scale")
    assert str(caught.value) == f"{OWNER} setting 'scale' must be a finite float, got {text!r}"
    with pytest.raises(UserError, match="must be a finite float"):
        parse(0.5, math.nan, name="scale")


@pytest.mark.parametrize("text", ["nan", "inf", "1e999"])
def test_non_finite_text_for_an_int_is_a_type_error(text):
    with pytest.raises(UserError, match="expects int"):
        parse(64, text, name="batch_size")


def test_int_bounds_name_the_integer_range():
    seed = HParam(0, "seed", ge=0, le=MAX_SEED)
    assert seed.parse("seed", str(MAX_SEED), OWNER) == MAX_SEED
    for text in ("-1", str(MAX_SEED + 1), "99999999999999999999"):
        with pytest.raises(UserError) as caught:
            seed.parse("seed", text, OWNER)
        assert str(caught.value) == (
            f"{OWNER} setting 'seed' must be an int in [0, 4294967295], got {text!r}"
        )


@pytest.mark.parametrize(
    ("name", "text", "described"),
    [
        ("lr", "nan", "a finite float > 0"),
        ("lr", "-0.1", "a finite float > 0"),
        ("lr", "0", "a finite float > 0"),
        ("lr", "inf", "a finite float > 0"),
        ("weight_decay", "-1", "a finite float >= 0"),
        ("batch_size", "-3", "an int >= 0"),
        ("momentum", "1", "a finite float in [0, 1)"),
    ],
)
def test_training_settings_out_of_range_name_the_setting_and_the_range(name, text, described):
    specs = ERM.hparam_specs(Synthetic())
    with pytest.raises(UserError) as caught:
        resolve(specs, {name: text}, OWNER)
    assert str(caught.value) == f"{OWNER} setting {name!r} must be {described}, got {text!r}"


def test_full_batch_size_zero_stays_allowed():
    assert resolve(ERM.hparam_specs(Synthetic()), {"batch_size": "0"}, OWNER)["batch_size"] == 0


def test_dataset_parameters_are_bounded_too():
    with pytest.raises(UserError) as caught:
        Synthetic(noise_std="-0.5")
    assert str(caught.value) == (
        "dataset 'synthetic' setting 'noise_std' must be a finite float >= 0, got '-0.5'"
    )
    with pytest.raises(UserError, match=r"'majority' must be a finite float in \[0, 1\]"):
        Synthetic(majority="1.5")


def test_declarations_that_break_their_own_bounds_are_refused():
    with pytest.raises(ValueError, match="at most one lower bound"):
        HParam(1.0, "help", gt=0, ge=0)
    with pytest.raises(ValueError, match="at most one upper bound"):
        HParam(0.5, "help", lt=1, le=1)
    with pytest.raises(ValueError, match="default -1.0 is not a finite float >= 0"):
        HParam(-1.0, "help", ge=0)
    with pytest.raises(ValueError, match="default nan"):
        HParam(math.nan, "help")
    with pytest.raises(ValueError, match=r"reaches \[0.0\]"):
        HParam(0.1, "help", search=FloatDistribution(0.0, 1.0), gt=0)
    with pytest.raises(ValueError, match=r"reaches \[0\]"):
        HParam(1, "help", search=CategoricalDistribution([0, 1, 2]), ge=1)
    with pytest.raises(ValueError, match="default 0.0"):
        HParam(1.0, "help", gt=0).with_default(0.0)


def test_search_range_is_the_extremes_or_every_choice():
    assert search_range(FloatDistribution(1e-5, 1e-2, log=True)) == (1e-5, 1e-2)
    assert search_range(IntDistribution(2, 100)) == (2, 100)
    assert search_range(CategoricalDistribution([32, 64])) == (32, 64)
    assert search_range(None) == ()


def _every_dataset(data_dir):
    """One instance of every registered dataset; text ones on the offline backbone. File-backed
    datasets read nothing until a split is asked for."""
    for info in DATASETS:
        extra = {"backbone": "minilm"} if issubclass(info.cls, TextBenchmark) else {}
        yield info.cls(data_dir=data_dir, **extra)


def test_every_default_and_search_range_lies_within_its_bounds(tmp_path):
    checked = 0
    for dataset in _every_dataset(tmp_path):
        for name, spec in dataset.params.items():
            assert spec.allows(spec.default), (dataset.name, name, spec.default)
        for info in METHODS:
            specs = info.cls.hparam_specs(dataset)
            for name, spec in specs.items():
                where = (info.name, dataset.name, name)
                assert spec.allows(spec.default), (*where, spec.default)
                for value in search_range(spec.search):
                    assert spec.allows(value), (*where, value, spec.describe_range())
                    checked += 1
            for name, distribution in info.cls.search_space(dataset).items():
                assert all(specs[name].allows(v) for v in search_range(distribution)), name
    assert checked > 100


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("lr", "> 0"),
        ("weight_decay", ">= 0"),
        ("batch_size", ">= 0"),
        ("momentum", "in [0, 1)"),
    ],
)
def test_shared_training_settings_declare_their_bounds(name, expected):
    assert TRAINING_HPARAMS[name].describe_range().endswith(expected)


@pytest.mark.parametrize(
    ("method", "name", "expected"),
    [
        ("groupdro", "eta", "a finite float > 0"),
        ("jtt", "upsample", "an int >= 1"),
        ("jtt", "first_stage_frac", "a finite float > 0"),
        ("afr", "train_prop", "a finite float in (0, 1)"),
        ("afr", "gamma", "a finite float >= 0"),
        ("dfr", "C", "a finite float >= 0"),
        ("lff", "q", "a finite float in (0, 1]"),
        ("lc", "ema", "a finite float in [0, 1)"),
        ("lc", "mixup_rampup", "a finite float in [0, 1]"),
        ("mat", "temperature", "a finite float > 0"),
    ],
)
def test_method_settings_declare_their_bounds(method, name, expected):
    assert METHODS.get(method).hparams[name].describe_range() == expected


# --- key=value lists ---------------------------------------------------------------------------


def test_parse_assignments():
    assert parse_assignments(["lr=0.1", " batch-size = 32 ", "tag=a=b", "empty="], "--set") == {
        "lr": "0.1",
        "batch_size": "32",
        "tag": "a=b",
        "empty": "",
    }
    assert parse_assignments(None, "--set") == {}
    assert parse_assignments([], "--data") == {}


def test_later_assignments_win():
    assert parse_assignments(["lr=0.1", "lr=0.2"], "--set") == {"lr": "0.2"}


@pytest.mark.parametrize("item", ["lr", "=0.1", " =3", ""])
def test_parse_assignments_rejects_items_without_a_key_and_equals(item):
    with pytest.raises(UserError) as caught:
        parse_assignments(["steps=1", item], "--data")
    assert str(caught.value) == f"--data expects key=value, got {item!r}"


# --- known bugs --------------------------------------------------------------------------------


def test_large_int_text_keeps_every_digit():
    assert parse(1234, "9007199254740993") == 9007199254740993


def test_non_integral_python_float_is_rejected_for_an_int_setting():
    with pytest.raises(UserError, match="expects int"):
        parse(64, 2.5, name="batch_size")
