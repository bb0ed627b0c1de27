"""Hyperparameter declarations: parsing from text, choices, unknown keys, `key=value` lists."""

from __future__ import annotations

import pytest

from robustbench_mat.datasets.synthetic import Synthetic
from robustbench_mat.errors import UserError
from robustbench_mat.hparams import HParam, parse_assignments, resolve
from robustbench_mat.method import OPTIMIZERS, TRAINING_HPARAMS
from robustbench_mat.methods.erm import ERM

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
    }
    assert resolve(specs, {"batch_size": "100", "lr": "3e-2"}, OWNER)["batch_size"] == 100
    assert set(ERM.search_space(dataset)) == {"lr", "weight_decay", "batch_size"}
    # The search space replaces the distribution but keeps the type and default.
    assert specs["batch_size"].default == 0
    assert specs["optimizer"].choices == OPTIMIZERS


def test_dataset_parameters_are_resolved_the_same_way():
    assert Synthetic(noise_std="0").config["noise_std"] == 0.0
    with pytest.raises(UserError, match="unknown dataset 'synthetic' setting noise; valid keys"):
        Synthetic(noise="0")


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
