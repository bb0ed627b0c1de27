"""Colored digits: an offline image benchmark with a real spurious correlation."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution
from torch import nn

from robustbench_mat.backbones import small_cnn
from robustbench_mat.data import BenchmarkDataset, SplitArrays
from robustbench_mat.errors import UserError
from robustbench_mat.hparams import MAX_SEED, HParam
from robustbench_mat.protocols import XRM_CODE_OPTIMIZERS, PaperSetup
from robustbench_mat.registry import register_dataset

SPLIT_SIZES = {"train": 1000, "val": 397, "test": 400}  # the 1,797 digits of load_digits()


@register_dataset("colored-digits")
class ColoredDigits(BenchmarkDataset):
    """Colored digits: y = digit >= 5, a = the colour the digit is drawn in (red or green).

    Built from scikit-learn's bundled handwritten digits (`load_digits()`: 1,797 real 8x8 images,
    no download), in the spirit of Colored MNIST. The digits are shuffled once (`seed`) and cut
    into train/val/test of 1000/397/400. Each image becomes a 3x8x8 tensor whose ink (0..16
    scaled to 0..1) is drawn in the red channel (a = 0) or the green one (a = 1). The colour
    agrees with the label (red for 0-4, green for 5-9) on a `majority` fraction of each split's
    examples, drawn exactly: 95% in train, 50% in val and test. With the defaults and seed 0 the
    groups (small/red, small/green, large/red, large/green) hold 469/24/26/481 training
    examples, 91/102/96/108 in val and 103/112/88/97 in test: the two minority groups are 5% of
    the training set, so ERM leans on the colour and its worst-group accuracy falls well below
    its average. The network is a two-layer CNN (`small_cnn`); a run takes seconds on a CPU.
    """

    paper = "Arjovsky et al. 2019 (Colored MNIST), on scikit-learn's digits"
    n_classes = 2
    n_attributes = 2
    class_names = ("digit0-4", "digit5-9")
    attribute_names = ("red", "green")
    default_steps = 500
    default_eval_every = 50
    # The budget and optimiser of the MAT/XRM code's coloured-MNIST datasets.
    paper_setup = PaperSetup(1001, 50, XRM_CODE_OPTIMIZERS["mlp"])
    evaluate_train = True
    params = {
        "majority": HParam(
            0.95, "fraction of training examples whose colour agrees with y", ge=0, le=1
        ),
        "eval_majority": HParam(0.5, "the same fraction in val and test", ge=0, le=1),
        "seed": HParam(0, "seed of the split and of the colouring", ge=0, le=MAX_SEED),
    }

    def check_config(self) -> None:
        c = self.config
        if not (0.0 <= c["majority"] <= 1.0 and 0.0 <= c["eval_majority"] <= 1.0):
            raise UserError("dataset colored-digits: majority and eval_majority must be in [0, 1]")

    def _digits(self) -> tuple[np.ndarray, np.ndarray]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        order = np.random.default_rng(self.config["seed"]).permutation(len(digits.target))
        return digits.images[order].astype(np.float32) / 16.0, digits.target[order]

    def load_split(self, split: str) -> SplitArrays:
        images, digits = self._digits()
        names = list(SPLIT_SIZES)
        start = sum(SPLIT_SIZES[s] for s in names[: names.index(split)])
        images = torch.from_numpy(images[start : start + SPLIT_SIZES[split]])
        y = torch.from_numpy(digits[start : start + SPLIT_SIZES[split]] >= 5).long()
        majority = self.config["majority" if split == "train" else "eval_majority"]
        generator = torch.Generator().manual_seed(self.config["seed"] * 3 + names.index(split))
        n = len(y)
        disagree = torch.zeros(n, dtype=torch.long)
        disagree[torch.randperm(n, generator=generator)[: round((1.0 - majority) * n)]] = 1
        a = y ^ disagree
        x = torch.zeros(n, 3, 8, 8)
        x[torch.arange(n), a] = images
        return SplitArrays(x, y, a)

    def build_model(self) -> nn.Module:
        return small_cnn(3, self.n_classes, size=8)

    def default_hparams(self) -> dict[str, Any]:
        return {"optimizer": "adam", "lr": 1e-3, "batch_size": 64, "weight_decay": 0.0}

    def search_space(self) -> dict[str, BaseDistribution]:
        return {
            "lr": FloatDistribution(1e-4, 1e-2, log=True),
            "weight_decay": FloatDistribution(1e-6, 1e-3, log=True),
            "batch_size": CategoricalDistribution([32, 64, 128]),
        }
