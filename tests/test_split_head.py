"""`split_head` cuts the last nn.Linear off ResNet-50 and Hugging Face classifiers for AFR and
DFR; the features share the model's parameters, and `check_head_split` refuses bad splits."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from helpers import StageContext, only_run_dir
from torch import nn
from upstream_fixtures import write_waterbirds

from robustbench_mat.backbones import check_head_split, resnet50, split_head, text_classifier
from robustbench_mat.datasets.waterbirds import Waterbirds
from robustbench_mat.download import prepare_dataset
from robustbench_mat.errors import UserError
from robustbench_mat.methods.afr import AFR
from robustbench_mat.methods.dfr import DFR
from robustbench_mat.registry import DATASETS
from robustbench_mat.runner import RunSpec, run
from robustbench_mat.training import CheckpointStore


def _ids(model: nn.Module) -> set[int]:
    return {id(p) for p in model.parameters()}


def _assert_shares_all_but_the_head(model: nn.Module, features: nn.Module, head: nn.Linear):
    assert _ids(features) == _ids(model) - _ids(head) and _ids(head) <= _ids(model)
    shared = dict(model.named_parameters())
    for name, parameter in features.named_parameters():
        assert parameter is shared[name] and parameter.data_ptr() == shared[name].data_ptr()
    buffers = dict(model.named_buffers())
    assert all(b is buffers[name] for name, b in features.named_buffers())


def _assert_split_matches(model: nn.Module, features: nn.Module, head: nn.Linear, x):
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(head(features(x)), model(x))
    check_head_split(model, features, head, x)


def test_resnet50_splits_at_fc_and_the_features_are_the_rest_of_the_model() -> None:
    torch.manual_seed(0)
    model = resnet50(n_outputs=2, weights="none")
    features, head = split_head(model)
    assert head is model.fc and isinstance(features.fc, nn.Identity)
    assert isinstance(model.fc, nn.Linear)  # the model keeps its head
    assert features.layer4 is model.layer4 and features.conv1 is model.conv1
    _assert_shares_all_but_the_head(model, features, head)
    x = torch.randn(2, 3, 64, 64)
    _assert_split_matches(model, features, head, x)
    assert features(x).shape == (2, 2048)

    model.train()
    features.requires_grad_(False)
    assert not model.conv1.weight.requires_grad and not model.layer4[0].bn1.weight.requires_grad
    assert all(p.requires_grad for p in model.fc.parameters())
    features.eval()
    assert not any(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    # Moving the features moves the model's parameters and buffers (the same tensors).
    features.to(torch.float64)
    assert model.conv1.weight.dtype == torch.float64
    assert model.bn1.running_mean.dtype == torch.float64 and model.fc.weight.dtype == torch.float32


def _saved(state) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def test_split_resnet50_state_dict_is_saved_once_and_reloads() -> None:
    """AFR and DFR register the features as a submodule: its keys alias the model's tensors, so
    a checkpoint (torch.save) stores them once, and a fresh split loads it back."""

    class Holder(nn.Module):  # the layout of AFR: model, features and head
        def __init__(self) -> None:
            super().__init__()
            self.model = resnet50(n_outputs=2, weights="none")
            self.features, self.head = split_head(self.model)

    torch.manual_seed(0)
    saved = Holder()
    state = saved.state_dict()
    assert "features.conv1.weight" in state and "head.weight" in state
    assert len(_saved(state)) < 1.01 * len(_saved(saved.model.state_dict()))
    torch.manual_seed(1)
    fresh = Holder()
    fresh.load_state_dict(torch.load(io.BytesIO(_saved(state)), weights_only=True))
    torch.testing.assert_close(fresh.model.conv1.weight, saved.model.conv1.weight)
    torch.testing.assert_close(fresh.head.weight, saved.model.fc.weight)
    _assert_shares_all_but_the_head(fresh.model, fresh.features, fresh.head)


@pytest.fixture(scope="module")
def minilm() -> nn.Module:
    torch.manual_seed(0)
    return text_classifier("minilm", 2)


def test_hugging_face_classifier_splits_at_its_classifier(minilm) -> None:
    model = minilm
    features, head = split_head(model)
    assert head is model.model.classifier
    assert features.model is not model.model and features.model.bert is model.model.bert
    assert isinstance(features.model.classifier, nn.Identity)
    assert model.model.classifier is head  # the model keeps its head
    _assert_shares_all_but_the_head(model, features, head)
    ids = torch.randint(1000, 2000, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    x = torch.stack([ids, mask, torch.zeros_like(ids)], dim=-1)  # [batch, length, 3]
    _assert_split_matches(model, features, head, x)
    assert features(x).shape == (2, head.in_features)

    model.train()
    features.requires_grad_(False)
    try:
        assert not model.model.bert.embeddings.word_embeddings.weight.requires_grad
        assert all(p.requires_grad for p in head.parameters())
        features.eval()
        dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
        assert dropouts and not any(m.training for m in dropouts)
    finally:
        model.requires_grad_(True)


class _AfterLast(nn.Module):
    """A head registered first but applied last: the last nn.Linear is `proj`, applied first."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 2)
        self.proj = nn.Linear(4, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.proj(x)))


def test_a_model_with_something_after_its_last_linear_is_refused() -> None:
    torch.manual_seed(0)
    squashed = nn.Sequential(nn.Linear(4, 3), nn.Tanh())
    squashed.train()
    features, head = split_head(squashed)
    assert head is squashed[0]
    with pytest.raises(UserError, match="last layer of a Sequential.*not its output layer"):
        check_head_split(squashed, features, head, 3 * torch.randn(5, 4))
    assert squashed.training and squashed[1].training  # modes restored
    model = _AfterLast()
    features, head = split_head(model)
    assert head is model.proj
    with pytest.raises(UserError, match="last layer of a _AfterLast.*the split model fails"):
        check_head_split(model, features, head, torch.randn(5, 4))
    with pytest.raises(UserError, match="cannot find the last layer of a Conv1d"):
        split_head(nn.Conv1d(1, 1, 1))


@pytest.mark.parametrize("method", [AFR, DFR], ids=["afr", "dfr"])
def test_afr_and_dfr_refuse_a_model_that_transforms_its_last_linear_layer(method, tmp_path):
    dataset = DATASETS.get("synthetic")(n=100, dim=6)
    dataset.build_model = lambda: nn.Sequential(nn.Linear(6, 2), nn.Tanh())
    hparams = {k: spec.default for k, spec in method.hparam_specs(dataset).items()}
    torch.manual_seed(0)
    with pytest.raises(UserError, match="last layer of a Sequential"):
        method(dataset, hparams).prepare(StageContext(tmp_path, steps=2))


@pytest.fixture
def waterbirds(tmp_path: Path) -> Path:
    write_waterbirds(tmp_path / "data" / "waterbirds")
    prepare_dataset(Waterbirds, tmp_path / "data", show_progress=False)
    return tmp_path / "data"


def test_afr_retrains_the_fc_layer_of_resnet50(waterbirds, workdir) -> None:
    spec = RunSpec(
        method="afr",
        dataset="waterbirds",
        data_dir=waterbirds,
        data_params={"weights": "none", "image_size": 32},
        hparams={"batch_size": 8, "stage2_steps": 2},
        steps=2,
        workdir=workdir,
        show_progress=False,
    )
    assert run(spec).final["step"] == 2


@pytest.mark.slow
def test_resnet50_last_layer_retraining_resumes_from_its_checkpoint(
    waterbirds, make_workdir, monkeypatch
) -> None:
    """Interrupted in AFR's stage 2 after its step-2 checkpoint (which holds the features'
    keys), the resumed run loads it and ends where an uninterrupted one does. (DFR's fit has no
    main-loop steps; its stage-1 resume is tested in test_dfr.py.)"""
    method = AFR

    def spec(workdir: Path) -> RunSpec:
        return RunSpec(
            method=method.__name__.lower(),
            dataset="waterbirds",
            data_dir=waterbirds,
            data_params={"weights": "none", "image_size": 32},
            hparams={"batch_size": 8, "stage2_steps": 4},
            steps=4,
            eval_every=2,
            checkpoint_every=2,
            workdir=workdir,
            show_progress=False,
        )

    reference = run(spec(make_workdir("reference")))

    def interrupted(self, batch, step):
        if step == 3:
            raise KeyboardInterrupt

    workdir = make_workdir("resumed")
    with monkeypatch.context() as patch:
        patch.setattr(method, "after_step", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run(spec(workdir))
    checkpoint = CheckpointStore(only_run_dir(workdir) / "checkpoint.pt").load()
    assert checkpoint["step"] == 2 and "features.conv1.weight" in checkpoint["method"]
    resumed = run(spec(workdir))
    assert resumed.final == reference.final and resumed.selected == reference.selected
