"""Protocols: named sets of defaults that reproduce a paper's setup, under the user's own flags.

`default` changes nothing. `paper` applies what the MAT and XRM code does on a dataset beyond its
search grid (facebookresearch/Pitfalls-of-Memorization `registry.py`, facebookresearch/XRM
`networks.py`): the step budget and evaluation cadence, the optimiser of the model family, a
zero-initialised last layer, the data each phase trains on, one group-inference run (seed 0)
for every seed, and `--grid paper` when tuning. Each dataset declares its part as a
`PaperSetup`; a setting the user gives on the command line always wins.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from robustbench_mat.errors import UserError

PROTOCOLS = ("default", "paper")

# `get_optim` and `get_network` of the XRM code, by model family. ResNets: SGD with momentum
# 0.9 and a zero last layer. BERT: AdamW with the code's decaying multiplier, decay groups and a
# zero classifier (the code puts biases and LayerNorm weights in the *decayed* group, inverting
# the usual recipe its names follow; `no_decay_groups` applies the usual one). MLPs: Adam (their
# last layer ends up Xavier-initialised, not zero).
XRM_CODE_OPTIMIZERS: dict[str, dict[str, Any]] = {
    "image": {"optimizer": "sgd", "momentum": 0.9, "zero_init_head": True},
    "text": {
        "optimizer": "adamw",
        "lr_schedule": "xrm-bert",
        "no_decay_groups": True,
        "zero_init_head": True,
    },
    "mlp": {"optimizer": "adam"},
}


@dataclass(frozen=True)
class PaperSetup:
    """What the paper's code does on one dataset: `steps` updates, evaluated every
    `eval_every`; the settings and dataset parameters of every run, the dataset parameters
    of the group-inference run (e.g. frozen features for XRM, full fine-tuning for MAT), and
    the grid its configurations come from (the 10 of the MAT/XRM code, for tuning and for the
    group-inference run; None where the paper ran one fixed configuration)."""

    steps: int
    eval_every: int
    hparams: Mapping[str, Any] = field(default_factory=dict)
    data: Mapping[str, Any] = field(default_factory=dict)
    inference_data: Mapping[str, Any] = field(default_factory=dict)
    grid: str | None = "paper"


@dataclass(frozen=True)
class Protocol:
    """The defaults a protocol gives one dataset's runs (empty for `default`)."""

    name: str = "default"
    steps: int | None = None
    eval_every: int | None = None
    hparams: Mapping[str, Any] = field(default_factory=dict)
    data: Mapping[str, Any] = field(default_factory=dict)
    inference_data: Mapping[str, Any] = field(default_factory=dict)
    inference_seed: int | None = None
    grid: str | None = None


def get_protocol(name: str, dataset_cls: type) -> Protocol:
    """Protocol `name` on the dataset class `dataset_cls`."""
    if name not in PROTOCOLS:
        raise UserError(f"unknown protocol {name!r}; known: {', '.join(PROTOCOLS)}")
    if name == "default":
        return Protocol()
    setup: PaperSetup | None = getattr(dataset_cls, "paper_setup", None)
    if setup is None:
        raise UserError(
            f"--protocol paper: no paper setup is declared for dataset {dataset_cls.name!r} "
            "(its defaults are its paper's, or it is not in the paper); leave out --protocol"
        )
    return Protocol(
        name="paper",
        steps=setup.steps,
        eval_every=setup.eval_every,
        hparams=dict(setup.hparams),
        data=dict(setup.data),
        inference_data=dict(setup.inference_data),
        inference_seed=0,
        grid=setup.grid,
    )
