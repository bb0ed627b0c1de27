"""The interpretable synthetic task of the MAT paper's Figure 1."""

from __future__ import annotations

from typing import Any

import torch
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution
from torch import nn

from robustbench_mat.backbones import linear
from robustbench_mat.data import BenchmarkDataset, SplitArrays
from robustbench_mat.errors import UserError
from robustbench_mat.hparams import MAX_SEED, HParam
from robustbench_mat.protocols import PaperSetup
from robustbench_mat.registry import register_dataset

_SPLIT_OFFSET = {"train": 0, "val": 1, "test": 2}


@register_dataset("synthetic")
class Synthetic(BenchmarkDataset):
    """Figure 1 of the MAT paper: a core and a 5x easier spurious feature plus per-example noise.

    Each split draws `n` examples with y ~ Bernoulli(1/2). The core feature is
    x_y = (0.12 * N(0, 1) - 1) * (2y - 1); the spurious feature x_a is drawn the same way and then
    has its sign flipped on the first int((1 - majority) * n) entries of a random permutation
    (90% majority in train, 50% in val and test; int() truncates, so train flips 99 of 1000
    because (1 - 0.9) * 1000 is 99.999... in floating point). The input is
    [x_y, 5 * x_a, noise_std * N(0, I_{dim-2})]: the noise dimensions let a model memorise single
    examples. The attribute a is the class the spurious feature points to, so majority examples
    have a == y (the authors' m = 1[x_y * x_a > 0]).

    With the default parameters every split equals, bit for bit, the authors' `problem_1(seed,
    split, noise_std)` in interpretable_experiment.py (facebookresearch/Pitfalls-of-Memorization)
    on the same torch version: train, val and test are their tr, va and te, seeded with
    seed + {0, 1, 2}, and drawn in their order (y, x_y, x_a, the permutation, then the noise) from
    a generator that reproduces the stream of `torch.manual_seed(seed + offset)`. The global RNG
    is left untouched. Their "test" curves and numbers are the va split, i.e. our val split;
    their te split (our test) is never used by their script. Their labels have a trailing
    dimension of 1 that is squeezed here, as they do before training.

    Their script builds its networks from the global RNG right after drawing va. With
    init=authors a run starts from that state instead of its run seed's (`model_rng_state`), so
    its first network gets their first network's weights: ERM then repeats their runs exactly.
    MAT does not: XRM's assignment and label flips, and MAT's own network, come from that stream
    in another order than in their script. The default, init=run-seed, draws the weights from
    the run seed: with full batches on fixed data, the only thing a run seed varies.
    """

    paper = "Bayat, Pezeshki et al. 2024, The Pitfalls of Memorization (arXiv 2412.07684)"
    n_classes = 2
    n_attributes = 2
    class_names = ("y0", "y1")
    attribute_names = ("a0", "a1")
    default_steps = 1000
    default_eval_every = 10
    paper_setup = PaperSetup(1000, 10, grid=None)  # its defaults are the paper script's
    default_checkpoint_every = 100
    evaluate_train = True
    params = {
        # n >= 1 and dim >= 2 are checked by check_config
        "n": HParam(1000, "examples per split"),
        "dim": HParam(1800, "input dimensions: 2 features plus dim - 2 noise dimensions"),
        "noise_std": HParam(
            0.5, "standard deviation of the example-specific noise dimensions", ge=0
        ),
        "majority": HParam(
            0.9, "fraction of training examples whose spurious feature agrees", ge=0, le=1
        ),
        "eval_majority": HParam(0.5, "the same fraction in val and test", ge=0, le=1),
        "spurious_scale": HParam(5.0, "scale of the spurious feature (the core one has 1)"),
        "seed": HParam(
            1234,
            "seed of the data; split s uses seed + {train: 0, val: 1, test: 2}",
            ge=0,
            le=MAX_SEED,
        ),
        "init": HParam(
            "run-seed",
            "initial weights from the run seed, or (authors) from the random stream the authors' "
            "script builds its networks from: seed + 1 right after drawing the val split",
            choices=("run-seed", "authors"),
        ),
    }

    def check_config(self) -> None:
        c = self.config
        if c["dim"] < 2 or c["n"] < 1:
            raise UserError(f"dataset synthetic needs dim >= 2 and n >= 1, got {c}")
        if not (0.0 <= c["majority"] <= 1.0 and 0.0 <= c["eval_majority"] <= 1.0):
            raise UserError("dataset synthetic: majority and eval_majority must be in [0, 1]")

    def load_split(self, split: str) -> SplitArrays:
        # A fresh CPU generator seeded like `torch.manual_seed` yields the same stream as the
        # global one in the authors' script, without disturbing the caller's global state.
        generator = torch.Generator().manual_seed(self.config["seed"] + _SPLIT_OFFSET[split])
        return self._draw(split, generator)

    def model_rng_state(self) -> torch.Tensor | None:
        """With init=authors, the state of the authors' global RNG when their script builds its
        networks: seeded with seed + 1 and advanced through every draw of the val split (their
        va, drawn last); the noise is drawn even when noise_std is 0, so it does not matter."""
        if self.config["init"] != "authors":
            return None
        generator = torch.Generator().manual_seed(self.config["seed"] + _SPLIT_OFFSET["val"])
        self._draw("val", generator)
        return generator.get_state()

    def _draw(self, split: str, generator: torch.Generator) -> SplitArrays:
        c = self.config
        n = c["n"]
        y = torch.zeros(n, 1).bernoulli_(0.5, generator=generator)
        sign = 2 * y - 1
        core = (torch.randn(n, 1, generator=generator) * 0.12 - 1) * sign
        spurious = (torch.randn(n, 1, generator=generator) * 0.12 - 1) * sign
        majority = c["majority"] if split == "train" else c["eval_majority"]
        flipped = torch.randperm(n, generator=generator)[: int((1 - majority) * n)]
        spurious[flipped] *= -1
        noise = c["noise_std"] * torch.randn(n, c["dim"] - 2, generator=generator)
        x = torch.cat([core, c["spurious_scale"] * spurious, noise], dim=1)
        a = (spurious.squeeze(1) < 0).long()  # class 1 sits near -1, class 0 near +1
        return SplitArrays(x, y.squeeze(1).long(), a)

    def build_model(self) -> nn.Module:
        return linear(self.config["dim"], self.n_classes, bias=False)

    def default_hparams(self) -> dict[str, Any]:
        # The paper's full-batch gradient descent; lr 3e-2 without noise, 1e-2 with it.
        lr = 3e-2 if self.config["noise_std"] == 0 else 1e-2
        return {"lr": lr, "batch_size": 0, "optimizer": "sgd", "momentum": 0.0, "weight_decay": 0.0}

    def search_space(self) -> dict[str, BaseDistribution]:
        return {
            "lr": FloatDistribution(1e-3, 1e-1, log=True),
            "weight_decay": FloatDistribution(1e-6, 1e-2, log=True),
            "batch_size": CategoricalDistribution([0, 100, 250]),
        }
