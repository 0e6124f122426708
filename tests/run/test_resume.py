"""The resume contract: a run stopped at any step (a signal, an exception before or after the
optimizer step) and resumed with the same command plus `ckpt_path=…/last.ckpt` ends with the
metrics.json of the run that never stopped, bit for bit on CPU — for the ViT (with a noise
router and dropout, so the random streams matter), the LM, and FSDP+EP on 2 ranks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from moelab.data.digits import DigitsDataModule
from moelab.models.build import build_model
from moelab.parallel.checkpoint import load_sharded_into
from moelab.run.train import run

from ..conftest import compose_config
from ..stops import Crash
from ..run.test_train import train_cli

# 2 epochs of 6 steps; noisy top-k and expert dropout draw from the global RNG every step.
VIT = (
    "debug=default", "trainer.max_epochs=2", "trainer.limit_train_batches=6", "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2", "data.batch_size=32", "router=noisy_topk", "expert.dropout=0.1",
    "callbacks.progress=null",
)
LM = (
    "experiment=lm_pystdlib", "debug=default", "trainer.max_epochs=2", "data.train_steps_per_epoch=4",
    "trainer.limit_train_batches=null", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2",
    "data.max_bytes=200000", "data.seq_len=32", "data.batch_size=4", "model.d_model=32", "model.ffn_hidden=64",
    "model.depth=2", "model.num_heads=2", "model.dropout=0.1", "task.sample_tokens=8", "callbacks.progress=null",
)


def record(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def run_until_stopped(folder: Path, *overrides: str) -> int | str:
    """Run in-process; the exit code (or the exception's name) of how it ended."""
    try:
        run(compose_config(folder, *overrides))
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 1
    except Crash:
        return "Crash"
    return 0


def last_step(folder: Path) -> int:
    return torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]


STOPS = {
    # SIGINT during step 3's backward: the run finishes step 3 and saves there (step 4 done).
    "sigint": (("+callbacks.stop._target_=tests.stops.SignalAt", "+callbacks.stop.step=3"), 130, 4),
    "sigterm": (("+callbacks.stop._target_=tests.stops.SignalAt", "+callbacks.stop.step=3", "+callbacks.stop.signum=SIGTERM"), 143, 4),
    # An exception after step 3's backward, before its optimizer step: saved as of step 3.
    "exception_mid_step": (("+callbacks.stop._target_=tests.stops.RaiseAt", "+callbacks.stop.step=3"), "Crash", 3),
    # An exception after step 3's optimizer step: saved as of step 4.
    "exception_after_step": (("+callbacks.stop._target_=tests.stops.RaiseAt", "+callbacks.stop.step=3", "+callbacks.stop.where=batch_end"), "Crash", 4),
    # SIGINT in the epoch's last step: it ends with the epoch (validation, epoch-end save).
    "sigint_last_step_of_epoch": (("+callbacks.stop._target_=tests.stops.SignalAt", "+callbacks.stop.step=5"), 130, 6),
    # SIGINT in the first step: saved as of step 1.
    "sigint_first_step": (("+callbacks.stop._target_=tests.stops.SignalAt", "+callbacks.stop.step=0"), 130, 1),
    # SIGINT during epoch 0's validation: the validation finishes, and the run stops at the next
    # optimizer-step boundary (step 6 done: saved as of step 7).
    "sigint_during_validation": (("+callbacks.stop._target_=tests.stops.SignalAt", "+callbacks.stop.step=6",
                                  "+callbacks.stop.during=validation"), 130, 7),
    # SIGINT in the last training step: training ends as planned, the stop comes before the test
    # (the resumed run only tests, and must still record every train/ (train/lr too) and val/ value).
    "sigint_last_training_step": (("+callbacks.stop._target_=tests.stops.SignalAt", "+callbacks.stop.step=11"), 130, 12),
    "sigint_during_test": (("+callbacks.stop._target_=tests.stops.SignalAt", "+callbacks.stop.step=12",
                            "+callbacks.stop.during=test"), 130, 12),
    # Ctrl+C twice in step 8: stops at once, saving nothing newer than epoch 0's end (step 6).
    "second_sigint_stops_at_once": (("+callbacks.stop._target_=tests.stops.SignalAt", "+callbacks.stop.step=8",
                                     "+callbacks.stop.again=true"), 130, 6),
}


@pytest.fixture(scope="module")
def vit_straight(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("vit_straight")
    assert run_until_stopped(folder, *VIT) == 0
    return record(folder)


@pytest.mark.parametrize("stop", sorted(STOPS))
def test_vit_stopped_and_resumed_equals_the_uninterrupted_run(tmp_path, vit_straight, stop):
    stop_overrides, expected_exit, saved_step = STOPS[stop]
    assert run_until_stopped(tmp_path / "stopped", *VIT, *stop_overrides) == expected_exit
    stopped = record(tmp_path / "stopped")
    assert stopped["status"] == ("interrupted" if isinstance(expected_exit, int) else "error")
    assert last_step(tmp_path / "stopped") == saved_step

    checkpoint = tmp_path / "stopped" / "checkpoints" / "last.ckpt"
    assert run_until_stopped(tmp_path / "resumed", *VIT, f"ckpt_path={checkpoint}") == 0
    assert record(tmp_path / "resumed") == vit_straight
    assert vit_straight["status"] == "ok" and vit_straight["step"] == 12


@pytest.fixture(scope="module")
def lm_straight(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("lm_straight")
    assert run_until_stopped(folder, *LM) == 0
    return record(folder)


LM_STOPS = {  # 2 epochs of 4 steps
    "first_step": (("+callbacks.stop.step=0",), 1),
    "mid_epoch": (("+callbacks.stop.step=2",), 3),
    "during_validation": (("+callbacks.stop.step=4", "+callbacks.stop.during=validation"), 5),
    "during_test": (("+callbacks.stop.step=8", "+callbacks.stop.during=test"), 8),
}


@pytest.mark.parametrize("stop", sorted(LM_STOPS))
def test_lm_stopped_and_resumed_equals_the_uninterrupted_run(tmp_path, lm_straight, stop):
    overrides, saved_step = LM_STOPS[stop]
    signal_at = ("+callbacks.stop._target_=tests.stops.SignalAt", *overrides)
    assert run_until_stopped(tmp_path / "stopped", *LM, *signal_at) == 130
    assert last_step(tmp_path / "stopped") == saved_step
    checkpoint = tmp_path / "stopped" / "checkpoints" / "last.ckpt"
    assert run_until_stopped(tmp_path / "resumed", *LM, f"ckpt_path={checkpoint}") == 0
    assert record(tmp_path / "resumed") == lm_straight
    assert {"val/bpb", "test/bpb", "train/loss"} <= set(lm_straight) and any(k.startswith("train/lr") for k in lm_straight)


def test_fsdp_ep_on_two_ranks_writes_once_and_resumes_exactly(tmp_path):
    common = (
        "trainer=fsdp_ep", "ep=2", "trainer.devices=2", "trainer.accelerator=cpu", "trainer.max_epochs=2",
        "trainer.limit_train_batches=4", "trainer.limit_val_batches=1", "data.batch_size=16", "router=noisy_topk",
        "callbacks.progress=null", "trainer.log_every_n_steps=2",
    )
    straight_dir = tmp_path / "straight"
    straight = train_cli(straight_dir, *common)
    assert straight.returncode == 0, straight.stderr[-3000:]
    # Rank 1 ran in the same folder (its log is there); only rank 0 wrote metrics and TensorBoard.
    assert (straight_dir / "train_ddp_process_1.log").exists()
    events = list((straight_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len({path.name.split(".")[4] for path in events}) == 1, events  # one writer process
    final = straight_dir / "checkpoints" / "last.ckpt"
    assert final.is_dir(), "a distributed checkpoint is a folder of shards"

    # The ep=2 checkpoint in one process, for inference: the run's own test accuracy.
    cfg = compose_config(tmp_path / "single", "router=noisy_topk")
    task = instantiate(cfg.task, model=build_model(cfg))
    load_sharded_into(task, final).eval()
    data = DigitsDataModule()
    data.setup()
    images, labels = data.splits["test"].tensors
    with torch.no_grad():
        accuracy = (task(images).argmax(-1) == labels).float().mean().item()
    assert accuracy == pytest.approx(record(straight_dir)["test/acc"], abs=1e-6)

    # SIGINT reaches rank 1 only: the ranks agree to stop after the same step.
    stopped = train_cli(tmp_path / "stopped", *common, "+callbacks.stop._target_=tests.stops.SignalAt",
                        "+callbacks.stop.step=1", "+callbacks.stop.rank=1")
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    checkpoint = tmp_path / "stopped" / "checkpoints" / "last.ckpt"
    assert checkpoint.is_dir() and record(tmp_path / "stopped")["status"] == "interrupted"
    assert torch.load(checkpoint / "meta.pt", weights_only=True)["global_step"] == 2
    # Resumed, and stopped again by SIGINT in the last training step: the run resumed from
    # there only tests, and records every train/ (train/lr too) and val/ value the two earlier
    # parts logged, equal to the uninterrupted run's (so both resumes were exact).
    resumed = train_cli(tmp_path / "resumed", *common, f"ckpt_path={checkpoint}",
                        "+callbacks.stop._target_=tests.stops.SignalAt", "+callbacks.stop.step=7")
    assert resumed.returncode == 130, resumed.stderr[-3000:]
    late = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    assert torch.load(late / "meta.pt", weights_only=True)["global_step"] == 8
    late_resumed = train_cli(tmp_path / "late_resumed", *common, f"ckpt_path={late}")
    assert late_resumed.returncode == 0, late_resumed.stderr[-3000:]
    assert record(tmp_path / "late_resumed") == record(straight_dir)
    assert {"val/acc", "train/loss"} <= set(record(straight_dir)) and any(k.startswith("train/lr") for k in record(straight_dir))
    # (Resuming it into other layouts, ep=1 and ep=4, is checked without Lightning in tests/parallel/test_fsdp_ep.py.)


def test_a_requeued_slurm_job_in_its_own_folder_continues_from_last_ckpt(tmp_path, vit_straight):
    folder = tmp_path / "job"
    stop = ("+callbacks.stop._target_=tests.stops.SignalAt", "+callbacks.stop.step=3", "+callbacks.stop.signum=SIGTERM")
    assert run_until_stopped(folder, *VIT, *stop) == 143  # preempted: SLURM sends SIGTERM
    # The requeued job runs the same command in the same folder (hydra.run.dir=…/${oc.env:SLURM_JOB_ID}).
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SLURM_RESTART_COUNT", "1")
        assert run_until_stopped(folder, *VIT) == 0
    assert record(folder) == vit_straight
