"""LastCheckpoint: what it refuses to save (a state no resume could continue exactly), the
random streams it carries, and a Ctrl+C to the whole process group with loader workers."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from moelab.callbacks.checkpoint import rng_state, set_rng_state
from moelab.run.train import run

from ..conftest import compose_config
from ..stops import Crash
from ..run.test_train import FAST, train_cli

TWO_EPOCHS = (*FAST, "trainer.limit_train_batches=4", "trainer.max_epochs=2", "callbacks.progress=null")


def crash_and_report(tmp_path, *overrides: str) -> int:
    """Run until the injected Crash; the step of the last.ckpt left behind."""
    with pytest.warns(UserWarning, match="not saving .* the last checkpoint written stays"), pytest.raises(Crash):
        run(compose_config(tmp_path, *TWO_EPOCHS, *overrides))
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "error"
    return torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]


def test_an_exception_during_the_optimizer_step_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import moelab.tasks.base

    def crash_at_step_5(model):  # runs after optimizer.step(), before Lightning counts the step
        if crash_at_step_5.calls == 5:
            raise Crash("after the weights changed")
        crash_at_step_5.calls += 1

    crash_at_step_5.calls = 0
    monkeypatch.setattr(moelab.tasks.base, "after_optimizer_step", crash_at_step_5)
    assert crash_and_report(tmp_path) == 4  # the epoch end; not the half-counted step 5


def test_an_exception_during_validation_keeps_the_previous_checkpoint(tmp_path):
    stop = ("+callbacks.stop._target_=tests.stops.RaiseAt", "+callbacks.stop.step=8", "+callbacks.stop.where=validation")
    assert crash_and_report(tmp_path, *stop) == 4  # epoch 1's validation failed: epoch 0's end stays


def test_an_exception_inside_a_gradient_accumulation_keeps_the_previous_checkpoint(tmp_path):
    # 4 micro-batches per epoch, 2 per step: micro-batch 3 of epoch 1 is the second half of step 3
    # (steps 0-1 in epoch 0, saved at its end; step 2 done since).
    stop = ("+callbacks.stop._target_=tests.stops.RaiseInMicroBatch", "+callbacks.stop.batch=3",
            "+callbacks.stop.epoch=1", "+trainer.accumulate_grad_batches=2")
    assert crash_and_report(tmp_path, *stop) == 2


def test_a_signal_during_the_last_validation_stops_before_testing(tmp_path):
    stop = ("+callbacks.stop._target_=tests.stops.SignalAt", "+callbacks.stop.step=8", "+callbacks.stop.during=validation")
    with pytest.raises(SystemExit) as ended:
        run(compose_config(tmp_path, *TWO_EPOCHS, *stop))
    assert ended.value.code == 130
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["status"] == "interrupted" and record["step"] == 8 and "test/acc" not in record
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8


def test_random_streams_round_trip():
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    state = rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    set_rng_state(state)
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def test_ctrl_c_to_the_process_group_with_loader_workers_stops_cleanly(tmp_path):
    # Every process of the group gets SIGINT, the loader worker too: it must not die of it, since
    # the step in progress (4 micro-batches, 2 of them prefetched) still needs its batches.
    result = train_cli(tmp_path / "run", *TWO_EPOCHS, "data.num_workers=1", "trainer.limit_train_batches=8",
                       "+trainer.accumulate_grad_batches=4", "+callbacks.stop._target_=tests.stops.SignalAt",
                       "+callbacks.stop.step=0", "+callbacks.stop.group=true", new_session=True)
    assert result.returncode == 130, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 1
