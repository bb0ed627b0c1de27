"""Waterbirds: conversion from the upstream metadata.csv, loading, bad metadata, and runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from upstream_fixtures import WATERBIRDS_GROUPS, write_waterbirds

from robustbench_mat.datasets.waterbirds import Waterbirds
from robustbench_mat.download import prepare_dataset
from robustbench_mat.errors import UserError
from robustbench_mat.runner import RunSpec, run


@pytest.fixture
def data(tmp_path: Path) -> Path:
    write_waterbirds(tmp_path / "data" / "waterbirds")
    prepare_dataset(Waterbirds, tmp_path / "data", show_progress=False)
    return tmp_path / "data"


def test_conversion_keeps_splits_and_groups(data):
    dataset = Waterbirds(data, weights="none")
    for code, split in enumerate(("train", "val", "test")):
        part = dataset.split(split)
        counts = torch.bincount(part.g, minlength=4).tolist()
        assert counts == list(WATERBIRDS_GROUPS[code])
    header = (data / "waterbirds" / "metadata_waterbirds.csv").read_text().splitlines()[0]
    assert header == "id,filename,split,y,a"


def test_images_use_the_standard_transform(data):
    part = Waterbirds(data, weights="none").split("val")
    x = part.fetch(torch.tensor([0, 1]))
    assert x.shape == (2, 3, 224, 224)
    assert x.dtype == torch.float32
    small = Waterbirds(data, weights="none", image_size=32).split("val").fetch(torch.tensor([0]))
    assert small.shape == (1, 3, 32, 32)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("id,filename,split,y,a", "id,filename,split,y"), "missing column a"),
        (lambda t: t.replace(",0,0,0\n", ",7,0,0\n", 1), r"line \d+: bad split value '7'"),
        (lambda t: t.replace(",0,0,0\n", ",0,0,water\n", 1), r"line \d+: bad a value"),
        (lambda t: t + "999,x.jpg,0,0,0,extra,fields\n", "unreadable row.*line 258"),
    ],
)
def test_bad_metadata_names_file_and_row(data, edit, message):
    path = data / "waterbirds" / "metadata_waterbirds.csv"
    path.write_text(edit(path.read_text()))
    with pytest.raises(UserError, match=message) as caught:
        Waterbirds(data, weights="none").split("train")
    assert str(path) in str(caught.value)


def test_bad_y_value_names_the_line(data):
    path = data / "waterbirds" / "metadata_waterbirds.csv"
    lines = path.read_text().splitlines()
    fields = lines[5].split(",")
    fields[3] = "2"
    lines[5] = ",".join(fields)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"line 6: bad y value"):
        Waterbirds(data, weights="none").split("train")


def test_missing_image_is_named(data):
    dataset = Waterbirds(data, weights="none")
    part = dataset.split("test")
    first = dataset.split_frame("test")["filename"].iloc[0]
    (data / "waterbirds" / "waterbird_complete95_forest2water2" / first).unlink()
    with pytest.raises(UserError, match=f"image .*{first}"):
        part.fetch(torch.tensor([0]))


def test_erm_on_cached_features(data, workdir):
    """The feature-cache path: prepare, then `run --method erm` trains a linear head."""
    spec = RunSpec(
        method="erm",
        dataset="waterbirds",
        data_dir=data,
        data_params={"features": "resnet50", "weights": "none", "image_size": 32},
        steps=5,
        workdir=workdir,
        show_progress=False,
    )
    result = run(spec)
    assert 0.0 <= result.final["test_avg"] <= 1.0
    assert len(list((data / "features" / "waterbirds").glob("*.safetensors"))) == 3


@pytest.mark.slow
def test_erm_one_resnet50_step(data, workdir):
    spec = RunSpec(
        method="erm",
        dataset="waterbirds",
        data_dir=data,
        data_params={"weights": "none"},
        hparams={"batch_size": 32},
        steps=1,
        workdir=workdir,
        show_progress=False,
    )
    assert run(spec).final["step"] == 1
