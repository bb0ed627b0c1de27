"""Hyperparameter declarations: a default, a help text, bounds and an Optuna search distribution.

A hyperparameter's type is the type of its default. Values given as text (`--set lr=0.1`) are
parsed to that type; unknown names and unparsable values fail with the list of valid keys.
Bounds follow the `gt` / `ge` / `lt` / `le` convention (value > gt, >= ge, < lt, <= le); float
values must always be finite. A declaration whose default or search range breaks its own bounds
is a programming error (ValueError); a value given by the user outside them is a `UserError`.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from robustbench_mat.errors import UserError

if TYPE_CHECKING:  # Optuna is imported where a search space is built, not by the command line
    from optuna.distributions import BaseDistribution

# Seeds are taken in numpy's legacy range, which `training.seed_everything` passes on unchanged.
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class HParam:
    """One tunable setting: its default, what it means and, optionally, its search space."""

    default: Any
    help: str
    search: BaseDistribution | None = None
    choices: tuple[Any, ...] | None = None
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def __post_init__(self) -> None:
        if self.gt is not None and self.ge is not None:
            raise ValueError("declare at most one lower bound (gt or ge)")
        if self.lt is not None and self.le is not None:
            raise ValueError("declare at most one upper bound (lt or le)")
        if not self.allows(self.default):
            raise ValueError(f"default {self.default!r} is not {self.describe_range()}")
        outside = [v for v in search_range(self.search) if not self.allows(v)]
        if outside:
            raise ValueError(
                f"search distribution {self.search} reaches {outside}, not {self.describe_range()}"
            )

    def with_default(self, default: Any) -> HParam:
        return replace(self, default=default)

    def allows(self, value: Any) -> bool:
        """Whether `value` (of this type) is finite, if a float, and within the bounds."""
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return True
        return (
            (self.gt is None or value > self.gt)
            and (self.ge is None or value >= self.ge)
            and (self.lt is None or value < self.lt)
            and (self.le is None or value <= self.le)
        )

    def describe_range(self) -> str:
        """The allowed values in words, e.g. 'a finite float in [0, 1)' or 'an int >= 1'."""
        kind = type(self.default).__name__
        noun = {"float": "a finite float", "int": "an int"}.get(kind, f"a {kind}")
        low = ("(", self.gt) if self.gt is not None else ("[", self.ge)
        high = (")", self.lt) if self.lt is not None else ("]", self.le)
        if low[1] is not None and high[1] is not None:
            return f"{noun} in {low[0]}{_number(low[1])}, {_number(high[1])}{high[0]}"
        if low[1] is not None:
            return f"{noun} {'>' if low[0] == '(' else '>='} {_number(low[1])}"
        if high[1] is not None:
            return f"{noun} {'<' if high[0] == ')' else '<='} {_number(high[1])}"
        return noun

    def parse(self, name: str, value: Any, owner: str) -> Any:
        """Convert `value` (text from the command line, or a Python value) to this type."""
        kind = type(self.default)
        try:
            if kind is bool:
                parsed = _parse_bool(value)
            elif kind is int:
                parsed = _parse_int(value)
            elif kind is float and isinstance(value, str):
                parsed = float(value)
            else:
                parsed = kind(value)
        except (TypeError, ValueError):
            raise UserError(
                f"{owner} setting {name!r} expects {kind.__name__}, got {value!r}"
            ) from None
        if self.choices is not None and parsed not in self.choices:
            options = ", ".join(map(str, self.choices))
            raise UserError(f"{owner} setting {name!r} must be one of {options}, got {value!r}")
        if not self.allows(parsed):
            raise UserError(
                f"{owner} setting {name!r} must be {self.describe_range()}, got {value!r}"
            )
        return parsed


def search_range(distribution: BaseDistribution | None) -> tuple[Any, ...]:
    """The extreme values `distribution` can propose: low and high, or every choice."""
    if distribution is None:
        return ()
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    if isinstance(distribution, (FloatDistribution, IntDistribution)):
        return (distribution.low, distribution.high)
    if isinstance(distribution, CategoricalDistribution):
        return tuple(distribution.choices)
    return ()


def _number(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() and abs(bound) < 1e15 else str(bound)


def _parse_int(value: Any) -> int:
    """An integer from int-like text ("12", "1e3") or a whole number; never truncates."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            value = float(value)
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(value)
    return int(value)


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise ValueError(value)


def resolve(
    specs: Mapping[str, HParam], overrides: Mapping[str, Any], owner: str
) -> dict[str, Any]:
    """Defaults of `specs` updated by `overrides`, each parsed to its declared type."""
    unknown = sorted(set(overrides) - set(specs))
    if unknown:
        valid = ", ".join(sorted(specs)) or "(none)"
        raise UserError(
            f"unknown {owner} setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
            f"{closest_keys(unknown, sorted(specs))}valid keys: {valid}"
        )
    values = {name: spec.default for name, spec in specs.items()}
    for name, value in overrides.items():
        values[name] = specs[name].parse(name, value, owner)
    return values


def closest_keys(unknown: list[str], known: list[str]) -> str:
    """'did you mean X? ' for the one unknown key, 'did you mean X for x, Y for y? ' for several
    (the keys without a close match are left out); '' when none is close."""
    matches = [(key, difflib.get_close_matches(key, known, n=1)) for key in unknown]
    found = [(key, close[0]) for key, close in matches if close]
    if not found:
        return ""
    if len(unknown) == 1:
        return f"did you mean {found[0][1]}? "
    return "did you mean " + ", ".join(f"{close} for {key}" for key, close in found) + "? "


def sample_configurations(
    space: Mapping[str, BaseDistribution], n: int, seed: int = 0
) -> list[dict[str, Any]]:
    """`n` configurations drawn at random from `space` (Optuna's RandomSampler, seeded)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return [study.ask(dict(space)).params for _ in range(n)]


def parse_assignments(items: list[str] | None, flag: str) -> dict[str, str]:
    """`["lr=0.1", "steps=10"]` -> `{"lr": "0.1", "steps": "10"}`."""
    parsed: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{flag} expects key=value, got {item!r}")
        parsed[key.strip().replace("-", "_")] = value.strip()
    return parsed
