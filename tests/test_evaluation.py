"""Accuracy metrics from hand-made logits, and model selection by a criterion."""

from __future__ import annotations

import math

import pytest
import torch

from robustbench_mat.data import EvalGroups, GroupedSplit
from robustbench_mat.errors import UserError
from robustbench_mat.evaluation import (
    _group_accuracy,
    _reference_split_metrics,
    check_criterion,
    inferred_group_metrics,
    is_better,
    metric_key,
    predict,
    select,
    split_metrics,
    split_metrics_many,
    train_group_weights,
)
from robustbench_mat.regimes import (
    REGIMES,
    check_allowed,
    check_criterion_allowed,
    default_regime,
    get_regime,
)

CLASSES = ("y0", "y1")
GROUPS = ("y0/a0", "y0/a1", "y1/a0", "y1/a1")


def logits_for(y: torch.Tensor, correct: list[int]) -> torch.Tensor:
    """Two-class logits that predict y where `correct` is 1 and the other class elsewhere."""
    predicted = torch.where(torch.tensor(correct, dtype=torch.bool), y, 1 - y)
    logits = torch.full((len(y), 2), -1.0)
    logits[torch.arange(len(y)), predicted] = 2.0
    return logits


def grouped(name: str, g: list[int]) -> GroupedSplit:
    g_t = torch.tensor(g)
    y, a = g_t // 2, g_t % 2
    return GroupedSplit(name, torch.zeros(len(g), 1), y, a, 2, EvalGroups.from_ids(g_t, GROUPS))


# Groups 0,0,0 | 1 | 2 | 3,3,3 with 2/3, 1/1, 1/1, 1/3 correct.
SPLIT = grouped("val", [0, 0, 0, 1, 2, 3, 3, 3])
CORRECT = [1, 1, 0, 1, 1, 1, 0, 0]


def test_split_metrics_by_hand():
    logits = logits_for(SPLIT.y, CORRECT)
    weights = torch.tensor([0.4, 0.1, 0.1, 0.4], dtype=torch.float64)
    metrics = split_metrics(SPLIT, logits, CLASSES, weights)
    assert metrics["val_avg"] == pytest.approx(5 / 8)
    assert metrics["val_group_acc.y0-a0"] == pytest.approx(2 / 3)
    assert metrics["val_group_acc.y0-a1"] == pytest.approx(1.0)
    assert metrics["val_group_acc.y1-a0"] == pytest.approx(1.0)
    assert metrics["val_group_acc.y1-a1"] == pytest.approx(1 / 3)
    assert metrics["val_wga"] == pytest.approx(1 / 3)
    # Class y0: 3 of 4 correct; class y1: 2 of 4.
    assert metrics["val_class_acc.y0"] == pytest.approx(3 / 4)
    assert metrics["val_class_acc.y1"] == pytest.approx(2 / 4)
    assert metrics["val_worst_class"] == pytest.approx(1 / 2)
    # 0.4 * 2/3 + 0.1 * 1 + 0.1 * 1 + 0.4 * 1/3 = 0.6
    assert metrics["val_avg_train_weighted"] == pytest.approx(0.6)
    assert set(metrics) == {
        "val_avg",
        "val_wga",
        "val_avg_train_weighted",
        "val_worst_class",
        *(f"val_group_acc.{g.replace('/', '-')}" for g in GROUPS),
        "val_class_acc.y0",
        "val_class_acc.y1",
    }
    assert all(isinstance(v, float) for v in metrics.values())


def test_avg_train_weighted_is_omitted_without_weights_and_normalised_with_them():
    logits = logits_for(SPLIT.y, CORRECT)
    assert "val_avg_train_weighted" not in split_metrics(SPLIT, logits, CLASSES)
    unnormalised = torch.tensor([4.0, 1.0, 1.0, 4.0], dtype=torch.float64)
    metrics = split_metrics(SPLIT, logits, CLASSES, unnormalised)
    assert metrics["val_avg_train_weighted"] == pytest.approx(0.6)


def test_train_group_weights_are_group_proportions():
    weights = train_group_weights(grouped("train", [0, 0, 0, 1, 2, 3, 3, 3]))
    assert torch.allclose(weights, torch.tensor([3, 1, 1, 3], dtype=torch.float64) / 8)


def test_all_correct_and_all_wrong():
    perfect = split_metrics(SPLIT, logits_for(SPLIT.y, [1] * 8), CLASSES)
    assert perfect["val_avg"] == perfect["val_wga"] == perfect["val_worst_class"] == 1.0
    wrong = split_metrics(SPLIT, logits_for(SPLIT.y, [0] * 8), CLASSES)
    assert wrong["val_avg"] == wrong["val_wga"] == wrong["val_worst_class"] == 0.0


def test_overlapping_groups_count_an_example_in_each_of_its_groups():
    y = torch.tensor([0, 1, 1, 0])
    membership = torch.tensor(
        [[1, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 1]], dtype=torch.bool
    )  # example 2 is in A and B, example 3 in B and C
    split = GroupedSplit(
        "test",
        torch.zeros(4, 1),
        y,
        torch.zeros(4, dtype=torch.long),
        1,
        EvalGroups(("A", "B", "C"), membership),
    )
    logits = logits_for(y, [1, 1, 0, 1])
    weights = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    metrics = split_metrics(split, logits, CLASSES, weights)
    assert metrics["test_group_acc.A"] == pytest.approx(2 / 3)
    assert metrics["test_group_acc.B"] == pytest.approx(1 / 2)
    assert metrics["test_group_acc.C"] == pytest.approx(1.0)
    assert metrics["test_wga"] == pytest.approx(1 / 2)
    assert metrics["test_avg"] == pytest.approx(3 / 4)  # each example once
    assert metrics["test_avg_train_weighted"] == pytest.approx(0.5 * 2 / 3 + 0.25 / 2 + 0.25)


def test_empty_group_is_excluded_from_wga_and_weighted_average():
    split = grouped("val", [0, 0, 2, 3])  # group 1 (y0/a1) is empty
    logits = logits_for(split.y, [1, 0, 1, 1])
    weights = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)
    metrics = split_metrics(split, logits, CLASSES, weights)
    assert "val_group_acc.y0-a1" not in metrics
    assert metrics["val_wga"] == pytest.approx(0.5)  # not 0 from the empty group
    # Weighted over the three present groups: (0.5 + 1 + 1) / 3.
    assert metrics["val_avg_train_weighted"] == pytest.approx(2.5 / 3)


def test_absent_class_is_excluded_from_worst_class():
    split = grouped("val", [2, 3, 3])  # class y0 absent
    metrics = split_metrics(split, logits_for(split.y, [1, 1, 0]), CLASSES)
    assert "val_class_acc.y0" not in metrics
    assert metrics["val_worst_class"] == pytest.approx(2 / 3)


def _random_split(generator: torch.Generator, kind: str) -> tuple[GroupedSplit, tuple]:
    n = int(torch.randint(1, 60, (1,), generator=generator))
    n_groups = int(torch.randint(1, 7, (1,), generator=generator))
    n_classes = int(torch.randint(1, 5, (1,), generator=generator))
    if kind == "overlapping":
        membership = torch.rand(n, n_groups, generator=generator) < 0.4
    else:
        ids = torch.randint(0, n_groups, (n,), generator=generator)
        membership = torch.zeros(n, n_groups, dtype=torch.bool)
        in_a_group = torch.ones(n, dtype=torch.bool)
        if kind == "some in none":
            in_a_group = torch.rand(n, generator=generator) < 0.7
        membership[torch.arange(n)[in_a_group], ids[in_a_group]] = True
    y = torch.randint(0, n_classes, (n,), generator=generator)
    names = tuple(f"g{k}/x" for k in range(n_groups))
    groups = EvalGroups(names, membership)
    split = GroupedSplit("val", torch.zeros(n, 1), y, torch.zeros(n, dtype=torch.long), 2, groups)
    return split, tuple(f"c{k}" for k in range(n_classes))


def _outcome(function, *args):
    try:
        return function(*args)
    except Exception as error:  # the same error type is part of the same behaviour
        return type(error)


def _direct_inferred(logits: torch.Tensor, split: GroupedSplit) -> dict[str, float]:
    correct = (logits.argmax(1) == split.y).double()
    accuracy, present = _group_accuracy(correct, split.eval_groups.membership)
    values = accuracy[present].tolist()
    expected = {
        "val_inferred_wga": accuracy[present].min().item(),
        "val_inferred_balanced": sum(values) / len(values),
    }
    for k, name in enumerate(split.eval_groups.names):
        if present[k]:
            expected[f"val_inferred_group_acc.{metric_key(name)}"] = accuracy[k].item()
    return expected


@pytest.mark.parametrize("kind", ["one group each", "some in none", "overlapping"])
def test_fast_metrics_equal_the_direct_computation_bit_for_bit(kind):
    generator = torch.Generator().manual_seed(0)
    for _ in range(150):
        split, classes = _random_split(generator, kind)
        n_groups = split.eval_groups.membership.shape[1]
        weights = torch.rand(n_groups, generator=generator, dtype=torch.float64)
        for group_weights in (None, weights / weights.sum()):
            for _ in range(2):  # the second call uses the cached layout
                logits = torch.randn(len(split.y), len(classes), generator=generator)
                fast = _outcome(split_metrics, split, logits, classes, group_weights)
                direct = _outcome(_reference_split_metrics, split, logits, classes, group_weights)
                assert fast == direct
                if isinstance(fast, dict):
                    assert list(fast) == list(direct)  # the same key order (history.csv columns)
                    assert all(type(value) is float for value in fast.values())
                inferred = _outcome(
                    inferred_group_metrics, "val", logits, split.y, split.eval_groups
                )
                assert inferred == _outcome(_direct_inferred, logits, split)


@pytest.mark.parametrize("kind", ["one group each", "some in none", "overlapping"])
def test_many_models_metrics_equal_each_models_bit_for_bit(kind):
    """`split_metrics_many` (a stack's models, an evaluation block's steps) gives each model's
    `split_metrics`, to the last bit and in the same key order."""
    generator = torch.Generator().manual_seed(1)
    for _ in range(100):
        split, classes = _random_split(generator, kind)
        n_groups = split.eval_groups.membership.shape[1]
        weights = torch.rand(n_groups, generator=generator, dtype=torch.float64)
        models = int(torch.randint(1, 6, (1,), generator=generator))
        logits = torch.randn(models, len(split.y), len(classes), generator=generator)
        for group_weights in (None, weights / weights.sum()):
            many = _outcome(split_metrics_many, split, logits, classes, group_weights)
            each = [_outcome(split_metrics, split, one, classes, group_weights) for one in logits]
            if isinstance(many, type):  # an error: the same one each model raises
                assert all(e is many for e in each)
                continue
            assert many == each
            assert [list(m) for m in many] == [list(e) for e in each]


def test_metrics_follow_labels_changed_in_place_and_reject_empty_splits():
    split = grouped("val", [0, 0, 2, 3])
    logits = logits_for(split.y, [1, 1, 1, 1])
    assert split_metrics(split, logits, CLASSES)["val_avg"] == 1.0
    split.y[0] = 1  # the cached layout must not outlive a change of the labels
    changed = split_metrics(split, logits, CLASSES)
    assert changed == _reference_split_metrics(split, logits, CLASSES)
    assert changed["val_avg"] == 0.75
    none = torch.zeros(0, dtype=torch.long)
    no_groups = EvalGroups(GROUPS, torch.zeros(0, 4, dtype=torch.bool))
    empty = GroupedSplit("val", torch.zeros(0, 1), none, none, 2, no_groups)
    with pytest.raises(RuntimeError):
        split_metrics(empty, torch.zeros(0, 2), CLASSES)


def test_metric_keys_are_mlflow_safe():
    assert metric_key("y0/a1") == "y0-a1"
    assert metric_key("male & black") == "male-black"
    assert metric_key("  odd:name!! ") == "odd-name"
    assert metric_key("a_b.c-d") == "a_b.c-d"


def test_predict_returns_logits_in_order_for_tensors_and_datasets():
    x = torch.arange(10.0)[:, None]
    split = grouped("test", [0] * 10)
    split.inputs = x
    double = lambda batch: torch.cat([batch, -batch], 1)  # noqa: E731
    out = predict(double, split, torch.device("cpu"), batch_size=3)
    assert torch.equal(out, torch.cat([x, -x], 1))
    split.inputs = list(x)  # a map-style dataset
    assert torch.equal(predict(double, split, torch.device("cpu"), batch_size=4), out)


# --- selection ---------------------------------------------------------------------------------


def history(*values):
    return [{"step": 10 * (i + 1), "val_wga": v, "val_avg": 0.5} for i, v in enumerate(values)]


def test_select_picks_the_maximum():
    assert select(history(0.2, 0.9, 0.5, 0.1), "val_wga")["step"] == 20


def test_select_ties_go_to_the_later_step():
    assert select(history(0.5, 0.7, 0.7, 0.6), "val_wga")["step"] == 30
    assert select(history(0.5, 0.5, 0.5), "val_avg")["step"] == 30


def test_nan_never_wins():
    nan = math.nan
    assert select(history(nan, 0.1, nan), "val_wga")["step"] == 20
    assert select(history(0.1, nan), "val_wga")["step"] == 10
    assert select(history(nan, 0.0), "val_wga")["step"] == 20
    assert not is_better(nan, 0.0)
    assert is_better(0.0, nan)
    assert is_better(nan, None)
    assert is_better(0.3, 0.3) and not is_better(0.2, 0.3)


def test_select_returns_the_record_itself():
    records = history(0.1, 0.3)
    assert select(records, "val_wga") is records[1]


def test_select_unknown_criterion_lists_the_measured_ones():
    with pytest.raises(UserError) as caught:
        select(history(0.1), "val_wgaa")
    assert str(caught.value) == (
        "selection criterion 'val_wgaa' was not measured; measured: val_avg, val_wga"
    )


def test_select_on_empty_history():
    with pytest.raises(ValueError, match="no evaluation"):
        select([], "val_wga")


@pytest.mark.parametrize("criterion", ["test_wga", "train_avg", "wga", "test_worst_class"])
def test_check_criterion_rejects_non_validation_metrics(criterion):
    with pytest.raises(UserError, match=f"selection criterion '{criterion}' must be a validation"):
        check_criterion(criterion)


@pytest.mark.parametrize("criterion", ["val_wga", "val_worst_class", "val_avg"])
def test_check_criterion_accepts_validation_metrics(criterion):
    check_criterion(criterion)


# --- regimes -----------------------------------------------------------------------------------


def test_regimes_and_their_default_criteria():
    assert list(REGIMES) == ["full", "val-only", "none"]
    assert get_regime("none").default_criterion == "val_inferred_wga"
    assert default_regime(needs_train_groups=False).name == "val-only"
    assert default_regime(needs_train_groups=True).name == "full"
    with pytest.raises(UserError, match="unknown regime 'partial'; known: full, val-only, none"):
        get_regime("partial")


@pytest.mark.parametrize("criterion", ["val_wga", "val_group_acc.y0-a1", "val_avg_train_weighted"])
def test_group_criteria_need_validation_groups(criterion):
    check_criterion_allowed(criterion, get_regime("val-only"))
    with pytest.raises(UserError, match="withholds; use val_inferred_wga .*, val_worst_class"):
        check_criterion_allowed(criterion, get_regime("none"))


def test_label_only_criteria_work_without_groups():
    for criterion in ("val_worst_class", "val_avg", "val_class_acc.y0"):
        check_criterion_allowed(criterion, get_regime("none"))
    with pytest.raises(UserError, match="must be a validation metric"):
        check_criterion_allowed("test_avg", get_regime("full"))


def test_methods_needing_training_groups_are_refused_in_other_regimes():
    check_allowed("groupdro", True, get_regime("full"))
    check_allowed("erm", False, get_regime("none"))
    with pytest.raises(UserError, match="'groupdro' needs training group labels.*: full$"):
        check_allowed("groupdro", True, get_regime("val-only"))
    with pytest.raises(UserError, match="'dfr' needs validation group labels.*: full, val-only$"):
        check_allowed("dfr", False, get_regime("none"), needs_val_groups=True)
