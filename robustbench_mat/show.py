"""`robustbench-mat show NAME`: what a method or a dataset declares, read from the plugins.

For a method: every setting on a dataset (default, type or choices, bounds, search distribution,
help), the regimes it may run in, the default selection criterion in each, the group-inference
run it needs and its paper. For a dataset: its parameters, classes, groups, default budget,
model family and whether its data is prepared. Nothing is trained, loaded or downloaded.
"""

from __future__ import annotations

import difflib
import inspect
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from robustbench_mat.errors import UserError
from robustbench_mat.hparams import HParam
from robustbench_mat.regimes import REGIMES, Regime, allowed_regimes, default_regime
from robustbench_mat.registry import DATASETS, METHODS, UnknownPluginError, normalize_name

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution

    from robustbench_mat.data import BenchmarkDataset
    from robustbench_mat.method import Method

DEFAULT_DATASET = "synthetic"
WIDTH = 100
INDENT = "      "


def show(
    name: str,
    dataset: str | None = None,
    data_params: Mapping[str, Any] | None = None,
    data_dir: str | Path | None = None,
) -> str:
    """The description of method or dataset `name`; a method's settings are those on `dataset`
    (default `synthetic`) with the dataset parameters `data_params`."""
    key = normalize_name(name)
    if key in METHODS:
        dataset_cls = DATASETS.get(dataset or DEFAULT_DATASET)
        return describe_method(METHODS.get(key), dataset_cls, data_params or {})
    if key in DATASETS:
        if dataset is not None:
            raise UserError(
                f"--dataset applies to a method; {key!r} is a dataset (`robustbench-mat show "
                f"{key}` describes it)"
            )
        return describe_dataset(DATASETS.get(key), data_params or {}, data_dir)
    raise unknown_name_error(name)


def unknown_name_error(name: str) -> UnknownPluginError:
    """A one-line error naming the closest known methods and datasets and listing them all."""
    methods, datasets = METHODS.names(), DATASETS.names()
    close = difflib.get_close_matches(normalize_name(name), methods + datasets, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return UnknownPluginError(
        f"unknown method or dataset {name!r}; {hint}methods: {', '.join(methods)}; "
        f"datasets: {', '.join(datasets)}"
    )


def declared_dataset(
    dataset_cls: type[BenchmarkDataset], data_params: Mapping[str, Any]
) -> BenchmarkDataset:
    """An instance of `dataset_cls` to read declarations from: its parameters resolved and
    type-checked, but `check_config` skipped, since it may load a backbone over the network
    (the text datasets). No data is loaded."""
    unchecked = type(
        dataset_cls.__name__,
        (dataset_cls,),
        {"check_config": lambda self: None, "__module__": dataset_cls.__module__},
    )
    return unchecked(None, **data_params)


def default_criterion(method_cls: type[Method], dataset: BenchmarkDataset, regime: Regime) -> str:
    """The criterion a run selects on when `--criterion` is left out (`runner.plan` uses it)."""
    if method_cls.infers_groups and not regime.val_groups:
        return "val_worst_class"  # a group-inference run cannot select on its own groups
    return (
        dataset.default_criterion
        or method_cls.default_criteria.get(regime.name)
        or regime.default_criterion
    )


def describe_search(distribution: BaseDistribution | None) -> str:
    """A search distribution in words, e.g. 'log-uniform in [1e-05, 0.01]'; '' for none."""
    if distribution is None:
        return ""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    if isinstance(distribution, CategoricalDistribution):
        return "one of " + ", ".join(format_value(choice) for choice in distribution.choices)
    if isinstance(distribution, (FloatDistribution, IntDistribution)):
        kind = "int " if isinstance(distribution, IntDistribution) else ""
        scale = "log-uniform" if distribution.log else "uniform"
        low, high = format_value(distribution.low), format_value(distribution.high)
        step = distribution.step
        stepped = f" step {format_value(step)}" if step not in (None, 1) else ""
        return f"{kind}{scale} in [{low}, {high}]{stepped}"
    return str(distribution)


def format_value(value: Any) -> str:
    """A value as `--set` / `--data` take it: true/false, '' for an empty string."""
    if isinstance(value, bool):
        return str(value).lower()
    if value == "":
        return "''"
    return str(value)


def describe_setting(name: str, spec: HParam) -> list[str]:
    """Two or more lines: `name = default  (type; search)`, then the help text, wrapped."""
    kind = (
        "one of " + ", ".join(format_value(choice) for choice in spec.choices)
        if spec.choices is not None
        else spec.describe_range()
    )
    search = describe_search(spec.search)
    details = kind + (f"; tuned over {search}" if search else "")
    lines = [f"  {name} = {format_value(spec.default)}  ({details})"]
    lines += textwrap.wrap(spec.help, WIDTH, initial_indent=INDENT, subsequent_indent=INDENT)
    return lines


def describe_method(
    method_cls: type[Method],
    dataset_cls: type[BenchmarkDataset],
    data_params: Mapping[str, Any],
) -> str:
    dataset = declared_dataset(dataset_cls, data_params)
    info = METHODS.info(method_cls.name)
    allowed = allowed_regimes(method_cls.needs_train_groups, method_cls.needs_val_groups)
    default = default_regime(method_cls.needs_train_groups).name
    regimes = ", ".join(f"{r} (default)" if r == default else r for r in allowed)
    refused = [r for r in REGIMES if r not in allowed]
    if refused:
        instead = method_cls.inferred_groups_variant
        regimes += f"; refused: {', '.join(refused)}" + (
            f" (without group labels use {instead!r})" if instead else ""
        )
    elif not method_cls.needs_train_groups:
        regimes += " (it reads no training group labels: full repeats val-only)"
    criteria = ", ".join(
        f"{r}: {default_criterion(method_cls, dataset, REGIMES[r])}" for r in allowed
    )
    lines = [
        f"method {info.name}: {info.description}",
        f"  paper:             {method_cls.paper or '(not declared)'}",
        f"  source:            {info.source}",
        f"  regimes:           {regimes}",
        f"  default criterion: {criteria} (--criterion changes it)",
    ]
    if method_cls.group_inference:
        lines.append(
            f"  group inference:   runs {method_cls.group_inference} first to infer the groups "
            "(--infer-set, --infer-steps, --infer-data, --infer-seed, --infer-trials)"
        )
    elif "none" in allowed and default_criterion(method_cls, dataset, REGIMES["none"]).startswith(
        "val_inferred"
    ):
        lines.append(
            "  group inference:   in none, the default criterion runs xrm-infer first "
            "(--criterion val_worst_class needs none)"
        )
    specs = method_cls.hparam_specs(dataset)
    lines += ["", f"Settings on {dataset.name} (--set KEY=VALUE; `tune` searches the tuned ones):"]
    for name, spec in specs.items():
        lines += describe_setting(name, spec)
    return "\n".join(lines + _docstring_body(method_cls))


def describe_dataset(
    dataset_cls: type[BenchmarkDataset],
    data_params: Mapping[str, Any],
    data_dir: str | Path | None,
) -> str:
    dataset = declared_dataset(dataset_cls, data_params)
    info = DATASETS.info(dataset_cls.name)
    budget = f"{dataset.default_steps} steps, evaluated every {dataset.default_eval_every}"
    if dataset.default_checkpoint_every:
        budget += f", checkpointed every {dataset.default_checkpoint_every}"
    setup = dataset.paper_setup
    if setup is not None:
        budget += f"; --protocol paper: {setup.steps} steps, every {setup.eval_every}"
    criterion = dataset.default_criterion or ", ".join(
        f"{r.name}: {r.default_criterion}" for r in REGIMES.values()
    )
    overrides = dataset.default_hparams()
    training = " ".join(f"{k}={format_value(v)}" for k, v in overrides.items()) or "(the loop's)"
    groups = dataset.group_names()
    lines = [
        f"dataset {info.name}: {info.description}",
        f"  paper:              {dataset.paper or '(not declared)'}",
        f"  source:             {info.source}",
        f"  task:               {dataset.task}, model family {dataset.hparam_family}",
        f"  classes:            {', '.join(dataset.class_names)}",
        f"  attributes:         {', '.join(dataset.attribute_names)}",
        f"  training groups:    {len(groups)}: {', '.join(groups)}",
        f"  default budget:     {budget}",
        f"  default criterion:  {criterion}",
        f"  training defaults:  {training}",
        f"  data:               {data_status(dataset_cls, data_dir)}",
        *download_size(dataset_cls),
        "",
        "Parameters (--data KEY=VALUE):",
    ]
    for name, spec in dataset.params.items():
        lines += describe_setting(name, spec)
    if not dataset.params:
        lines.append("  (none)")
    return "\n".join(lines + _docstring_body(dataset_cls))


def data_status(dataset_cls: type[BenchmarkDataset], data_dir: str | Path | None) -> str:
    """Whether the prepared files of an on-disk dataset exist, and where they are looked for."""
    prepared_files = getattr(dataset_cls, "prepared_files", None)
    if prepared_files is None:
        return "generated in memory (no download)"
    from robustbench_mat.metadata import resolve_data_dir

    files = prepared_files(data_dir)
    folder = files[0].parent
    if all(path.exists() for path in files):
        return f"prepared in {folder}"
    return (
        f"not prepared in {folder}; `robustbench-mat download {dataset_cls.name} --data-dir "
        f"{resolve_data_dir(data_dir)}` fetches it"
    )


def download_size(dataset_cls: type[BenchmarkDataset]) -> list[str]:
    """The `download size` line of an on-disk dataset; none for one generated in memory."""
    upstream = getattr(dataset_cls, "upstream", ())
    if not upstream:
        return []
    from robustbench_mat.metadata import declared_download_size

    return [f"  download size:      {declared_download_size(upstream)}"]


def _docstring_body(cls: type) -> list[str]:
    """The class docstring after its first line, indented; nothing if there is none."""
    body = inspect.cleandoc(cls.__doc__ or "").split("\n", 1)[1:]
    text = body[0].strip("\n") if body else ""
    return ["", "Description:", textwrap.indent(text, "  ")] if text else []
