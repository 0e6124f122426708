"""A run's folder and the faults around it, each one line and checked before training where it
can be: a second run into a folder in use, a stale lock, folders that cannot be written, a
record path that is a folder, a run folder that cannot be made, the leftover of a killed
save, and a save that fails in the middle of a run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from moelab.run.folder import LOCK_FILE, RunLock
from moelab.run.train import run

from ..conftest import ROOT, VIT_FAST, compose_config, one_line_error


def test_a_second_run_into_a_folder_in_use_is_refused_naming_the_process(tmp_path):
    lock = RunLock(tmp_path)
    lock.acquire()
    try:
        line = one_line_error(compose_config(tmp_path, *VIT_FAST))
        assert f"{tmp_path} is the folder of a run in progress (process {os.getpid()} on" in line
        assert not (tmp_path / "metrics.json").exists() or json.loads((tmp_path / "metrics.json").read_text())["status"] == "error"
    finally:
        lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_stale_lock_is_taken_over_with_a_line_and_released_at_the_end(tmp_path, caplog):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": int(gone.stdout), "host": os.uname().nodename}))
    run(compose_config(tmp_path, *VIT_FAST))
    assert f"was left by process {int(gone.stdout)}, which is gone: taking it over" in caplog.text
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "ok"
    assert not (tmp_path / LOCK_FILE).exists()


@pytest.mark.parametrize("fault", ["checkpoints_is_a_file", "metrics_is_a_folder", "dirpath_under_dev_null"])
def test_an_unwritable_place_is_one_line_before_training(tmp_path, fault):
    overrides = []
    if fault == "checkpoints_is_a_file":
        tmp_path.mkdir(exist_ok=True)
        (tmp_path / "checkpoints").write_text("not a folder")
        expected = "callbacks.checkpoint.dirpath"
    elif fault == "metrics_is_a_folder":
        (tmp_path / "metrics.json").mkdir(parents=True)
        expected = f"{tmp_path / 'metrics.json'} is not a file"
    else:
        overrides = ["callbacks.last_checkpoint.dirpath=/dev/null/ck"]
        expected = "callbacks.last_checkpoint.dirpath /dev/null/ck cannot be written"
    line = one_line_error(compose_config(tmp_path, *VIT_FAST, *overrides))
    assert expected in line
    assert not list(tmp_path.glob("tensorboard")), "refused before anything trained or logged"


def test_a_run_folder_that_cannot_be_made_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("")
    result = subprocess.run([sys.executable, "train.py", f"hydra.run.dir={tmp_path / 'afile' / 'run'}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"moelab: error: hydra.run.dir={tmp_path / 'afile' / 'run'} cannot be made")


def test_the_leftover_of_a_killed_save_is_removed_at_the_next_start(tmp_path, caplog):
    partial = tmp_path / "checkpoints" / ".last.ckpt.partial"
    partial.mkdir(parents=True)
    (partial / "shard").write_text("half a checkpoint")
    run(compose_config(tmp_path, *VIT_FAST))
    assert not partial.exists() and f"removed {partial}" in caplog.text
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_a_save_that_fails_mid_run_keeps_the_newest_good_checkpoint_and_says_where(tmp_path, monkeypatch, recwarn):
    """Epoch 0 saves; the save at epoch 1's end fails (a full disk); the run goes on and the
    newest good last.ckpt is named."""
    from lightning.pytorch import Trainer

    real_save = Trainer.save_checkpoint

    def full_disk(self, path, *args, **kwargs):
        if self.global_step > 3 and Path(path).name.startswith(".last"):
            raise OSError(28, "No space left on device")
        return real_save(self, path, *args, **kwargs)

    monkeypatch.setattr(Trainer, "save_checkpoint", full_disk)
    run(compose_config(tmp_path, *VIT_FAST, "trainer.max_epochs=2"))
    last = tmp_path / "checkpoints" / "last.ckpt"
    warned = [str(w.message) for w in recwarn if "could not save" in str(w.message)]
    assert warned and f"{last} (step 3) is the newest good one" in warned[0] and "No space left on device" in warned[0]
    import torch

    assert torch.load(last, weights_only=True)["global_step"] == 3
    assert not (tmp_path / "checkpoints" / ".last.ckpt.partial").exists()


def test_a_stopped_run_with_overrides_resumes_from_its_printed_line_pasted_verbatim(tmp_path):
    """The run folder is named `<date_time>-<hash>` (no `=` or `,` from the overrides), and the
    line printed at SIGINT is a whole command that a shell runs as printed — an override with
    a space and a quote in it included."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    overrides = [*VIT_FAST, "trainer.max_epochs=2", "model.moe_every=2", "+callbacks.stop._target_=tests.stops.SignalAt",
                 "+callbacks.stop.step=2", "+tags='a b, it\\'s'"]
    stopped = subprocess.run([sys.executable, str(ROOT / "train.py"), *overrides], cwd=tmp_path, capture_output=True,
                             text=True, env={**env, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    (folder,) = (tmp_path / "outputs" / "runs").iterdir()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d-[0-9a-f]{6}", folder.name), folder.name
    line = next(line for line in stopped.stderr.splitlines() if "resume with: " in line)
    command = line.split("resume with: ", 1)[1]
    assert f"ckpt_path={folder}/checkpoints/last.ckpt" in command
    # The stop callback would stop the resumed run again at step 2: past it, it never fires.
    resumed = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True,
                             env={**env, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    (second,) = set((tmp_path / "outputs" / "runs").iterdir()) - {folder}
    assert json.loads((second / "metrics.json").read_text())["status"] == "ok"
    import torch

    assert torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3  # stopped after step 2
    assert torch.load(second / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6  # resumed to the end
