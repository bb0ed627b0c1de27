"""The shared part of the on-disk image benchmarks (Waterbirds, CelebA): JPEGs read lazily
through the standard transform, a ResNet-50, or a linear/MLP head on cached frozen features."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

import torch
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution
from torch import nn

from robustbench_mat import backbones
from robustbench_mat.data import SplitArrays
from robustbench_mat.errors import UserError
from robustbench_mat.features import cached_features, feature_file
from robustbench_mat.hparams import HParam
from robustbench_mat.metadata import FileDataset, file_fingerprint, resolve_data_dir

FEATURE_DIM = {"resnet50": 2048}


class ImageFiles(torch.utils.data.Dataset):
    """Images `root/filename`, each returned as one transformed uint8 tensor; `batch_transform`
    normalises a batch of them where the run computes (`loading.finish_batch`)."""

    def __init__(self, root: Path, filenames: list[str], transform: Any) -> None:
        self.root, self.filenames, self.transform = root, filenames, transform
        self._inside_root = os.path.join(os.path.abspath(root), "")

    def __len__(self) -> int:
        return len(self.filenames)

    def image_path(self, index: int) -> Path:
        """`root/filename` of image `index`; `UserError` if the filename leads outside `root`.

        The check is on the path's text (absolute, `..`), not on symbolic links: a user may
        link image folders in from elsewhere, while archives are extracted without links."""
        path = self.root / self.filenames[index]
        if not os.path.abspath(path).startswith(self._inside_root):
            raise UserError(
                f"image {self.filenames[index]!r} (row {index} of the metadata) is outside "
                f"{self.root}; prepare the dataset again from its published files"
            )
        return path

    @staticmethod
    def batch_transform(x: torch.Tensor) -> torch.Tensor:
        return backbones.normalize_images(x)

    def __getitem__(self, index: int) -> torch.Tensor:
        from PIL import Image, UnidentifiedImageError

        path = self.image_path(index)
        try:
            with Image.open(path) as image:
                return self.transform(image.convert("RGB"))
        except FileNotFoundError:
            raise UserError(
                f"image {path} (row {index} of the metadata) is missing; prepare the dataset "
                f"again or download it anew"
            ) from None
        except (UnidentifiedImageError, OSError) as error:
            raise UserError(f"image {path} is unreadable ({error}); download it anew") from None


def image_params(transform: str) -> dict[str, HParam]:
    return {
        "backbone": HParam("resnet50", "image network", choices=("resnet50",)),
        "weights": HParam(
            "imagenet", "initial backbone weights (none: random)", choices=backbones.IMAGE_WEIGHTS
        ),
        "features": HParam(
            "",
            "'' trains the whole network on images; resnet50 trains a head on frozen ResNet-50 "
            "features cached under <data_dir>/features",
            choices=("", "resnet50"),
        ),
        "head": HParam("linear", "head on cached features", choices=("linear", "mlp")),
        "image_size": HParam(224, f"side of the network's input ({transform} transform)"),
    }


class ImageBenchmark(FileDataset):
    """An on-disk image benchmark: a subclass sets `transform_kind` and `image_folder`."""

    transform_kind: ClassVar[str] = ""
    image_folder: ClassVar[str] = ""
    default_steps = 5000
    default_eval_every = 500
    eval_batch_size = 128
    hparam_family = "image"

    def check_config(self) -> None:
        if self.config["image_size"] < 16:
            raise UserError(f"dataset {self.name}: image_size must be at least 16")

    def image_root(self) -> Path:
        return self.root / self.image_folder

    def images(self, split: str) -> ImageFiles:
        frame = self.split_frame(split)
        return ImageFiles(
            self.image_root(),
            frame["filename"].tolist(),
            backbones.image_transform(self.transform_kind, self.config["image_size"]),
        )

    def feature_path(self, split: str) -> Path:
        c = self.config
        return feature_file(
            resolve_data_dir(self.data_dir),
            self.name,
            split,
            c["features"],
            c["weights"],
            {
                "metadata": file_fingerprint(self.metadata_file(self.data_dir)),
                "transform": self.transform_kind,
                "image_size": c["image_size"],
            },
        )

    def load_split(self, split: str) -> SplitArrays:
        frame = self.split_frame(split)
        y = torch.as_tensor(frame["y"].to_numpy(copy=True), dtype=torch.long)
        a = torch.as_tensor(frame["a"].to_numpy(copy=True), dtype=torch.long)
        if self.config["features"]:
            features = cached_features(
                self.feature_path(split),
                lambda: backbones.resnet50(None, self.config["weights"]),
                lambda: self.images(split),
                device=self.device,
                loading=self.loading,
            )
            return SplitArrays(features, y, a)
        return SplitArrays(self.images(split), y, a)

    def build_model(self) -> nn.Module:
        c = self.config
        if c["features"]:
            dim = FEATURE_DIM[c["features"]]
            if c["head"] == "mlp":
                return backbones.mlp(dim, self.n_classes, hidden=(512,))
            return backbones.linear(dim, self.n_classes)
        return backbones.resnet50(self.n_classes, c["weights"])

    def default_hparams(self) -> dict[str, Any]:
        # The image defaults of SubpopBench's registry: SGD, lr 1e-3, momentum 0.9, wd 1e-4;
        # batch 32 fits a ResNet-50 on one GPU; heads on cached features take larger batches.
        batch = 128 if self.config["features"] else 32
        return {
            "optimizer": "sgd",
            "lr": 1e-3,
            "momentum": 0.9,
            "weight_decay": 1e-4,
            "batch_size": batch,
        }

    def search_space(self) -> dict[str, BaseDistribution]:
        # XRM/MAT image ranges: lr 10^U(-5,-3), wd 10^U(-6,-3), batch 2^U(5,7).
        return {
            "lr": FloatDistribution(1e-5, 1e-3, log=True),
            "weight_decay": FloatDistribution(1e-6, 1e-3, log=True),
            "batch_size": CategoricalDistribution([32, 64, 128]),
        }
