"""A training step reads nothing back from the device: over 20 optimizer steps between logging
steps, `trainer.fit` with the default callbacks and TensorBoard logger calls none of the
tensor methods that wait for the device (`item`, `__bool__`, `tolist`, `__float__`,
`__int__`, `__index__`, `cpu`, `numpy`), for the ViT and the LM. On a CPU these cost nothing,
on a GPU each one drains the queue: the counter sees them here.

The optimizer is torch's fused AdamW, whose step counter stays a tensor: no exception is
needed for it."""

from __future__ import annotations

import collections
import traceback

import lightning as L
import pytest
from torch.overrides import TorchFunctionMode

from moelab.run.train import run

from ..conftest import compose_config

SYNCS = {"item", "__bool__", "tolist", "__float__", "__int__", "__index__", "cpu", "numpy"}


class CountSyncs(TorchFunctionMode):
    """Counts calls of the SYNCS methods, each with where it came from."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNCS:
            frames = [f for f in traceback.extract_stack()[:-1] if "torch/overrides" not in f.filename][-3:]
            self.calls[(name, " <- ".join(f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}" for f in reversed(frames)))] += 1
        return func(*args, **(kwargs or {}))


class CountBetween(L.Callback):
    """Counts from the start of optimizer step `first` to the start of step `last`: the
    whole loop in between (data, forward, backward, optimizer, every callback and logger)."""

    counted: collections.Counter | None = None

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last, self.mode = first, last, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.first and self.mode is None:
            self.mode = CountSyncs()
            self.mode.__enter__()
        elif trainer.global_step == self.last and self.mode is not None:
            self.mode.__exit__(None, None, None)
            CountBetween.counted, self.mode = self.mode.calls, None


LM = ("experiment=lm_pystdlib", "model.d_model=32", "model.depth=4", "model.num_heads=2", "data.seq_len=16",
      "data.batch_size=2", "data.max_bytes=200000")
VIT = ("data.batch_size=16",)


def counted_syncs(tmp_path, model: tuple[str, ...], log_every: int) -> collections.Counter:
    CountBetween.counted = None
    cfg = compose_config(tmp_path, *model, "trainer.max_epochs=1", "trainer.limit_train_batches=30",
                         "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "test=false",
                         f"trainer.log_every_n_steps={log_every}", "+callbacks.count._target_=tests.tasks.test_hot_path.CountBetween",
                         "+callbacks.count.first=5", "+callbacks.count.last=25")
    run(cfg)
    assert CountBetween.counted is not None
    return CountBetween.counted


@pytest.mark.parametrize("model", [VIT, LM], ids=["vit", "lm"])
def test_twenty_training_steps_between_logging_steps_read_nothing_from_the_device(tmp_path, model):
    assert dict(counted_syncs(tmp_path, model, log_every=1000)) == {}


def test_the_counter_sees_the_reads_of_logging_steps(tmp_path):
    """The same run logging every 5 steps: the loggers, the expert views and the divergence
    check read the device then (so the test above would see a read if one happened)."""
    calls = counted_syncs(tmp_path, VIT, log_every=5)
    where = " ".join(w for _, w in calls)
    assert sum(calls.values()) > 0 and "divergence.py" in where and "common.py" in where
