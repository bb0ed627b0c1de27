"""Batched training: K runs trained as one stack equal the same runs trained one at a time."""

from __future__ import annotations

import math

import mlflow
import pytest
import torch
from torch.fx.experimental import proxy_tensor

from robustbench_mat.errors import RunFailed, RunPruned
from robustbench_mat.method import Method
from robustbench_mat.registry import DATASETS, METHODS, register_method
from robustbench_mat.runner import RunSpec, run, run_many
from robustbench_mat.stacking import (
    MAX_RECORDED_STEPS,
    ModelStack,
    StackedOptimizer,
    replayable,
    why_not_stackable,
)

TOLERANCE = 1e-5
# Or a few float32 steps of the value: a diverging run's loss of 267 is held to 3e-5 in float32.
RELATIVE = 1e-6
METHOD_SETTINGS = {  # a setting of the method's own that differs between the stacked models
    "erm": None,
    "groupdro": ("eta", [0.01, 0.05, 0.1]),
    "mat": ("temperature", [0.001, 0.01, 0.1]),
    "jtt": ("upsample", [5, 20, 50]),
    "rwg": None,
    "subg": None,
    "suby": None,
    "rwy": None,
    "crt": None,  # holds its model under two attributes (`head` is `model`)
}


def _specs(workdir, method: str, **loop) -> list[RunSpec]:
    """Three runs differing in lr, weight decay, momentum, seed and the method's own setting."""
    specs = []
    for k in range(3):
        hparams = {
            "lr": [3e-3, 1e-2, 3e-2][k],
            "weight_decay": [0.0, 1e-4, 1e-3][k],
            "momentum": [0.0, 0.5, 0.9][k],
            "batch_size": 32,
            **loop,
        }
        if METHOD_SETTINGS.get(method):
            name, values = METHOD_SETTINGS[method]
            hparams[name] = values[k]
        specs.append(
            RunSpec(
                method=method,
                dataset="synthetic",
                seed=[0, 1, 0][k],
                steps=40,
                eval_every=10,
                checkpoint_every=20,
                data_params={"n": 200, "dim": 20},
                hparams=hparams,
                workdir=workdir,
                show_progress=False,
                device="cpu",
            )
        )
    return specs


def _assert_same(alone, stacked) -> None:
    for one, other in zip(alone, stacked, strict=True):
        assert not isinstance(other, BaseException), other
        assert one.selected_step == other.selected_step
        for record, twin in zip(one.history(), other.history(), strict=True):
            assert record.keys() == twin.keys()
            for key, value in record.items():
                assert math.isclose(value, twin[key], rel_tol=RELATIVE, abs_tol=TOLERANCE), (
                    key,
                    value,
                    twin[key],
                )


class _Result:
    """A run's result with its history (the run's `history.csv`)."""

    def __init__(self, result, workdir) -> None:
        import pandas as pd

        self.selected_step = result.selected_step
        [path] = (workdir / "runs").glob(f"*-{result.run_key}/history.csv")
        self._history = pd.read_csv(path).to_dict("records")

    def history(self) -> list[dict]:
        return self._history


def _train_both(tmp_path, method: str, **loop):
    alone_dir, stacked_dir = tmp_path / "alone", tmp_path / "stacked"
    alone = [_Result(run(spec), alone_dir) for spec in _specs(alone_dir, method, **loop)]
    outcomes = run_many(_specs(stacked_dir, method, **loop))
    stacked = [o if isinstance(o, BaseException) else _Result(o, stacked_dir) for o in outcomes]
    return alone, stacked


@pytest.mark.parametrize("method", sorted(METHOD_SETTINGS))
def test_stacked_runs_equal_runs_trained_alone(tmp_path, method):
    alone, stacked = _train_both(tmp_path, method)
    _assert_same(alone, stacked)


def test_a_parameter_shared_by_two_modules_is_not_stacked():
    """Weight tying across modules: the stack would set the parameter in one of them only."""
    dataset = DATASETS.get("synthetic")(n=20, dim=4)
    method = METHODS.get("erm")(dataset, _defaults("erm", dataset))
    assert why_not_stackable(method) is None
    method.twin = torch.nn.Linear(4, 2, bias=False)
    method.twin.weight = method.model.weight
    assert why_not_stackable(method) == "two of its modules share a parameter"


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_stacked_adam_and_schedules_equal_runs_trained_alone(tmp_path, optimizer):
    loop = {"optimizer": optimizer, "lr_schedule": "xrm-bert", "no_decay_groups": True}
    alone, stacked = _train_both(tmp_path, "erm", **loop)
    _assert_same(alone, stacked)


def test_full_batch_and_linear_schedule_stack(tmp_path):
    alone, stacked = _train_both(tmp_path, "groupdro", batch_size=0, lr_schedule="linear")
    _assert_same(alone, stacked)


def test_stacked_groupdro_weights_move_to_the_worst_group():
    """The defining computation, vectorised: with equal losses but one group worse, every
    model's weights move towards that group, by its own eta."""
    dataset = DATASETS.get("synthetic")(n=40, dim=6)
    methods = []
    for eta in (0.1, 1.0):
        hp = {**_defaults("groupdro", dataset), "eta": eta}
        methods.append(METHODS.get("groupdro")(dataset, hp))
    stack = ModelStack(methods)
    x = torch.zeros(4, 6)
    y = torch.tensor([0, 0, 1, 1])
    a = torch.tensor([0, 1, 0, 1])
    stack.params["model.weight"].data[:, :, :] = 0.0
    stack.params["model.weight"].data[:, 1, 0] = 1.0  # class 1 favoured... on x = 0, no effect
    x[:, 0] = torch.tensor([0.0, 0.0, 0.0, 5.0])  # group 3 (y=1, a=1) is fitted, the others not
    stack.losses_and_gradients(torch.arange(4), x, y, a, dataset.n_attributes, per_member=False)
    weights = stack.buffers["group_weights"]
    ce_half, ce_fit = math.log(2), math.log(1 + math.exp(-5))
    for row, eta in zip(weights, (0.1, 1.0), strict=True):
        raw = torch.tensor([math.exp(eta * ce_half)] * 3 + [math.exp(eta * ce_fit)])
        assert torch.allclose(row, raw / raw.sum(), atol=1e-6)
    assert weights[1, 0] > weights[0, 0] > 0.25 > weights[0, 3] > weights[1, 3]


def _defaults(method: str, dataset) -> dict:
    from robustbench_mat.hparams import resolve

    specs = METHODS.get(method).hparam_specs(dataset)
    return resolve(specs, {}, method)


def _members(method: str, dataset, lrs=(0.1, 0.3, 1.0)) -> list[Method]:
    torch.manual_seed(0)
    return [METHODS.get(method)(dataset, {**_defaults(method, dataset), "lr": lr}) for lr in lrs]


@pytest.fixture
def recordings(monkeypatch):
    """The steps recorded for replay (one entry per call of `make_fx`)."""
    calls = []
    real = proxy_tensor.make_fx
    monkeypatch.setattr(proxy_tensor, "make_fx", lambda f: calls.append(f) or real(f))
    return calls


def _steps_alike(replayed, direct, dataset, batch_shapes, per_member=False) -> None:
    """SGD steps of the two stacks on the same random batches: the same losses, gradients and
    weights at every step, bit for bit."""
    optimizers = StackedOptimizer(replayed), StackedOptimizer(direct)
    train = dataset.split("train")
    generator = torch.Generator().manual_seed(0)
    initial = direct.params["model.weight"].detach().clone()
    for shape in batch_shapes:
        idx = torch.randint(0, len(train.y), shape, generator=generator)
        batch = (idx, train.inputs[idx], train.y[idx], train.a[idx], dataset.n_attributes)
        (losses, gradients), (twin_losses, twin_gradients) = (
            stack.losses_and_gradients(*batch, per_member) for stack in (replayed, direct)
        )
        assert torch.equal(losses, twin_losses)
        assert gradients.keys() == twin_gradients.keys() == set(direct.trained)
        assert all(torch.equal(gradients[k], twin_gradients[k]) for k in gradients)
        optimizers[0].step(gradients)
        optimizers[1].step(twin_gradients)
        assert all(torch.equal(replayed.params[k], direct.params[k]) for k in direct.params)
    assert not torch.equal(initial, direct.params["model.weight"])  # they did train


@pytest.mark.parametrize("per_member", [False, True])
def test_a_replayed_step_gives_the_numbers_of_the_step_it_recorded(recordings, per_member):
    dataset = DATASETS.get("synthetic")(n=60, dim=8)
    replayed, direct = ModelStack(_members("erm", dataset)), ModelStack(_members("erm", dataset))
    direct.replay = False
    assert replayed.replay
    shape = (3, 16) if per_member else (16,)
    _steps_alike(replayed, direct, dataset, [shape] * 5, per_member)
    assert len(recordings) == 1  # recorded at the first step, replayed at the four others


def test_only_a_step_with_the_base_loss_or_a_pure_one_is_replayed():
    """A method's own loss, or a dataset's, may hold Python state that a recording would
    freeze: such steps run through `vmap` every time, unless the class that defines the loss
    declares it `pure_loss`."""
    synthetic = DATASETS.get("synthetic")(n=40, dim=6)
    for method in ("erm", "jtt", "rwg", "suby", "groupdro", "mat", "xrm"):
        assert replayable(METHODS.get(method)(synthetic, _defaults(method, synthetic))), method
    for method in ("focal", "ldam", "cvardro", "reweight"):
        assert not replayable(METHODS.get(method)(synthetic, _defaults(method, synthetic))), method

    class Counting(METHODS.get("groupdro")):  # inherits pure_loss, but not the loss it was for
        def loss(self, batch):
            return super().loss(batch) * 2

    assert not replayable(Counting(synthetic, _defaults("groupdro", synthetic)))

    class OwnLoss(type(synthetic)):
        def loss(self, outputs, y):
            return super().loss(outputs, y) * 2

    own = OwnLoss(n=40, dim=6)
    assert not replayable(METHODS.get("erm")(own, _defaults("erm", own)))


def test_a_replayed_groupdro_step_updates_its_weights_once_per_step(recordings):
    """Recording runs the step on copies: the weights move once per step, as through vmap."""
    dataset = DATASETS.get("synthetic")(n=60, dim=8)
    replayed = ModelStack(_members("groupdro", dataset))
    direct = ModelStack(_members("groupdro", dataset))
    direct.replay = False
    before = direct.buffers["group_weights"].clone()
    _steps_alike(replayed, direct, dataset, [(16,)] * 4)
    assert len(recordings) == 1
    assert torch.equal(replayed.buffers["group_weights"], direct.buffers["group_weights"])
    assert not torch.equal(before, direct.buffers["group_weights"])


def test_a_step_that_cannot_be_recorded_runs_through_vmap(monkeypatch):
    dataset = DATASETS.get("synthetic")(n=60, dim=8)
    attempts = []

    def refuse(function):
        attempts.append(function)
        raise RuntimeError("an operation the recording cannot follow")

    monkeypatch.setattr(proxy_tensor, "make_fx", refuse)
    replayed, direct = ModelStack(_members("erm", dataset)), ModelStack(_members("erm", dataset))
    direct.replay = False
    _steps_alike(replayed, direct, dataset, [(16,)] * 3)
    assert len(attempts) == 1 and list(replayed._recorded.values()) == [None]


def test_a_stack_records_a_few_batch_layouts_at_most(recordings):
    dataset = DATASETS.get("synthetic")(n=60, dim=8)
    replayed, direct = ModelStack(_members("erm", dataset)), ModelStack(_members("erm", dataset))
    direct.replay = False
    sizes = [(n,) for n in range(4, 4 + MAX_RECORDED_STEPS + 2)]
    _steps_alike(replayed, direct, dataset, sizes + sizes)
    assert len(recordings) == MAX_RECORDED_STEPS  # then every new layout runs through vmap


@pytest.mark.parametrize("method", ["erm", "mat"])
def test_stacked_runs_are_replayed_and_equal_runs_trained_alone(tmp_path, recordings, method):
    alone, stacked = _train_both(tmp_path, method)
    _assert_same(alone, stacked)
    assert recordings  # the stack of the three runs was replayed


def test_stacked_sgd_matches_torch_by_hand():
    """One update by hand: p <- p - lr * (m * buf + g + wd * p), per model."""
    dataset = DATASETS.get("synthetic")(n=20, dim=4)
    methods = []
    for lr, wd, momentum in ((0.1, 0.0, 0.0), (0.5, 0.1, 0.9)):
        hp = {**_defaults("erm", dataset), "lr": lr, "weight_decay": wd, "momentum": momentum}
        methods.append(METHODS.get("erm")(dataset, hp))
    stack = ModelStack(methods)
    optimizer = StackedOptimizer(stack)
    weight = stack.params["model.weight"]
    weight.data.fill_(1.0)
    optimizer.step({"model.weight": torch.full_like(weight, 2.0)})
    assert torch.allclose(weight[0], torch.full_like(weight[0], 1.0 - 0.1 * 2.0))
    assert torch.allclose(weight[1], torch.full_like(weight[1], 1.0 - 0.5 * (2.0 + 0.1)))
    before = weight[1].detach().clone()
    optimizer.step({"model.weight": torch.full_like(weight, 2.0)})
    buffer = 0.9 * 2.1 + (2.0 + 0.1 * before)
    assert torch.allclose(weight[1], before - 0.5 * buffer)


def test_a_pruned_model_stops_alone(tmp_path):
    specs = _specs(tmp_path, "erm")

    def prune(record):
        if record["step"] >= 20:
            raise RunPruned("pruned at step 20")

    specs[1].on_evaluation = prune
    outcomes = run_many(specs)
    assert isinstance(outcomes[1], RunPruned)
    alone = [run(spec) for spec in _specs(tmp_path / "alone", "erm")]
    for k in (0, 2):
        assert outcomes[k].final == pytest.approx(alone[k].final, abs=TOLERANCE)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("synthetic").experiment_id
    states = {
        r.data.tags["robustbench.state"]: r.info.status for r in client.search_runs([experiment])
    }
    assert states == {"finished": "FINISHED", "pruned": "KILLED"}
    pruned = [r for r in client.search_runs([experiment]) if r.info.status == "KILLED"]
    assert len(pruned) == 1


def test_a_diverging_model_fails_alone(tmp_path):
    specs = _specs(tmp_path, "erm")
    specs[2].hparams["lr"] = 1e30
    outcomes = run_many(specs)
    assert isinstance(outcomes[2], RunFailed)
    assert "loss became" in str(outcomes[2])
    assert not isinstance(outcomes[0], BaseException)
    assert not isinstance(outcomes[1], BaseException)


def test_an_interrupted_stack_resumes_to_the_same_results(tmp_path):
    """Killed mid-stack (after the step-20 checkpoints), the same runs resume from their own
    checkpoints, stacked or alone, and end as if never interrupted."""
    specs = _specs(tmp_path, "groupdro")

    def interrupt(record):
        if record["step"] == 30:
            raise KeyboardInterrupt

    specs[0].on_evaluation = interrupt
    with pytest.raises(KeyboardInterrupt):
        run_many(specs)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("synthetic").experiment_id
    assert [r.info.status for r in client.search_runs([experiment])] == ["KILLED"] * 3
    checkpoints = list((tmp_path / "runs").glob("*/checkpoint.pt"))
    assert len(checkpoints) == 3
    assert {torch.load(p, weights_only=True)["step"] for p in checkpoints} == {20}
    resumed = run_many(_specs(tmp_path, "groupdro")[:2]) + [run(_specs(tmp_path, "groupdro")[2])]
    uninterrupted = [run(spec) for spec in _specs(tmp_path / "clean", "groupdro")]
    for one, other in zip(resumed, uninterrupted, strict=True):
        assert one.final == pytest.approx(other.final, abs=TOLERANCE)
        assert one.selected_step == other.selected_step


def test_a_method_that_cannot_be_stacked_trains_alone_saying_so(tmp_path, capsys):
    specs = [
        RunSpec(
            method="lff",
            dataset="synthetic",
            seed=seed,
            steps=10,
            eval_every=5,
            data_params={"n": 100, "dim": 10},
            workdir=tmp_path,
            show_progress=False,
            device="cpu",
        )
        for seed in (0, 1)
    ]
    outcomes = run_many(specs)
    assert all(not isinstance(o, BaseException) for o in outcomes)
    err = capsys.readouterr().err
    assert err.count("lff models train one at a time here") == 1
    alone = run(
        RunSpec(**{**specs[1].__dict__, "workdir": tmp_path / "alone", "on_evaluation": None})
    )
    assert outcomes[1].final == pytest.approx(alone.final, abs=TOLERANCE)


def test_why_not_stackable_names_the_reason():
    dataset = DATASETS.get("synthetic")(n=20, dim=4)
    xrm = METHODS.get("xrm-infer")(dataset, _defaults("xrm-infer", dataset))
    assert "after_step" in why_not_stackable(xrm)
    erm = METHODS.get("erm")(dataset, _defaults("erm", dataset))
    assert why_not_stackable(erm) is None
    erm.model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    assert "BatchNorm1d" in why_not_stackable(erm)


@register_method("test-item-in-loss")
class ItemInLoss(Method):
    """ERM whose loss reads a value with `.item()`, which vmap cannot run."""

    def loss(self, batch):
        loss = self.dataset.loss(self.model(batch.x), batch.y)
        return loss * (2.0 if loss.item() > 100 else 1.0)


@register_method("test-item-in-pure-loss")
class ItemInPureLoss(Method):
    """The same loss, wrongly declared pure: its step can be neither recorded nor vectorised."""

    pure_loss = True

    def loss(self, batch):
        return ItemInLoss.loss(self, batch)


@pytest.mark.parametrize("method", ["test-item-in-loss", "test-item-in-pure-loss"])
def test_hooks_that_cannot_be_vectorised_fall_back_to_one_at_a_time(tmp_path, capsys, method):
    """Its models train alone, with one line saying so, and end as they would have alone."""
    outcomes = run_many(_specs(tmp_path, method))
    assert all(not isinstance(o, BaseException) for o in outcomes), outcomes
    assert capsys.readouterr().err.count("cannot be vectorised") == 1
    alone = run(_specs(tmp_path / "alone", method)[2])
    assert outcomes[2].final == pytest.approx(alone.final, abs=TOLERANCE)


@pytest.mark.parametrize("shared", [True, False], ids=["shared-inputs", "per-model-inputs"])
@pytest.mark.parametrize("bias", [True, False])
def test_stacked_linear_equals_each_models_own_layer(shared, bias):
    """The stacked rule's logits and gradients are each model's own `F.linear` and autograd,
    for inputs shared by the models or their own, with leading dimensions beyond the batch."""
    from torch.func import vmap

    from robustbench_mat.stacking import stacked_ops

    generator = torch.Generator().manual_seed(0)
    k, inputs, outputs = 3, 5, 4
    weight = torch.randn(k, outputs, inputs, generator=generator, requires_grad=True)
    offset = torch.randn(k, outputs, generator=generator, requires_grad=True) if bias else None
    x = torch.randn(*(() if shared else (k,)), 2, 6, inputs, generator=generator)

    def loss(w, b, x):  # the bias by keyword, as some layers pass it
        return torch.nn.functional.linear(x, w, bias=b).square().sum()

    in_dims = (0, 0 if bias else None, None if shared else 0)
    first_bias = None if offset is None else offset[0]
    first_x = (x if shared else x[0]).clone().requires_grad_()
    with stacked_ops():
        losses = vmap(loss, in_dims=in_dims)(weight, offset, x)
        one_model = loss(weight[0], first_bias, first_x)  # outside vmap: the rule's own backward
        if not shared:  # stacked inputs, one weight: torch's rule
            per_input = vmap(loss, in_dims=(None, None, 0))(weight[0], first_bias, x)
    trained = [weight] + ([offset] if bias else [])
    plain = loss(weight[0], first_bias, first_x)
    torch.testing.assert_close(one_model, plain)
    mine = torch.autograd.grad(one_model, [*trained, first_x])
    for ours, torch_s in zip(mine, torch.autograd.grad(plain, [*trained, first_x]), strict=True):
        torch.testing.assert_close(ours, torch_s)
    if not shared:
        each = [loss(weight[0], first_bias, xj) for xj in x]
        torch.testing.assert_close(per_input, torch.stack(each))
    gradients = torch.autograd.grad(losses.sum(), trained)
    for j in range(k):
        own = [weight[j].detach().requires_grad_()]
        if bias:
            own.append(offset[j].detach().requires_grad_())
        value = loss(own[0], own[1] if bias else None, x if shared else x[j])
        torch.testing.assert_close(losses[j], value)
        for stacked, alone in zip(gradients, torch.autograd.grad(value, own), strict=True):
            torch.testing.assert_close(stacked[j], alone)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared-targets", "per-model-targets"])
def test_stacked_cross_entropy_equals_each_models_own(reduction, shared):
    """The stacked rule's losses and gradients are each model's own `F.cross_entropy` and
    autograd, ignored targets (-100) included; outside vmap its own backward is torch's."""
    from torch.func import vmap

    from robustbench_mat.stacking import stacked_ops

    cross_entropy = torch.nn.functional.cross_entropy
    generator = torch.Generator().manual_seed(0)
    k, n, classes = 3, 7, 4
    logits = torch.randn(k, n, classes, generator=generator, requires_grad=True)
    target = torch.randint(classes, (*(() if shared else (k,)), n), generator=generator)
    target[..., 2] = -100

    def loss(z, t):
        return cross_entropy(z, t, reduction=reduction)

    with stacked_ops():
        stacked = vmap(loss, in_dims=(0, None if shared else 0))(logits, target)
        first = logits[0].detach().requires_grad_()
        own_rule = loss(first, target if shared else target[0])
    weights = torch.randn(stacked.shape, generator=generator)  # distinct per value
    (gradient,) = torch.autograd.grad((stacked * weights).sum(), logits)
    for j in range(k):
        z = logits[j].detach().requires_grad_()
        value = loss(z, target if shared else target[j])
        torch.testing.assert_close(stacked[j], value)
        (alone,) = torch.autograd.grad((value * weights[j]).sum(), z)
        torch.testing.assert_close(gradient[j], alone)
    plain = first.detach().requires_grad_()
    expected = loss(plain, target if shared else target[0])
    torch.testing.assert_close(own_rule, expected)
    outer = torch.randn(expected.shape, generator=generator)
    (mine,) = torch.autograd.grad((own_rule * outer).sum(), first)
    (torch_s,) = torch.autograd.grad((expected * outer).sum(), plain)
    torch.testing.assert_close(mine, torch_s)


@pytest.mark.parametrize(
    "options",
    [{"label_smoothing": 0.1}, {"weight": torch.tensor([1.0, 2.0, 0.5])}, {"ignore_index": 1}],
    ids=["label-smoothing", "class-weights", "other-ignored-index"],
)
def test_other_cross_entropies_keep_torchs_rule(options, monkeypatch):
    from torch.func import vmap

    from robustbench_mat import stacking

    monkeypatch.setattr(stacking._CrossEntropy, "apply", lambda *a: pytest.fail("taken"))
    logits = torch.randn(2, 5, 3)
    target = torch.tensor([0, 1, 2, 1, 0])
    soft = torch.softmax(torch.randn(5, 3), 1)

    def loss(z, t):
        return torch.nn.functional.cross_entropy(z, t, **options)

    with stacking.stacked_ops():
        stacked = vmap(loss, in_dims=(0, None))(logits, target)
        probabilities = vmap(torch.nn.functional.cross_entropy, in_dims=(0, None))(logits, soft)
    torch.testing.assert_close(stacked, torch.stack([loss(z, target) for z in logits]))
    each = [torch.nn.functional.cross_entropy(z, soft) for z in logits]
    torch.testing.assert_close(probabilities, torch.stack(each))


@pytest.fixture
def two_threads():
    """Two intra-op threads for the test, the previous count restored after it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def test_small_linear_steps_run_on_one_thread_and_others_on_all(tmp_path, monkeypatch, two_threads):
    """A linear head's step (alone or stacked) runs on one thread, a convolutional network's on
    torch's count; the count is restored for evaluation and after the run."""
    from helpers import run_tiny

    import robustbench_mat

    monkeypatch.setattr(robustbench_mat, "SLEEPING_THREADS", True)
    threads_seen: list[int] = []
    loss = Method.loss

    def recording(self, batch):
        threads_seen.append(torch.get_num_threads())
        return loss(self, batch)

    monkeypatch.setattr(Method, "loss", recording)
    run_tiny(tmp_path / "alone", "erm", device="cpu")
    assert set(threads_seen) == {1}
    threads_seen.clear()
    outcomes = run_many(_specs(tmp_path / "stacked", "erm"))
    assert not any(isinstance(o, BaseException) for o in outcomes)
    assert set(threads_seen) == {1}
    assert torch.get_num_threads() == 2
    threads_seen.clear()
    run_tiny(tmp_path / "cnn", "erm", dataset="colored-digits", data_params={}, steps=2)
    assert set(threads_seen) == {2}


def test_step_threads_follow_the_size_of_the_step(monkeypatch, two_threads):
    import robustbench_mat
    from robustbench_mat.hardware import SMALL_STEP, intra_op_threads, step_threads

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(robustbench_mat, "SLEEPING_THREADS", False)  # spinning: no rule
    assert step_threads(cpu, 10) == 2
    monkeypatch.setattr(robustbench_mat, "SLEEPING_THREADS", True)
    assert step_threads(cpu, SMALL_STEP) == 1
    assert step_threads(cpu, SMALL_STEP + 1) == 2
    assert step_threads(cpu, None) == 2  # not estimated: torch's count
    assert step_threads(cuda, 10) == 2
    with intra_op_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
