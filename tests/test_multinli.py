"""MultiNLI: the pickled InputFeatures read with a restricted unpickler, stored as tensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from upstream_fixtures import MULTINLI_GROUPS, write_multinli

from robustbench_mat.datasets.multinli import MultiNLI
from robustbench_mat.download import prepare_dataset
from robustbench_mat.errors import UserError
from robustbench_mat.runner import RunSpec, run

TEXT = {"backbone": "minilm", "max_length": 32}


class Payload:
    """An object whose unpickling would run code."""

    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > pwned.txt",))


@pytest.fixture
def data(tmp_path: Path) -> Path:
    write_multinli(tmp_path / "data" / "multinli", tmp_path)
    prepare_dataset(MultiNLI, tmp_path / "data", show_progress=False)
    return tmp_path / "data"


def test_splits_groups_and_tokens(data):
    dataset = MultiNLI(data, **TEXT)
    for code, split in enumerate(("train", "val", "test")):
        part = dataset.split(split)
        assert torch.bincount(part.g, minlength=6).tolist() == list(MULTINLI_GROUPS[code])
        assert part.inputs.shape == (len(part), 32, 3)
    assert (data / "multinli" / "multinli_tokens.safetensors").is_file()


def test_row_k_of_the_tokens_matches_row_k_of_the_metadata(data):
    dataset = MultiNLI(data, backbone="minilm")
    train = dataset.split("train")
    # the fixture writes token 2000 + y at position 1 and "no" (2053) at 3 when negated
    assert torch.equal(train.inputs[:, 1, 0].long() - 2000, train.y)
    assert torch.equal((train.inputs[:, 3, 0] == 2053).long(), train.a)
    assert (train.inputs[:, 0, 1] == 1).all()


def test_the_unpickler_refuses_other_objects(tmp_path):
    write_multinli(tmp_path / "data" / "multinli", tmp_path, extra=Payload())
    with pytest.raises(UserError, match="refused or unreadable"):
        prepare_dataset(MultiNLI, tmp_path / "data", show_progress=False)
    assert not Path("pwned.txt").exists()


def test_row_count_mismatch_is_reported(tmp_path):
    root = write_multinli(tmp_path / "data" / "multinli", tmp_path)
    path = root / "metadata_random.csv"
    path.write_text("\n".join(path.read_text().splitlines()[:-3]) + "\n")
    with pytest.raises(UserError, match="rows but the cached features hold"):
        prepare_dataset(MultiNLI, tmp_path / "data", show_progress=False)


def test_erm_a_few_minilm_steps(data, workdir):
    spec = RunSpec(
        method="erm",
        dataset="multinli",
        data_dir=data,
        data_params=TEXT,
        hparams={"batch_size": 8},
        steps=3,
        workdir=workdir,
        show_progress=False,
    )
    assert run(spec).final["step"] == 3
