"""Loader workers: resolved per device, passed by every command, used by every pass that reads
on-disk inputs (training, evaluation, first stages, group inference, feature extraction), and
without effect on the numbers."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
from helpers import registered
from upstream_fixtures import write_celeba, write_waterbirds

from robustbench_mat import loading
from robustbench_mat.data import SplitArrays
from robustbench_mat.datasets.synthetic import Synthetic
from robustbench_mat.datasets.waterbirds import Waterbirds
from robustbench_mat.download import prepare_dataset
from robustbench_mat.errors import UserError
from robustbench_mat.loading import Loading, resolve_loading
from robustbench_mat.registry import DATASETS
from robustbench_mat.runner import RunSpec, run
from robustbench_mat.tuning import TuneSpec


class Rows(torch.utils.data.Dataset):
    """Vectors served one at a time, as image files are: the inputs of an on-disk split."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.x[index]


class DiskSynthetic(Synthetic):
    """The synthetic task read through a loader."""

    name = "disk-synthetic"

    def load_split(self, split: str) -> SplitArrays:
        x, y, a = super().load_split(split)
        return SplitArrays(Rows(x), y, a)


@pytest.fixture
def disk_synthetic():
    with registered(DATASETS, "disk-synthetic", DiskSynthetic) as name:
        yield name


@pytest.fixture
def loaders(monkeypatch) -> list[dict]:
    """Every DataLoader made, with the settings it was asked for; each then reads in this
    process (the settings are recorded, not the processes started)."""
    made: list[dict] = []

    class Recording(torch.utils.data.DataLoader):
        def __init__(self, dataset, **options):
            made.append(
                {
                    "dataset": type(dataset).__name__,
                    "workers": options.get("num_workers", 0),
                    "pin_memory": options.get("pin_memory", False),
                    "persistent": options.get("persistent_workers", False),
                }
            )
            options.update(num_workers=0, persistent_workers=False, prefetch_factor=None)
            super().__init__(dataset, **options)

    monkeypatch.setattr(torch.utils.data, "DataLoader", Recording)
    return made


def test_auto_is_no_worker_on_the_cpu_and_the_cores_per_gpu_on_cuda(monkeypatch):
    assert resolve_loading(None, torch.device("cpu")) == Loading(0, False)
    assert resolve_loading("auto", torch.device("cpu")) == Loading(0, False)
    assert resolve_loading(3, torch.device("cpu")) == Loading(3, False)
    monkeypatch.setattr(loading, "available_cores", lambda: 32)
    for gpus, workers in ((1, 8), (4, 8), (8, 4), (64, 1)):
        monkeypatch.setattr(torch.cuda, "device_count", lambda gpus=gpus: gpus)
        assert resolve_loading(None, torch.device("cuda")) == Loading(workers, True)
    assert resolve_loading(0, torch.device("cuda")) == Loading(0, True)
    for bad in (-1, 1.5, "two", True):
        with pytest.raises(UserError, match="--loader-workers must be auto or an integer"):
            resolve_loading(bad, torch.device("cpu"))


def test_a_loader_without_workers_drops_the_worker_only_options():
    loader = Loading(0).loader(Rows(torch.zeros(4, 2)), batch_size=2, persistent_workers=True)
    assert loader.num_workers == 0 and not loader.persistent_workers
    loader = Loading(2).loader(Rows(torch.zeros(4, 2)), batch_size=2, persistent_workers=True)
    assert loader.num_workers == 2 and loader.persistent_workers
    assert loader.prefetch_factor == loading.PREFETCH_BATCHES


def test_tuning_passes_the_loader_workers_to_every_run():
    spec = TuneSpec(method="erm", dataset="synthetic", num_workers=5)
    assert spec.run_spec({}, seed=0, kind="trial", tags={}).num_workers == 5
    assert (
        TuneSpec(method="erm", dataset="synthetic").run_spec({}, 0, "trial", {}).num_workers is None
    )


# Methods whose passes read the training split outside the main loop: JTT's first model and its
# error set, AFR's and DFR's embeddings, CRT's stage 1, XRM's twins (group inference), uLA's
# proxy; ERM as the plain case.
@pytest.mark.parametrize(
    ("method", "regime"),
    [
        ("erm", None),
        ("jtt", None),
        ("afr", None),
        ("dfr", None),
        ("crt", None),
        ("xrm", "none"),
        ("ula", "none"),
    ],
)
def test_every_pass_reads_with_the_runs_loader_workers(
    method, regime, disk_synthetic, loaders, workdir
):
    spec = RunSpec(
        method=method,
        dataset=disk_synthetic,
        regime=regime,
        data_params={"n": 120, "dim": 12},
        steps=6,
        eval_every=3,
        inference_steps=6 if regime == "none" else None,
        workdir=workdir,
        show_progress=False,
        num_workers=3,
    )
    result = run(spec)
    assert loaders, "the on-disk splits were read without a DataLoader"
    assert {made["workers"] for made in loaders} == {3}, loaders
    # Evaluation loaders are kept, so their workers serve every evaluation: one per split and
    # batch size, not one per evaluation.
    evaluations = [made for made in loaders if made["persistent"]]
    assert evaluations and len(evaluations) <= 3 * 2, evaluations
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    assert mlflow.get_run(result.run_id).data.params["loader_workers"] == "3"


def test_a_run_leaves_no_loader_worker_behind(disk_synthetic, workdir, monkeypatch):
    """Evaluation loaders keep their workers for the run's evaluations, and end them with it,
    even while something still holds the run's dataset."""
    import multiprocessing

    from robustbench_mat import runner

    held = []

    def holding(spec):
        held.append(planned(spec))
        return held[-1]

    planned = runner.plan
    monkeypatch.setattr(runner, "plan", holding)
    spec = RunSpec(
        method="jtt",
        dataset=disk_synthetic,
        data_params={"n": 120, "dim": 12},
        steps=6,
        eval_every=3,
        workdir=workdir,
        show_progress=False,
        num_workers=2,
    )
    run(spec)
    assert held and held[0].dataset.split("val")._eval_loaders == {}
    assert multiprocessing.active_children() == []


def test_feature_extraction_reads_with_the_runs_loader_workers(tmp_path: Path, loaders, workdir):
    write_waterbirds(tmp_path / "data" / "waterbirds")
    prepare_dataset(Waterbirds, tmp_path / "data", show_progress=False)
    spec = RunSpec(
        method="erm",
        dataset="waterbirds",
        data_dir=tmp_path / "data",
        data_params={"features": "resnet50", "weights": "none", "image_size": 32},
        steps=2,
        workdir=workdir,
        show_progress=False,
        num_workers=2,
    )
    run(spec)
    extractions = [made for made in loaders if made["dataset"] == "ImageFiles"]
    assert len(extractions) == 3  # train, val, test
    assert {made["workers"] for made in extractions} == {2}


def test_worker_processes_change_no_number(tmp_path: Path, workdir):
    """ERM on Waterbirds' images (decoded by the loader): 2 real worker processes give the
    numbers of 0, bit for bit."""
    write_waterbirds(tmp_path / "data" / "waterbirds")
    prepare_dataset(Waterbirds, tmp_path / "data", show_progress=False)
    finals = []
    for workers in (0, 2):
        spec = RunSpec(
            method="erm",
            dataset="waterbirds",
            data_dir=tmp_path / "data",
            data_params={"weights": "none", "image_size": 16},
            hparams={"batch_size": 16},
            steps=3,
            eval_every=3,
            workdir=workdir / str(workers),
            show_progress=False,
            num_workers=workers,
        )
        finals.append(run(spec).final)
    assert finals[0] == finals[1]


@pytest.mark.parametrize("kind", ["waterbirds", "celeba"])
def test_images_travel_as_bytes_and_are_normalised_as_torchvision_does(tmp_path: Path, kind):
    """A loader sends uint8 images; normalised where they arrive, they are bit for bit
    torchvision's ToTensor and Normalize of the same images."""
    from PIL import Image
    from torchvision import transforms

    from robustbench_mat.backbones import IMAGENET_MEAN, IMAGENET_STD
    from robustbench_mat.datasets.celeba import CelebA

    cls = Waterbirds if kind == "waterbirds" else CelebA
    if kind == "waterbirds":
        write_waterbirds(tmp_path / "data" / "waterbirds")
    else:
        write_celeba(tmp_path / "data" / "celeba")
    prepare_dataset(cls, tmp_path / "data", show_progress=False, verify=False)
    split = cls(tmp_path / "data", weights="none", image_size=64).split("val")
    images = split.inputs
    assert images[0].dtype == torch.uint8 and images[0].shape == (3, 64, 64)
    reference = transforms.Compose(
        [
            *images.transform.transforms[:-1],  # the geometric steps
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    expected = []
    for index in range(len(images)):
        with Image.open(images.image_path(index)) as image:
            expected.append(reference(image.convert("RGB")))
    expected = torch.stack(expected)
    assert torch.equal(split.fetch(torch.arange(len(split))), expected)
    batches = list(split.eval_loader(5))  # bytes, normalised where they arrive
    assert batches[0].dtype == torch.uint8
    assert torch.equal(torch.cat([loading.finish_batch(images, x) for x in batches]), expected)
