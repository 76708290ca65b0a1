"""The training core on a toy problem: the loop, resume, events, selection, checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from storage.checkpoints import RunCheckpoints
from tasks.training import Callback, EpochBatches, Evaluation, TrainSettings, train


def toy_batches(n: int = 24, batch_size: int = 4, seed: int = 0) -> EpochBatches:
    """y = x·w* + noise; each epoch a fresh permutation, a pure function of the epoch."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(n, generator=g)

    def plan(epoch: int) -> list[np.ndarray]:
        order = np.random.default_rng([seed, epoch]).permutation(n)
        return [order[i:i + batch_size] for i in range(0, n, batch_size)]

    def load(epoch: int, batches: list[np.ndarray]):
        return ({"input_ids": x[b], "target": y[b]} for b in batches)

    return EpochBatches(per_epoch=-(-n // batch_size), plan=plan, load=load)


class Regressor(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(3, 1)
        self.dropout = torch.nn.Dropout(0.1)  # draws from the RNG: resume must restore it

    def forward(self, input_ids, target):
        return torch.nn.functional.mse_loss(self.linear(self.dropout(input_ids)).squeeze(-1), target)


def objective(model, batch):
    return model(**batch)


def settings(**overrides) -> TrainSettings:
    values = dict(total_steps=30, batch_size=4, lr=0.3, warmup_steps=3, weight_decay=0.01, precision="fp32",
                  device="cpu", eval_every=10, save_every=10, log_every=5, seed=0)
    values.update(overrides)
    return TrainSettings(**values)


def evaluate_on(batches: EpochBatches):
    def evaluate(model) -> Evaluation:
        losses = [float(objective(model, b)) for b in batches.load(0, batches.plan(0))]
        return Evaluation(0, {"loss": sum(losses) / len(losses), "score": -sum(losses)})

    return evaluate


class Recorder(Callback):
    def __init__(self, crash_at: int | None = None):
        self.events: list[tuple] = []
        self.crash_at = crash_at

    def on_start(self, run):
        self.events.append(("start", run.start_step, run.total_steps))

    def on_log(self, step, record):
        self.events.append(("log", step))
        if step == self.crash_at:
            raise KeyboardInterrupt(f"crash at {step}")

    def on_eval(self, evaluation, *, improved, history):
        self.events.append(("eval", evaluation.step, improved))

    def on_checkpoint(self, step, history):
        self.events.append(("checkpoint", step))

    def on_note(self, message):
        self.events.append(("note", message))

    def on_end(self, result):
        self.events.append(("end", result.steps))


def train_losses(result) -> list[float]:
    return [h["loss"] for h in result.history if h["kind"] == "train"]


def test_loss_falls_and_events_arrive_in_order(tmp_path: Path):
    recorder = Recorder()
    batches = toy_batches()
    result = train(Regressor(), objective, batches, settings(), evaluate=evaluate_on(batches),
                   checkpoints=RunCheckpoints(tmp_path / "run"), identity={"run": 1}, callbacks=[recorder])
    losses = train_losses(result)
    evals = [h["loss"] for h in result.history if h["kind"] == "eval"]
    assert len(losses) == 30 and evals[-1] < 0.5 * evals[0] and evals[0] < np.mean(losses[:3])
    kinds = [e[0] for e in recorder.events]
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert [e for e in recorder.events if e[0] == "eval"] == [("eval", 10, None), ("eval", 20, None), ("eval", 30, None)]
    assert [e[1] for e in recorder.events if e[0] == "checkpoint"] == [10, 20, 30]
    assert [e[1] for e in recorder.events if e[0] == "log"] == [5, 10, 15, 20, 25, 30]
    assert [h["lr"] for h in result.history if h["kind"] == "train"][:3] == pytest.approx([0.1, 0.2, 0.3])


def test_resume_after_a_crash_is_exact(tmp_path: Path):
    batches = toy_batches()
    reference = train(Regressor(), objective, batches, settings(), evaluate=evaluate_on(batches),
                      checkpoints=RunCheckpoints(tmp_path / "a"), identity={"run": 1})
    with pytest.raises(KeyboardInterrupt):
        train(Regressor(), objective, batches, settings(), evaluate=evaluate_on(batches),
              checkpoints=RunCheckpoints(tmp_path / "b"), identity={"run": 1}, callbacks=[Recorder(crash_at=25)])
    recorder = Recorder()
    resumed = train(Regressor(), objective, batches, settings(), evaluate=evaluate_on(batches),
                    checkpoints=RunCheckpoints(tmp_path / "b"), identity={"run": 1}, callbacks=[recorder])
    assert resumed.resumed_from == 20 and ("start", 20, 30) in recorder.events
    assert train_losses(resumed) == train_losses(reference)
    assert torch.equal(resumed.model.linear.weight, reference.model.linear.weight)


def test_gradient_accumulation_matches_the_larger_batch(tmp_path: Path):
    """Two micro-batches of 4 per step take the step one batch of 8 takes (the same examples)."""
    small = train(Regressor(), objective, toy_batches(batch_size=4), settings(grad_accum=2, total_steps=9))
    large = train(Regressor(), objective, toy_batches(batch_size=8), settings(total_steps=9))
    # dropout masks differ between the two set-ups; without dropout the numbers agree
    small_nodrop = train(_no_dropout(), objective, toy_batches(batch_size=4), settings(grad_accum=2, total_steps=9))
    large_nodrop = train(_no_dropout(), objective, toy_batches(batch_size=8), settings(total_steps=9))
    assert len(train_losses(small)) == len(train_losses(large)) == 9
    assert train_losses(small_nodrop) == pytest.approx(train_losses(large_nodrop), rel=1e-5)
    assert torch.allclose(small_nodrop.model.linear.weight, large_nodrop.model.linear.weight, atol=1e-6)


def _no_dropout() -> Regressor:
    model = Regressor()
    model.dropout.p = 0.0
    return model


def test_selection_keeps_the_best_weights_and_stops_early(tmp_path: Path):
    scores = iter([0.1, 0.5, 0.3, 0.2, 0.9])
    snapshots = []

    def evaluate(model) -> Evaluation:
        snapshots.append(model.linear.weight.detach().clone())
        return Evaluation(0, {"score": next(scores)}, payload=["rows"])

    recorder = Recorder()
    result = train(Regressor(), objective, toy_batches(), settings(eval_every=2, select_metric="score", early_stopping=2),
                   evaluate=evaluate, callbacks=[recorder])
    assert result.stopped_early and result.steps == 8
    assert result.best.step == 4 and result.best.score == 0.5 and result.best.payload == ["rows"]
    assert torch.equal(result.model.linear.weight, snapshots[1])
    assert [e[2] for e in recorder.events if e[0] == "eval"] == [True, True, False, False]
    assert any(e[0] == "note" and "early stopping" in e[1] for e in recorder.events)


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path: Path):
    """Checkpoints load with weights_only=True: a pickle that calls a function never runs it."""
    batches = toy_batches()
    checkpoints = RunCheckpoints(tmp_path / "run")
    train(Regressor(), objective, batches, settings(total_steps=10), checkpoints=checkpoints, identity={})
    newest = checkpoints.list()[-1]
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"payload": Exploit()}, newest)
    # the marker still describes the old bytes, so the digest check refuses first; with a forged
    # marker the unpickler refuses the call
    import hashlib
    import json

    (newest.parent / (newest.name + ".json")).write_text(json.dumps(
        {"step": 10, "bytes": newest.stat().st_size, "sha256": hashlib.sha256(newest.read_bytes()).hexdigest()}))
    with pytest.raises(ValueError, match="does not load"):
        checkpoints.load(newest)
    notes = []
    assert checkpoints.load_latest(on_damaged=notes.append) is None
    assert not marker.exists() and "damaged" in notes[0]


def test_checkpoints_of_another_run_are_refused(tmp_path: Path):
    from bertflow.errors import BertflowError

    batches = toy_batches()
    train(Regressor(), objective, batches, settings(total_steps=10), checkpoints=RunCheckpoints(tmp_path / "r"),
          identity={"lr": 0.3})
    with pytest.raises(BertflowError, match="other settings"):
        train(Regressor(), objective, batches, settings(total_steps=20), checkpoints=RunCheckpoints(tmp_path / "r"),
              identity={"lr": 0.01})


class StopRequest(Callback):
    """Stands in for the SIGTERM handler: a stop request while step `at` runs (as the step's
    events are emitted), and optionally a second one, which must not wait."""

    def __init__(self, at: int, twice: bool = False):
        self.at, self.twice = at, twice

    def on_step(self, step):
        if step == self.at:
            from tasks.training import stopping

            stopping.request_stop(15)
            if self.twice:
                stopping.request_stop(15)


def test_a_stop_request_checkpoints_the_step_and_the_rerun_resumes_exactly(tmp_path: Path):
    from bertflow.errors import Stopped
    from tasks.training import stopping

    batches = toy_batches()
    reference = train(Regressor(), objective, batches, settings(), evaluate=evaluate_on(batches),
                      checkpoints=RunCheckpoints(tmp_path / "a"), identity={"run": 1})
    recorder = Recorder()
    with pytest.raises(Stopped, match="toy: SIGTERM received; step 13 of 30 is checkpointed") as stopped:
        train(Regressor(), objective, batches, settings(), evaluate=evaluate_on(batches), name="toy",
              checkpoints=RunCheckpoints(tmp_path / "b"), identity={"run": 1}, callbacks=[StopRequest(13), recorder])
    assert stopped.value.signal_number == 15
    assert [p.name for p in RunCheckpoints(tmp_path / "b").list()] == ["step-00000010.pt", "step-00000013.pt"]
    assert recorder.events[-2:] == [("checkpoint", 13), ("end", 13)]  # no step after it; the run's files written
    assert stopping.pending() is None  # the request was acted on, not left for the next run

    resumed = train(Regressor(), objective, batches, settings(), evaluate=evaluate_on(batches),
                    checkpoints=RunCheckpoints(tmp_path / "b"), identity={"run": 1})
    assert resumed.resumed_from == 13
    assert train_losses(resumed) == train_losses(reference)
    assert torch.equal(resumed.model.linear.weight, reference.model.linear.weight)


def test_outside_the_loop_or_asked_twice_a_stop_request_does_not_wait(tmp_path: Path):
    from bertflow.errors import Stopped
    from tasks.training import stopping

    with pytest.raises(Stopped, match="SIGTERM received outside a training step"):
        stopping.request_stop(15)  # no loop running: nothing to wait for
    with pytest.raises(Stopped, match="SIGTERM received outside a training step"):
        train(Regressor(), objective, toy_batches(), settings(), checkpoints=RunCheckpoints(tmp_path / "c"),
              identity={}, callbacks=[StopRequest(13, twice=True)])
    assert [p.name for p in RunCheckpoints(tmp_path / "c").list()] == ["step-00000010.pt"]
