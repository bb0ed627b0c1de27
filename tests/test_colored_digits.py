"""colored-digits: construction, group sizes, and ERM's spurious reliance."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import run_tiny

from robustbench_mat.datasets.colored_digits import ColoredDigits
from robustbench_mat.runner import RunSpec, run


def test_construction_and_group_sizes():
    dataset = ColoredDigits()
    expected = {
        "train": [469, 24, 26, 481],
        "val": [91, 102, 96, 108],
        "test": [103, 112, 88, 97],
    }
    for split, counts in expected.items():
        part = dataset.split(split)
        assert part.inputs.shape == (sum(counts), 3, 8, 8)
        assert torch.bincount(part.g, minlength=4).tolist() == counts
        # the ink is in the channel of the colour, and only there
        ink = part.inputs.sum((2, 3))
        assert torch.equal(ink.argmax(1), part.a)
        assert (ink[:, 2] == 0).all()
    train = dataset.split("train")
    assert int((train.y == train.a).sum()) == 950


def test_erm_leans_on_the_colour(workdir):
    spec = RunSpec(
        method="erm", dataset="colored-digits", workdir=workdir, show_progress=False, steps=300
    )
    result = run(spec)
    test = result.selected
    assert test["test_avg"] > 0.7
    assert test["test_wga"] < test["test_avg"] - 0.1


@pytest.mark.parametrize("method", ["groupdro", "jtt", "dfr", "subg", "suby", "rwg", "rwy"])
def test_method_runs_20_steps_on_the_cnn(workdir, method) -> None:
    """The methods whose own tests use `synthetic`'s linear model also train the CNN."""
    result = run_tiny(workdir, method, dataset="colored-digits", data_params={})
    assert math.isfinite(result.final["test_avg"]) and 0 <= result.final["test_wga"] <= 1
