"""DFR: Deep Feature Reweighting."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from robustbench_mat.backbones import check_head_split, split_head
from robustbench_mat.data import BenchmarkDataset
from robustbench_mat.errors import UserError
from robustbench_mat.evaluation import predict
from robustbench_mat.hparams import HParam
from robustbench_mat.method import Method
from robustbench_mat.methods.balancing import balanced_subset
from robustbench_mat.methods.jtt import ERMStage, stage_steps
from robustbench_mat.registry import register_method

if TYPE_CHECKING:
    from robustbench_mat.runner import RunContext

C_GRID = (1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01)  # the authors' grid of inverse ℓ1 strengths
TOL = 1e-8  # liblinear's stopping tolerance: tight enough to solve each problem to convergence
MAX_ITER = 10_000


def _l1_penalty() -> dict[str, Any]:
    """The ℓ1 penalty argument: scikit-learn 1.8 deprecated `penalty` for `l1_ratio`; older
    versions ignore `l1_ratio` here."""
    import sklearn

    new = tuple(int(part) for part in sklearn.__version__.split(".")[:2]) >= (1, 8)
    return {"l1_ratio": 1.0} if new else {"penalty": "l1"}


def l1_logistic(
    x: np.ndarray, y: np.ndarray, c: float, seed: int, n_classes: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """(coef, intercept) of ℓ1-penalised logistic regression fitted by liblinear, which minimises
    |w|_1 + |b| + C Σ_i log(1 + exp(-y_i (w·x_i + b))). Binary: one row, the score of class 1;
    more classes: one-vs-rest, one row per class (liblinear's own multiclass scheme, which
    scikit-learn >= 1.8 no longer runs itself)."""
    # scikit-learn (with SciPy and pandas) is imported here, not when `list` imports the plugin
    from sklearn.linear_model import LogisticRegression

    if n_classes == 2:
        targets = [y]
    else:
        targets = [(y == k).astype(np.int64) for k in range(n_classes)]
    coefs, intercepts = [], []
    for target in targets:
        if len(np.unique(target)) < 2:
            raise UserError("dfr needs every class in each balanced validation subsample")
        fitted = LogisticRegression(
            C=c, solver="liblinear", tol=TOL, max_iter=MAX_ITER, random_state=seed, **_l1_penalty()
        ).fit(x, target)
        coefs.append(fitted.coef_)
        intercepts.append(fitted.intercept_)
    return np.concatenate(coefs), np.concatenate(intercepts)


def linear_predict(coef: np.ndarray, intercept: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The class that (coef, intercept) from `l1_logistic` predicts for each row of `x`."""
    scores = x @ coef.T + intercept
    return (scores[:, 0] > 0).astype(np.int64) if coef.shape[0] == 1 else scores.argmax(1)


def l1_logistic_objective(
    coef: np.ndarray, intercept: np.ndarray, x: np.ndarray, y: np.ndarray, c: float
) -> float:
    """liblinear's objective of a binary fit (`coef` of shape (1, d)), intercept penalised."""
    margins = np.where(y == 1, 1.0, -1.0) * (x @ coef[0] + intercept[0])
    return float(np.abs(coef).sum() + np.abs(intercept).sum() + c * np.logaddexp(0, -margins).sum())


def worst_group_accuracy(predicted: np.ndarray, y: np.ndarray, g: np.ndarray) -> float:
    """The lowest accuracy over the groups present in `g`."""
    return min(float((predicted[g == k] == y[g == k]).mean()) for k in np.unique(g))


class Standardizer:
    """Per-feature mean and standard deviation (scikit-learn's StandardScaler: population
    deviation, and 1 for a constant feature)."""

    def __init__(self, x: np.ndarray) -> None:
        self.mean = x.mean(0)
        std = x.std(0)
        self.std = np.where(std == 0, 1.0, std)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) / self.std


@register_method("dfr")
class DFR(Method):
    """DFR^Tr_Val (Kirichenko et al. 2023): the authors' ℓ1 logistic last layer on balanced val.

    Stage 1 trains ERM on the whole training split for `first_stage_frac` x (the run's steps)
    steps. The last layer of the stage-1 network (its last nn.Linear, `split_head`) is then
    replaced, as in the authors' `dfr_evaluate_spurious.py`, by ℓ1-penalised logistic regression
    on the frozen features, solved by scikit-learn's liblinear:

    - C is selected from the authors' grid {1, .7, .3, .1, .07, .03, .01} (unless `C` is set):
      the validation split is cut at random in two halves; each C is fitted on the first half,
      subsampled so that every group has as many examples as its smallest group, with features
      standardised by that subsample's mean and deviation; the C with the highest worst-group
      accuracy on the other half wins (the first of the grid on a tie).
    - With that C, `num_retrains` (20) fits on as many random group-balanced subsamples of the
      whole validation split, with features standardised by the training split's embeddings'
      mean and deviation, are averaged (coefficients and intercepts).

    The average is written into the network's last layer, folded back to unstandardised
    features (weights w/σ, bias b - Σ w μ/σ), so the network predicts as usual. Binary tasks
    get logits (0, w·x + b); with more classes liblinear fits one-vs-rest and the logits are
    the per-class scores, whose argmax is the authors' prediction (their softmax is not
    liblinear's normalised one-vs-rest probability). A bias-free last layer (synthetic's) is
    replaced by one with a bias. Needs validation group labels; training group labels are not
    used. All randomness (halves, subsamples, liblinear's) comes from a seed drawn from the
    run-seeded global RNG, so a resumed or repeated run fits the same layer.

    The shared loop trains nothing after the fit (`main_steps` is 0): the fitted network is
    evaluated once, at step 0, and the run's steps only set stage 1's length. Validation
    metrics are on the whole validation split, which the layer was fitted on.

    Differences from the authors' code: liblinear runs at tolerance 1e-8 and up to 10,000
    iterations (theirs: the defaults 1e-4 and 100, which stop ~0.07 above the optimum of the
    objective on synthetic), so each fit is solved to convergence; subsampling balances the
    groups present (an empty group would leave theirs nothing to fit); worst-group accuracy is
    over the groups present in the held-out half; more than two classes are fitted one-vs-rest
    class by class (what liblinear did inside scikit-learn < 1.8, which their code relied on;
    newer versions refuse); randomness comes from the run seed (theirs: numpy's global state).
    As theirs (DFR^Tr_Val defaults): one random split selects C, class weights stay 1, the
    intercept is penalised like a weight (liblinear), no training examples are added.
    """

    paper = (
        "Kirichenko et al. 2023, Last Layer Re-Training is Sufficient for Robustness to "
        "Spurious Correlations (ICLR)"
    )
    needs_val_groups = True
    hparams = {
        "C": HParam(
            0.0,
            "liblinear's inverse ℓ1 strength; 0 selects it from the authors' grid "
            "(1, .7, .3, .1, .07, .03, .01) on held-out worst-group accuracy",
            ge=0,
        ),
        "num_retrains": HParam(
            20, "group-balanced validation subsamples whose fits are averaged", ge=1
        ),
        "first_stage_frac": HParam(
            1.0, "stage-1 ERM length as a fraction of the run's steps", gt=0
        ),
        "standardize": HParam(
            True, "standardise the features (selection: fitting subsample; refit: training split)"
        ),
    }

    def __init__(self, dataset: BenchmarkDataset, hparams: dict[str, Any]) -> None:
        super().__init__(dataset, hparams)
        self.stage1_hp = hparams
        self.hp = {**hparams, "batch_size": 0, "class_balanced": False}
        val = self.dataset.split("val")
        if len(val) < 2:
            raise UserError("dfr needs at least two validation examples (fit and select halves)")
        # Drawn with the global RNG, which the runner seeds: the same fit on resume.
        self.register_buffer("seed", torch.randint(0, 2**31 - 1, ()))
        self.features, head = split_head(self.model)
        check_head_split(self.model, self.features, head, val.probe_inputs())
        self.head_name = next(n for n, m in self.model.named_modules() if m is head)
        self.selected_c: float | None = None
        self.selection_scores: dict[float, float] = {}
        self.subsamples: list[torch.Tensor] = []

    # --- the fit -------------------------------------------------------------------------------
    def prepare(self, context: RunContext) -> None:
        stage1 = ERMStage(self.dataset, self.stage1_hp, self.model)
        context.train_stage(
            "stage1", stage1, stage_steps(self.hp["first_stage_frac"], context.plan.steps)
        )
        self.model.requires_grad_(False)
        self.eval()
        device, batch_size = context.plan.device, self.dataset.eval_batch_size
        val = self.dataset.split("val")
        x_val = predict(self.features, val, device, batch_size).double().numpy()
        y_val, g_val = val.y.numpy(), val.g.numpy()
        n_classes = self.dataset.n_classes
        generator = torch.Generator().manual_seed(int(self.seed))

        def draw_seed() -> int:
            return int(torch.randint(0, 2**31 - 1, (), generator=generator))

        def balanced(indices: np.ndarray) -> np.ndarray:
            chosen = balanced_subset(
                torch.from_numpy(g_val[indices]), self.dataset.n_groups, generator
            )
            return indices[chosen.numpy()]

        c = float(self.hp["C"])
        if c == 0:
            order = torch.randperm(len(val), generator=generator).numpy()
            held_out, fit_half = order[: len(val) // 2], balanced(order[len(val) // 2 :])
            scale = self._standardizer(x_val[fit_half])
            for option in C_GRID:
                coef, intercept = l1_logistic(
                    scale(x_val[fit_half]), y_val[fit_half], option, draw_seed(), n_classes
                )
                predicted = linear_predict(coef, intercept, scale(x_val[held_out]))
                score = worst_group_accuracy(predicted, y_val[held_out], g_val[held_out])
                self.selection_scores[option] = score
            c = max(C_GRID, key=lambda option: self.selection_scores[option])  # first on ties
        self.selected_c = c

        train = self.dataset.split("train")
        scale = self._standardizer(
            predict(self.features, train, device, batch_size).double().numpy()
        )
        coefs, intercepts = [], []
        for _ in range(int(self.hp["num_retrains"])):
            subsample = balanced(np.arange(len(val)))
            self.subsamples.append(torch.from_numpy(subsample))
            coef, intercept = l1_logistic(
                scale(x_val[subsample]), y_val[subsample], c, draw_seed(), n_classes
            )
            coefs.append(coef)
            intercepts.append(intercept)
        self._write_head(np.mean(coefs, axis=0), np.mean(intercepts, axis=0), scale)

    def _standardizer(self, x: np.ndarray) -> Standardizer:
        if self.hp["standardize"]:
            return Standardizer(x)
        identity = Standardizer(x[:1])
        identity.mean, identity.std = np.zeros(x.shape[1]), np.ones(x.shape[1])
        return identity

    def _write_head(self, coef: np.ndarray, intercept: np.ndarray, scale: Standardizer) -> None:
        """Put liblinear's (standardised-feature) coefficients into the network's last layer."""
        if coef.shape[0] == 1:  # binary: liblinear's one score is the logit of class 1
            coef = np.concatenate([np.zeros_like(coef), coef])
            intercept = np.concatenate([np.zeros_like(intercept), intercept])
        weight = coef / scale.std
        bias = intercept - weight @ scale.mean
        head = self.head
        if head.bias is None:
            head = self._replace_head(head)
        with torch.no_grad():
            head.weight.copy_(torch.from_numpy(weight))
            head.bias.copy_(torch.from_numpy(bias))

    def _replace_head(self, head: nn.Linear) -> nn.Linear:
        """Swap a bias-free last layer for one with a bias (the intercept needs one)."""
        biased = nn.Linear(head.in_features, head.out_features, device=head.weight.device)
        biased.requires_grad_(False)
        if not self.head_name:  # the network is a single linear layer
            self.model = biased
        else:
            parent, _, child = self.head_name.rpartition(".")
            setattr(self.model.get_submodule(parent), child, biased)
        return biased

    @property
    def head(self) -> nn.Linear:
        """The network's last linear layer (`split_head`'s head)."""
        return self.model.get_submodule(self.head_name)

    # --- the main loop -------------------------------------------------------------------------
    def train(self, mode: bool = True) -> DFR:
        super().train(mode)
        self.model.eval()  # frozen: batch-norm statistics stay those of stage 1
        self.features.eval()  # its own copies of the modules on the way to the stage-1 head
        return self

    @classmethod
    def main_steps(cls, hparams: dict[str, Any], run_steps: int) -> int:
        return 0  # `prepare` fits the last layer

    def configure_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.head.parameters(), lr=0.0)  # the loop takes no step
