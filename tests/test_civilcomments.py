"""CivilComments coarse and fine: conversion from all_data_with_identities.csv, the 16
overlapping WILDS evaluation groups, and a few MiniLM steps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from upstream_fixtures import CIVIL_SPLITS, IDENTITIES, civilcomments_frame, write_civilcomments

from robustbench_mat.datasets.civilcomments import CivilComments, CivilCommentsFine
from robustbench_mat.download import prepare_dataset
from robustbench_mat.errors import UserError
from robustbench_mat.runner import RunSpec, run

TEXT = {"backbone": "minilm", "max_length": 24}


@pytest.fixture
def data(tmp_path: Path) -> Path:
    write_civilcomments(tmp_path / "data" / "civilcomments")
    for cls in (CivilComments, CivilCommentsFine):
        prepare_dataset(cls, tmp_path / "data", show_progress=False)
    return tmp_path / "data"


def _expected():
    frame = civilcomments_frame()
    active = frame[list(IDENTITIES)].to_numpy() >= 0.5
    toxic = frame["toxicity"].to_numpy() >= 0.5
    split = frame["split"].to_numpy()
    return frame, active, toxic, split


def test_coarse_and_fine_sizes_follow_the_derivation(data):
    _, active, toxic, split = _expected()
    coarse, fine = CivilComments(data, **TEXT), CivilCommentsFine(data, **TEXT)
    train = coarse.split("train")
    assert len(train) == CIVIL_SPLITS["train"]  # every train comment
    assert train.a.tolist() == (~active[split == "train"].any(1)).astype(int).tolist()
    assert len(fine.split("train")) == active[split == "train"].sum()  # per (comment, identity)
    for name in ("val", "test"):
        assert len(coarse.split(name)) == active[split == name].sum()
        assert len(fine.split(name)) == active[split == name].sum()
        assert (coarse.split(name).a == 0).all()
    assert train.y.float().mean().item() == pytest.approx(toxic[split == "train"].mean())


def test_sixteen_overlapping_wilds_groups(data):
    _, active, toxic, split = _expected()
    coarse = CivilComments(data, **TEXT)
    train = coarse.split("train")
    groups = train.eval_groups
    assert len(groups.names) == 16
    assert groups.names[0] == "non-toxic/male" and groups.names[-1] == "toxic/white"
    in_train = split == "train"
    for k in range(8):
        assert groups.counts()[k] == (active[in_train, k] & ~toxic[in_train]).sum()
        assert groups.counts()[8 + k] == (active[in_train, k] & toxic[in_train]).sum()
    assert (groups.membership.sum(1) > 1).any()  # a comment can mention two identities
    for name in ("val", "test"):
        assert (coarse.split(name).eval_groups.membership.sum(1) == 1).all()
    fine = CivilCommentsFine(data, **TEXT)
    assert fine.split("val").eval_groups.names == groups.names
    assert fine.n_groups == 16 and coarse.n_groups == 4


def test_text_is_tokenised_to_ids_mask_and_types(data):
    part = CivilComments(data, **TEXT).split("val")
    x = part.fetch(torch.tensor([0, 1]))
    assert x.shape == (2, 24, 3) and x.dtype == torch.int32
    assert (x[:, 0, 0] == 101).all() and (x[:, 0, 1] == 1).all()


def test_every_row_holds_the_tokens_of_its_own_comment_tokenised_alone(data):
    """The cached, batch-tokenised tokens of every row of every split are those of its comment
    tokenised by itself, as each comment was before the cache."""
    from robustbench_mat.backbones import load_tokenizer

    tokenizer = load_tokenizer("minilm")
    for cls in (CivilComments, CivilCommentsFine):
        dataset = cls(data, **TEXT)
        texts = dataset.texts()
        for split in ("train", "val", "test"):
            filenames = dataset.split_frame(split)["filename"]
            for row, filename in zip(dataset.split(split).inputs, filenames, strict=True):
                alone = tokenizer(
                    str(texts.loc[filename]),
                    padding="max_length",
                    truncation=True,
                    max_length=24,
                    return_token_type_ids=True,
                )
                fields = ("input_ids", "attention_mask", "token_type_ids")
                assert row.tolist() == [
                    list(t) for t in zip(*(alone[f] for f in fields), strict=True)
                ]


def test_tokens_are_cached_per_comments_tokenizer_and_length(data, monkeypatch):
    from robustbench_mat import backbones

    first = CivilComments(data, **TEXT)
    tokens = first.split("train").inputs
    files = list((data / "civilcomments" / "tokens").glob("*.safetensors"))
    assert len(files) == 1

    def no_tokenizer(name):
        raise AssertionError("tokenised again")

    with monkeypatch.context() as patch:
        patch.setattr(backbones, "load_tokenizer", no_tokenizer)
        again = CivilComments(data, **TEXT)
        assert torch.equal(again.split("train").inputs, tokens)  # read, not tokenised
        fine = CivilCommentsFine(data, **TEXT)  # its own comments file
        assert fine.token_file() != again.token_file()
    longer = CivilComments(data, backbone="minilm", max_length=30)
    assert longer.token_file() != first.token_file()
    assert longer.split("train").inputs.shape[1] == 30
    before = first.token_file()
    comments = first.prepared_files(data)[1]
    comments.write_text(comments.read_text().replace(" comment", " remark"))
    rewritten = CivilComments(data, **TEXT)
    assert rewritten.token_file() != before
    assert not torch.equal(rewritten.split("train").inputs, tokens)
    assert len(list((data / "civilcomments" / "tokens").glob("*.safetensors"))) == 3


def test_a_damaged_token_cache_is_tokenised_again(data):
    from safetensors.torch import save_file

    first = CivilComments(data, **TEXT)
    tokens = first.split("val").inputs
    path = first.token_file()
    whole = path.read_bytes()
    path.write_bytes(whole[:100])  # a copy cut short
    assert torch.equal(CivilComments(data, **TEXT).split("val").inputs, tokens)
    assert path.read_bytes() == whole
    save_file({"tokens": torch.zeros(3, 24, 3, dtype=torch.int32)}, path)  # too few comments
    assert torch.equal(CivilComments(data, **TEXT).split("val").inputs, tokens)
    assert path.read_bytes() == whole


def test_quotes_and_newlines_survive_conversion(data):
    texts = CivilComments(data, **TEXT).texts()
    assert 'a comment, with "quotes"\nand a newline' in set(texts)


def test_bad_split_value_names_the_line(tmp_path):
    root = tmp_path / "data" / "civilcomments"
    path = write_civilcomments(root)
    text = path.read_text().replace(",train,", ",training,", 1)
    path.write_text(text)
    with pytest.raises(UserError, match=r"all_data_with_identities.csv, line 2: bad split"):
        prepare_dataset(CivilComments, tmp_path / "data", show_progress=False)


def test_missing_identity_column_is_named(tmp_path):
    root = tmp_path / "data" / "civilcomments"
    path = write_civilcomments(root)
    import pandas as pd

    pd.read_csv(path, index_col=0).drop(columns=["muslim"]).to_csv(path)
    with pytest.raises(UserError, match="missing column muslim"):
        prepare_dataset(CivilComments, tmp_path / "data", show_progress=False)


def test_unknown_backbone_fails_at_construction(data):
    with pytest.raises(UserError, match="text backbone 'not-a-model'"):
        CivilComments(data, backbone="not-a-model")


def test_erm_a_few_minilm_steps(data, workdir):
    spec = RunSpec(
        method="erm",
        dataset="civilcomments",
        data_dir=data,
        data_params=TEXT,
        hparams={"batch_size": 8},
        steps=3,
        workdir=workdir,
        show_progress=False,
    )
    result = run(spec)
    assert result.final["step"] == 3
    assert np.isfinite(result.final["train_loss"])
    assert "test_group_acc.toxic-white" in result.final or "test_wga" in result.final


def test_training_batches_are_class_balanced_by_default(data, workdir, monkeypatch):
    from robustbench_mat.method import Method

    seen = []
    original = Method.loss

    def recording_loss(self, batch):
        seen.append(batch.y.clone())
        return original(self, batch)

    monkeypatch.setattr(Method, "loss", recording_loss)
    spec = RunSpec(
        method="erm",
        dataset="civilcomments",
        data_dir=data,
        data_params=TEXT,
        hparams={"batch_size": 16},
        steps=4,
        workdir=workdir,
        show_progress=False,
    )
    run(spec)
    toxic_in_train = CivilComments(data, **TEXT).split("train").y.float().mean().item()
    toxic_in_batches = torch.cat(seen).float().mean().item()
    assert toxic_in_train < 0.2
    assert 0.3 < toxic_in_batches < 0.7  # 64 draws at probability 1/2
