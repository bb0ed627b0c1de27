"""The frozen-feature cache: extracted once per (dataset, split, backbone, weights, transform),
reused afterwards; and the backbones' offline behaviour."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from upstream_fixtures import write_waterbirds

from robustbench_mat import backbones, features
from robustbench_mat.datasets.waterbirds import Waterbirds
from robustbench_mat.download import prepare_dataset
from robustbench_mat.errors import UserError


@pytest.fixture
def data(tmp_path: Path) -> Path:
    write_waterbirds(tmp_path / "data" / "waterbirds")
    prepare_dataset(Waterbirds, tmp_path / "data", show_progress=False)
    return tmp_path / "data"


def test_second_load_reuses_the_cache_and_is_faster(data, monkeypatch):
    params = {"features": "resnet50", "weights": "none", "image_size": 32}
    start = time.perf_counter()
    first = Waterbirds(data, **params).split("train").inputs
    cold = time.perf_counter() - start
    assert first.shape == (172, 2048)

    def no_extraction(*args, **kwargs):
        raise AssertionError("features were extracted again")

    monkeypatch.setattr(features, "extract_features", no_extraction)
    start = time.perf_counter()
    second = Waterbirds(data, **params).split("train").inputs
    warm = time.perf_counter() - start
    assert torch.equal(first, second)
    assert warm < cold


def test_the_key_separates_weights_transform_and_split(data):
    base = Waterbirds(data, features="resnet50", weights="none", image_size=32)
    paths = {
        base.feature_path("train"),
        base.feature_path("val"),
        Waterbirds(data, features="resnet50", weights="none", image_size=48).feature_path("train"),
        Waterbirds(data, features="resnet50", weights="imagenet", image_size=32).feature_path(
            "train"
        ),
    }
    assert len(paths) == 4
    assert all(p.parent == data / "features" / "waterbirds" for p in paths)


def test_features_build_a_linear_head(data):
    dataset = Waterbirds(data, features="resnet50", weights="none")
    assert isinstance(dataset.build_model(), torch.nn.Linear)
    mlp = Waterbirds(data, features="resnet50", weights="none", head="mlp").build_model()
    assert mlp(torch.zeros(2, 2048)).shape == (2, 2)


def test_imagenet_weights_offline_fail_fast_with_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(UserError, match="ResNet-50 ImageNet weights.*weights=none"):
        backbones.resnet50(2, "imagenet")


def test_unknown_text_model_fails_fast_naming_it():
    start = time.perf_counter()
    with pytest.raises(UserError, match="'no-such/model'.*HF_HOME.*local folder"):
        backbones.check_text_backbone("no-such/model")
    assert time.perf_counter() - start < 10


def test_minilm_is_an_offline_text_backbone():
    model = backbones.text_classifier("minilm", 3)
    x = torch.zeros(2, 16, 3, dtype=torch.long)
    x[:, :4, 0] = torch.tensor([101, 2023, 2003, 102])
    x[:, :4, 1] = 1
    assert model(x).shape == (2, 3)
    tokens = backbones.load_tokenizer("minilm")("a test")["input_ids"]
    assert tokens[0] == 101


def test_small_cnn_shapes():
    assert backbones.small_cnn(3, 2, size=8)(torch.zeros(4, 3, 8, 8)).shape == (4, 2)
