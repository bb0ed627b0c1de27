"""Evaluations of a small linear model computed in blocks (`training._EvaluationBlock`) record
exactly what evaluating at each step would, whatever steps share a block."""

from __future__ import annotations

import mlflow
import pytest
import torch
from helpers import only_run_dir, stored_result

from robustbench_mat import stacking, training
from robustbench_mat.errors import RunFailed, RunPruned
from robustbench_mat.runner import RunSpec, run


def spec(workdir, **overrides) -> RunSpec:
    settings = dict(
        method="erm",
        dataset="synthetic",
        steps=150,
        eval_every=1,
        checkpoint_seconds=60.0,  # checkpoints are rarer than evaluations: blocks form
        show_progress=False,
        workdir=workdir,
    )
    settings.update(overrides)
    return RunSpec(**settings)


@pytest.fixture
def one_by_one(monkeypatch):
    """Evaluate at each step, as without blocks."""

    def patch():
        monkeypatch.setattr(training._EvaluationBlock, "size_for", staticmethod(lambda m: 0))

    return patch


@pytest.fixture
def block_passes(monkeypatch):
    """Count the vectorised passes over kept states."""
    calls = []
    real = stacking.predict_states

    def counted(method, states, x):
        calls.append(len(states))
        return real(method, states, x)

    monkeypatch.setattr(stacking, "predict_states", counted)
    return calls


def outputs(workdir):
    run_dir = only_run_dir(workdir)
    return (
        (run_dir / "history.csv").read_text(),
        stored_result(workdir)["selected"],
        stored_result(workdir)["final"],
        torch.load(run_dir / "selected_model.pt"),
    )


def same_outputs(one, other) -> None:
    assert one[0] == other[0]  # every evaluation, to the last digit
    assert one[1] == other[1] and one[2] == other[2]
    assert one[3].keys() == other[3].keys()
    assert all(torch.equal(one[3][k], other[3][k]) for k in one[3])


@pytest.mark.parametrize(
    "method, hparams",
    [("erm", {}), ("erm", {"batch_size": 100}), ("groupdro", {"eta": 0.1})],
    ids=["erm-full-batch", "erm-minibatch", "groupdro"],
)
def test_evaluations_in_blocks_equal_those_made_one_by_one(
    make_workdir, one_by_one, block_passes, method, hparams
):
    blocks = make_workdir("blocks")
    run(spec(blocks, method=method, hparams=hparams, regime="full"))
    # 150 evaluations: two full blocks of 64, then the last 22 at the last step, for each of
    # the three splits (the synthetic task evaluates its training split too).
    assert block_passes == [training.EVALUATION_BLOCK] * 9
    one_by_one()
    alone = make_workdir("alone")
    run(spec(alone, method=method, hparams=hparams, regime="full"))
    assert len(block_passes) == 9
    same_outputs(outputs(blocks), outputs(alone))
    if method == "groupdro":  # its logged group weights are those of each evaluated step
        history = (only_run_dir(blocks) / "history.csv").read_text().splitlines()
        header = history[0].split(",")
        weights = [k for k, name in enumerate(header) if name.startswith("groupdro_weight.")]
        assert weights and history[1].split(",")[weights[0]] != history[-1].split(",")[weights[0]]


def test_a_steps_logits_do_not_depend_on_what_shares_its_block(make_workdir, monkeypatch):
    """A block flushed after every evaluation (as a checkpoint or a resumed run may cut one
    short) gives the same numbers as full blocks."""
    full = make_workdir("full")
    run(spec(full, eval_every=3))
    real_add = training._EvaluationBlock.add

    def add_then_flush(self, step, mean_loss, record):
        real_add(self, step, mean_loss, record)
        self.flush(record)

    monkeypatch.setattr(training._EvaluationBlock, "add", add_then_flush)
    cut = make_workdir("cut")
    run(spec(cut, eval_every=3))
    same_outputs(outputs(full), outputs(cut))


def test_blocks_follow_checkpoints_between_evaluations(make_workdir, block_passes):
    """Checkpoints every 4th evaluation without a time limit: blocks of 4, each recorded
    before its checkpoint saves the history."""
    workdir = make_workdir("blocks")
    run(spec(workdir, steps=40, eval_every=5, checkpoint_every=20, checkpoint_seconds=0.0))
    assert block_passes == [4] * 6  # two checkpoints, three splits
    checkpoint = training.CheckpointStore(only_run_dir(workdir) / "checkpoint.pt").load()
    assert [r["step"] for r in checkpoint["history"]] == list(range(5, 41, 5))


def test_no_blocks_where_each_evaluation_is_checkpointed(make_workdir, block_passes):
    run(spec(make_workdir("w"), steps=20, eval_every=5, checkpoint_every=5, checkpoint_seconds=0))
    assert block_passes == []


def _logged_steps(workdir, key="history/val_wga") -> list[int]:
    client = mlflow.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    (found,) = client.search_runs([client.get_experiment_by_name("synthetic").experiment_id])
    return sorted(m.step for m in client.get_metric_history(found.info.run_id, key))


def test_a_model_pruned_inside_a_block_stops_at_that_evaluation(make_workdir, one_by_one):
    seen = []

    def prune_at_30(record):
        seen.append(record["step"])
        if record["step"] == 30:
            raise RunPruned("pruned at step 30")

    blocks = make_workdir("blocks")
    with pytest.raises(RunPruned):
        run(spec(blocks, steps=100, on_evaluation=prune_at_30))
    assert seen == list(range(1, 31))
    one_by_one()
    seen.clear()
    alone = make_workdir("alone")
    with pytest.raises(RunPruned):
        run(spec(alone, steps=100, on_evaluation=prune_at_30))
    assert seen == list(range(1, 31))
    assert _logged_steps(blocks) == _logged_steps(alone)


def test_evaluations_before_a_divergence_are_recorded_as_one_by_one(make_workdir, one_by_one):
    """The test-nan-after-25 method (tests/test_training.py) diverges at step 26: the 25
    evaluations before it are kept in the block when the loss turns NaN."""
    import test_training  # noqa: F401 (registers test-nan-after-25)

    blocks = make_workdir("blocks")
    with pytest.raises(RunFailed, match="step 26"):
        run(spec(blocks, method="test-nan-after-25", steps=60))
    one_by_one()
    alone = make_workdir("alone")
    with pytest.raises(RunFailed, match="step 26"):
        run(spec(alone, method="test-nan-after-25", steps=60))
    assert _logged_steps(blocks) == _logged_steps(alone)
