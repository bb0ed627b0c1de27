"""Hyperparameter declarations: a default, a help text and an Optuna search distribution.

A hyperparameter's type is the type of its default. Values given as text (`--set lr=0.1`) are
parsed to that type; unknown names and unparsable values fail with the list of valid keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from optuna.distributions import BaseDistribution

from robustbench_mat.errors import UserError


@dataclass(frozen=True)
class HParam:
    """One tunable setting: its default, what it means and, optionally, its search space."""

    default: Any
    help: str
    search: BaseDistribution | None = None
    choices: tuple[Any, ...] | None = None

    def with_default(self, default: Any) -> HParam:
        return replace(self, default=default)

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
        return parsed


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
            f"valid keys: {valid}"
        )
    values = {name: spec.default for name, spec in specs.items()}
    for name, value in overrides.items():
        values[name] = specs[name].parse(name, value, owner)
    return values


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
