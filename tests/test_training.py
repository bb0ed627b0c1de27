"""The shared training loop through `runner.run`: determinism, divergence, interruption, resume."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import only_run_dir, stored_result
from mlflow import MlflowClient
from torch import nn

from robustbench_mat.errors import RunFailed, UserError
from robustbench_mat.method import Method
from robustbench_mat.methods.erm import ERM
from robustbench_mat.registry import register_method
from robustbench_mat.runner import RunSpec, plan, run
from robustbench_mat.tracking import TAGS, Tracker
from robustbench_mat.training import CheckpointStore, resolve_device


@register_method("test-nan-after-25")
class NaNAfter25(ERM):
    """Test-only: ERM whose loss becomes NaN from its 26th call on."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def loss(self, batch):
        self.calls += 1
        loss = super().loss(batch)
        return loss * math.nan if self.calls > 25 else loss


def spec(workdir, **overrides) -> RunSpec:
    settings = dict(
        method="erm",
        dataset="synthetic",
        steps=200,
        eval_every=20,
        checkpoint_every=40,
        show_progress=False,
        workdir=workdir,
    )
    settings.update(overrides)
    return RunSpec(**settings)


def client(workdir) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")


def interrupt_at(monkeypatch, step):
    """Make ERM raise KeyboardInterrupt (as Ctrl-C would) right after optimiser step `step`."""

    def after_step(self, batch, current):
        if current == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(ERM, "after_step", after_step)


def history_csv(workdir) -> str:
    return (only_run_dir(workdir) / "history.csv").read_text()


# --- determinism -------------------------------------------------------------------------------


@pytest.mark.parametrize("hparams", [{}, {"batch_size": 100}], ids=["full-batch", "minibatch"])
def test_same_seed_and_config_give_identical_history(make_workdir, hparams):
    first_dir, second_dir = make_workdir("a"), make_workdir("b")
    first = run(spec(first_dir, hparams=hparams))
    second = run(spec(second_dir, hparams=hparams))
    assert first.run_key == second.run_key
    assert first.run_id != second.run_id
    assert not first.reused and not second.reused
    assert first.selected == second.selected
    assert first.final == second.final
    assert history_csv(first_dir) == history_csv(second_dir)


def test_history_has_one_record_per_evaluation(workdir):
    result = run(spec(workdir))
    lines = history_csv(workdir).splitlines()
    header = lines[0].split(",")
    steps = [int(line.split(",")[header.index("step")]) for line in lines[1:]]
    assert steps == list(range(20, 201, 20))
    assert result.final["step"] == 200
    assert {"train_loss", "train_wga", "val_wga", "test_wga", "val_worst_class"} <= set(header)
    assert result.selected_step == result.selected["step"]
    assert result.selected["step"] in steps


def test_different_seeds_give_different_histories(make_workdir):
    first = run(spec(make_workdir("a"), hparams={"batch_size": 100}, seed=0))
    second = run(spec(make_workdir("b"), hparams={"batch_size": 100}, seed=1))
    assert first.run_key != second.run_key
    assert first.final["train_loss"] != second.final["train_loss"]


# --- divergence --------------------------------------------------------------------------------


def test_nan_loss_fails_the_run_clearly(workdir):
    with pytest.raises(RunFailed) as caught:
        run(spec(workdir, method="test-nan-after-25", checkpoint_every=20))
    message = str(caught.value)
    assert message.startswith("the loss became nan at step 26 (test-nan-after-25 on synthetic")
    assert "lower the learning rate (lr=0.01)" in message
    assert caught.value.exit_code == 1

    run_dir = only_run_dir(workdir)
    assert not (run_dir / "result.json").exists()
    assert (run_dir / "checkpoint.pt").exists()  # from step 20; a rerun could resume
    tracked = client(workdir)
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    mlflow_run = tracked.get_run(run_id)
    assert mlflow_run.info.status == "FAILED"
    assert mlflow_run.data.tags[TAGS.STATE] == "failed"
    assert mlflow_run.data.tags[TAGS.METHOD] == "test-nan-after-25"
    # The evaluation before the failure was recorded; no final metrics were.
    assert [m.step for m in tracked.get_metric_history(run_id, "history/val_wga")] == [20]
    assert "test_wga" not in mlflow_run.data.metrics


def test_huge_learning_rate_diverges(workdir):
    with pytest.raises(RunFailed, match=r"the loss became (nan|inf) at step \d+ .*lr=1e\+38"):
        run(spec(workdir, hparams={"lr": 1e38}, steps=20, eval_every=10))
    assert not (only_run_dir(workdir) / "result.json").exists()


# --- interruption and resume -------------------------------------------------------------------


@pytest.mark.parametrize("hparams", [{}, {"batch_size": 100}], ids=["full-batch", "minibatch"])
def test_resume_after_interrupt_matches_an_uninterrupted_run(
    workdir, make_workdir, monkeypatch, hparams
):
    reference_dir = make_workdir("reference")
    reference = run(spec(reference_dir, hparams=hparams))

    with monkeypatch.context() as patch:
        interrupt_at(patch, 65)
        with pytest.raises(KeyboardInterrupt):
            run(spec(workdir, hparams=hparams))

    run_dir = only_run_dir(workdir)
    assert not (run_dir / "result.json").exists()
    checkpoint = CheckpointStore(run_dir / "checkpoint.pt").load()
    assert checkpoint["step"] == 40
    assert [r["step"] for r in checkpoint["history"]] == [20, 40]
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    interrupted = client(workdir).get_run(run_id)
    assert interrupted.info.status == "KILLED"
    assert interrupted.data.tags[TAGS.STATE] == "killed"

    resumed = run(spec(workdir, hparams=hparams))
    assert not resumed.reused
    assert resumed.run_id == run_id  # the same MLflow run, resumed
    assert resumed.run_key == reference.run_key
    assert resumed.selected == reference.selected
    assert resumed.final == reference.final
    assert history_csv(workdir) == history_csv(reference_dir)
    assert stored_result(workdir)["selected"] == stored_result(reference_dir)["selected"]
    assert torch.equal(
        torch.load(run_dir / "final_model.pt")["model.weight"],
        torch.load(only_run_dir(reference_dir) / "final_model.pt")["model.weight"],
    )

    tracked = client(workdir)
    finished = tracked.get_run(run_id)
    assert finished.info.status == "FINISHED"
    assert finished.data.tags[TAGS.STATE] == "finished"
    experiment = tracked.get_experiment_by_name("synthetic")
    assert len(tracked.search_runs([experiment.experiment_id])) == 1


def test_resume_after_the_last_checkpoint_was_written(workdir, make_workdir, monkeypatch):
    """Interrupted between the final checkpoint and result.json: resuming trains nothing."""
    reference = run(spec(make_workdir("reference"), steps=60))
    with monkeypatch.context() as patch:
        # Interrupted while recording the results, after the loop saved its step-60 checkpoint.
        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        patch.setattr(Tracker, "log_metrics", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run(spec(workdir, steps=60))
    assert not (only_run_dir(workdir) / "result.json").exists()
    assert CheckpointStore(only_run_dir(workdir) / "checkpoint.pt").load()["step"] == 60

    with monkeypatch.context() as patch:
        patch.setattr(ERM, "loss", lambda self, batch: pytest.fail("trained again"))
        resumed = run(spec(workdir, steps=60))
    assert resumed.selected == reference.selected
    assert resumed.final == reference.final


def test_restart_discards_the_checkpoint(workdir, monkeypatch):
    with monkeypatch.context() as patch:
        interrupt_at(patch, 50)
        with pytest.raises(KeyboardInterrupt):
            run(spec(workdir, steps=60))
    first_id = (only_run_dir(workdir) / "mlflow_run_id").read_text().strip()
    result = run(spec(workdir, steps=60, restart=True))
    assert result.run_id != first_id
    assert client(workdir).get_run(first_id).info.status == "KILLED"


# --- validation before anything is written -----------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"steps": 0}, "--steps must be a positive number of steps, got 0"),
        ({"eval_every": -5}, "--eval-every must be a positive number of steps, got -5"),
        ({"checkpoint_every": -1}, "--checkpoint-every must be a positive number"),
        ({"criterion": "test_wga"}, "must be a validation metric"),
        ({"regime": "none", "criterion": "val_wga"}, "reads validation group labels"),
        ({"hparams": {"lr": "fast"}}, "setting 'lr' expects float, got 'fast'"),
        ({"data_params": {"noise": 1}}, "unknown dataset 'synthetic' setting noise"),
        ({"device": "tpu"}, "--device must be auto, cpu or cuda"),
    ],
)
def test_bad_specs_fail_before_anything_is_written(workdir, overrides, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run(spec(workdir, **overrides))
    assert not (workdir / "runs").exists()


def test_plan_fills_in_defaults(workdir):
    the_plan = plan(RunSpec("erm", "synthetic", workdir=workdir))
    assert the_plan.steps == 1000
    assert the_plan.eval_every == 10
    assert the_plan.checkpoint_every == 100
    assert the_plan.regime.name == "val-only"
    assert the_plan.criterion == "val_wga"
    assert the_plan.device == resolve_device("auto")
    assert the_plan.run_dir.parent == workdir / "runs"
    assert the_plan.run_dir.name == f"synthetic-erm-val-only-s0-{the_plan.key}"
    # eval_every never exceeds the number of steps.
    assert plan(RunSpec("erm", "synthetic", steps=5, workdir=workdir)).eval_every == 5


def test_run_key_depends_on_what_determines_the_numbers(workdir):
    key = plan(spec(workdir)).key
    assert plan(spec(workdir, show_progress=True, checkpoint_every=20)).key == key
    assert plan(spec(workdir, hparams={"lr": "0.01"})).key == key  # the default, as text
    for overrides in (
        {"seed": 1},
        {"steps": 100},
        {"eval_every": 10},
        {"hparams": {"lr": 0.02}},
        {"data_params": {"noise_std": 0}},
        {"regime": "none"},
    ):
        assert plan(spec(workdir, **overrides)).key != key, overrides


# --- known bugs --------------------------------------------------------------------------------


def test_resumed_run_logs_each_evaluation_step_once(workdir, monkeypatch):
    with monkeypatch.context() as patch:
        interrupt_at(patch, 65)  # evaluated at 60, last checkpoint at 40
        with pytest.raises(KeyboardInterrupt):
            run(spec(workdir))
    result = run(spec(workdir))
    steps = [m.step for m in client(workdir).get_metric_history(result.run_id, "history/val_wga")]
    assert sorted(steps) == list(range(20, 201, 20))


def test_resume_with_checkpoints_between_evaluations_matches(workdir, make_workdir, monkeypatch):
    reference_dir = make_workdir("reference")
    run(spec(reference_dir, steps=100, eval_every=20, checkpoint_every=30))
    with monkeypatch.context() as patch:
        interrupt_at(patch, 35)  # checkpoint at 30, between the evaluations at 20 and 40
        with pytest.raises(KeyboardInterrupt):
            run(spec(workdir, steps=100, eval_every=20, checkpoint_every=30))
    run(spec(workdir, steps=100, eval_every=20, checkpoint_every=30))
    assert history_csv(workdir) == history_csv(reference_dir)


def test_best_state_copy_keeps_shared_tensors_shared():
    from robustbench_mat.training import cpu_copy

    shared = nn.Linear(3, 2)
    holder = nn.Module()
    holder.model, holder.view = nn.Sequential(shared), nn.Sequential(shared)
    copied = cpu_copy(holder.state_dict())
    assert copied["model.0.weight"] is copied["view.0.weight"]
    assert copied["model.0.weight"].data_ptr() != shared.weight.data_ptr()  # a copy
    assert torch.equal(copied["model.0.weight"], shared.weight)


# --- learning-rate schedules and decay groups ---------------------------------------------------


def lr_trace(monkeypatch, workdir, **overrides) -> list[float]:
    """The learning rate the optimiser held at each step of a run (recorded after the step)."""
    rates: list[float] = []

    def configure_scheduler(self, optimizer, steps):
        scheduler = Method.configure_scheduler(self, optimizer, steps)
        self._optimizer_seen = optimizer
        return scheduler

    def after_step(self, batch, step):
        rates.append(self._optimizer_seen.param_groups[0]["lr"])

    monkeypatch.setattr(ERM, "configure_scheduler", configure_scheduler)
    monkeypatch.setattr(ERM, "after_step", after_step)
    run(spec(workdir, **overrides))
    return rates


def test_the_xrm_bert_schedule_has_the_authors_shape(workdir, monkeypatch):
    # steps 9: w = 9 // 3 + 1 = 4; the multiplier after step t (t = 1..9) is 1 - t/4 for t < 4,
    # then 1 - (t - 4)/9.
    rates = lr_trace(
        monkeypatch, workdir, steps=9, eval_every=9, hparams={"lr": 0.1, "lr_schedule": "xrm-bert"}
    )
    expected = [0.1 * m for m in (0.75, 0.5, 0.25, 1.0, 8 / 9, 7 / 9, 6 / 9, 5 / 9, 4 / 9)]
    assert rates == pytest.approx(expected)


def test_the_linear_schedule_decays_to_zero(workdir, monkeypatch):
    rates = lr_trace(
        monkeypatch, workdir, steps=4, eval_every=4, hparams={"lr": 0.1, "lr_schedule": "linear"}
    )
    assert rates == pytest.approx([0.075, 0.05, 0.025, 0.0])


def test_a_scheduled_run_resumes_exactly(workdir, make_workdir, monkeypatch):
    settings = {"hparams": {"lr_schedule": "xrm-bert", "batch_size": 100}}
    reference = run(spec(make_workdir("reference"), **settings))
    with monkeypatch.context() as patch:
        interrupt_at(patch, 65)
        with pytest.raises(KeyboardInterrupt):
            run(spec(workdir, **settings))
    resumed = run(spec(workdir, **settings))
    assert resumed.final == reference.final and resumed.selected == reference.selected


def test_no_decay_groups_exempt_biases_and_layer_norms():
    from robustbench_mat.registry import DATASETS

    dataset = DATASETS.get("colored-digits")()
    hparams = {n: s.default for n, s in ERM.hparam_specs(dataset).items()}
    hparams.update(optimizer="adamw", weight_decay=0.1, no_decay_groups=True)
    method = ERM(dataset, hparams)
    method.model.add_module("LayerNorm", nn.LayerNorm(3))  # named as in BERT
    decayed, exempt = method.configure_optimizer().param_groups
    names = {id(p): n for n, p in method.named_parameters()}
    assert decayed["weight_decay"] == 0.1 and exempt["weight_decay"] == 0.0
    assert all(names[id(p)].endswith(("bias", "LayerNorm.weight")) for p in exempt["params"])
    assert not any(names[id(p)].endswith("bias") for p in decayed["params"])
    assert len(decayed["params"]) + len(exempt["params"]) == len(names)
    plain = ERM(dataset, {**hparams, "no_decay_groups": False}).configure_optimizer()
    assert len(plain.param_groups) == 1
