"""The three annotation regimes of the MAT paper: which group labels a method may see.

| regime     | training groups | validation groups | default selection criterion  |
|------------|-----------------|-------------------|------------------------------|
| `full`     | yes             | yes               | `val_wga` (true groups)      |
| `val-only` | no              | yes               | `val_wga` (true groups)      |
| `none`     | no              | no                | `val_inferred_wga`           |

Under `none` the default criterion is the worst-group accuracy on validation groups inferred by
XRM (run first, and cached, when a run needs them); `val_worst_class` needs no inference. Test
metrics are always computed on the true groups.
"""

from __future__ import annotations

from dataclasses import dataclass

from robustbench_mat.errors import UserError


@dataclass(frozen=True)
class Regime:
    """An annotation regime: the group labels available for training and for model selection."""

    name: str
    train_groups: bool
    val_groups: bool
    default_criterion: str
    description: str


REGIMES: dict[str, Regime] = {
    r.name: r
    for r in (
        Regime("full", True, True, "val_wga", "group labels in train and val"),
        Regime("val-only", False, True, "val_wga", "group labels in val only"),
        Regime("none", False, False, "val_inferred_wga", "no group labels"),
    )
}

# Criteria that read true validation group labels; every other val_* metric needs none.
_GROUP_CRITERIA_PREFIXES = ("val_wga", "val_group_acc.", "val_avg_train_weighted")


def get_regime(name: str) -> Regime:
    if name not in REGIMES:
        raise UserError(f"unknown regime {name!r}; known: {', '.join(REGIMES)}")
    return REGIMES[name]


def default_regime(needs_train_groups: bool) -> Regime:
    """`full` for methods that need training groups, else `val-only` (the paper's ERM row)."""
    return REGIMES["full" if needs_train_groups else "val-only"]


def allowed_regimes(needs_train_groups: bool, needs_val_groups: bool = False) -> list[str]:
    """The regimes that give a method the group labels it needs."""
    return [
        r.name
        for r in REGIMES.values()
        if (r.train_groups or not needs_train_groups) and (r.val_groups or not needs_val_groups)
    ]


def check_allowed(
    method_name: str,
    needs_train_groups: bool,
    regime: Regime,
    needs_val_groups: bool = False,
    alternative: str | None = None,
) -> None:
    """Refuse a method in a regime that withholds group labels the method needs, naming the
    regimes where it can run and, if any, the method that uses inferred groups instead."""
    for needed, given, which in (
        (needs_train_groups, regime.train_groups, "training"),
        (needs_val_groups, regime.val_groups, "validation"),
    ):
        if needed and not given:
            allowed = allowed_regimes(needs_train_groups, needs_val_groups)
            instead = f"; without them use {alternative!r}" if alternative else ""
            raise UserError(
                f"method {method_name!r} needs {which} group labels, which regime "
                f"{regime.name!r} withholds; it can run in: {', '.join(allowed)}{instead}"
            )


def check_criterion_allowed(criterion: str, regime: Regime) -> None:
    from robustbench_mat.evaluation import check_criterion  # imports torch: not at startup

    check_criterion(criterion)
    if not regime.val_groups and criterion.startswith(_GROUP_CRITERIA_PREFIXES):
        raise UserError(
            f"selection criterion {criterion!r} reads validation group labels, which regime "
            f"{regime.name!r} withholds; use val_inferred_wga (groups inferred by XRM), "
            "val_worst_class or val_avg"
        )
