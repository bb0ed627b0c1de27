"""CelebA: conversion of list_eval_partition.txt and list_attr_celeba.txt, and a ResNet step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from upstream_fixtures import CELEBA_GROUPS, write_celeba

from robustbench_mat.datasets.celeba import CelebA
from robustbench_mat.download import prepare_dataset
from robustbench_mat.errors import UserError
from robustbench_mat.runner import RunSpec, run


@pytest.fixture
def data(tmp_path: Path) -> Path:
    write_celeba(tmp_path / "data" / "celeba")
    prepare_dataset(CelebA, tmp_path / "data", show_progress=False, verify=False)
    return tmp_path / "data"


def test_blond_hair_and_male_groups_per_split(data):
    dataset = CelebA(data, weights="none")
    for code, split in enumerate(("train", "val", "test")):
        part = dataset.split(split)
        assert torch.bincount(part.g, minlength=4).tolist() == list(CELEBA_GROUPS[code])
    frame = dataset.metadata()
    assert frame["id"].iloc[0] == 1 and frame["filename"].iloc[0] == "000001.jpg"


def test_transform_crops_the_face_and_resizes(data):
    x = CelebA(data, weights="none", image_size=64).split("val").fetch(torch.tensor([0]))
    assert x.shape == (1, 3, 64, 64)


def test_text_files_are_checked_against_the_published_md5(tmp_path):
    write_celeba(tmp_path / "data" / "celeba")  # fixtures: not the published files
    with pytest.raises(UserError, match="checksum mismatch for list_eval_partition.txt.*md5"):
        prepare_dataset(CelebA, tmp_path / "data", show_progress=False)


def test_mismatched_files_are_reported(tmp_path):
    root = write_celeba(tmp_path / "data" / "celeba")
    partition = root / "list_eval_partition.txt"
    partition.write_text("\n".join(partition.read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(UserError, match="image rows but"):
        prepare_dataset(CelebA, tmp_path / "data", show_progress=False, verify=False)


def test_bad_partition_line_is_named(tmp_path):
    root = write_celeba(tmp_path / "data" / "celeba")
    partition = root / "list_eval_partition.txt"
    partition.write_text(partition.read_text().replace(" 0\n", " 5\n", 1))
    with pytest.raises(UserError, match=r"list_eval_partition.txt, line \d+"):
        prepare_dataset(CelebA, tmp_path / "data", show_progress=False, verify=False)


@pytest.mark.slow
def test_erm_one_resnet50_step(data, workdir):
    spec = RunSpec(
        method="erm",
        dataset="celeba",
        data_dir=data,
        data_params={"weights": "none"},
        hparams={"batch_size": 32},
        steps=1,
        workdir=workdir,
        show_progress=False,
    )
    assert run(spec).final["step"] == 1
