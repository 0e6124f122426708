"""ckpt_path checks: every file that cannot be resumed is refused in one line naming why,
with weights_only loading (no advice to unpickle in full), and checkpoints of another
architecture name the differing settings."""

from __future__ import annotations

import os

import pytest
import torch

from moelab.moe import ConfigError
from moelab.run.build import build
from moelab.run.checkpoints import check_resumable, config_differences, shape_differences
from moelab.run.train import run
from moelab.tasks.checkpoint_io import inspect_checkpoint

from ..conftest import compose_config
from ..run.test_train import FAST


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 8-expert MLP run: (its last.ckpt, its folder)."""
    folder = tmp_path_factory.mktemp("trained")
    run(compose_config(folder, *FAST))
    return folder / "checkpoints" / "last.ckpt"


class NotATensor:
    def __reduce__(self):
        return (os.getcwd, ())  # what a malicious pickle would run on load


def refusal(tmp_path, ckpt_path, *overrides: str) -> str:
    with pytest.raises(SystemExit) as stop:
        run(compose_config(tmp_path, *FAST, f"ckpt_path={ckpt_path}", *overrides))
    message = str(stop.value)
    assert message.startswith("moelab: error: ckpt_path=") and "\n" not in message
    assert "weights_only=False" not in message and "weights_only` set to `False" not in message
    return message


def test_unreadable_checkpoints_are_refused_in_one_line(tmp_path):
    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "garbage.ckpt").write_bytes(os.urandom(512))
    (tmp_path / "folder").mkdir()
    torch.save({"state_dict": {}, "payload": NotATensor()}, tmp_path / "unsafe.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "weights.ckpt")
    cases = {
        "empty.ckpt": "is empty",
        "garbage.ckpt": "is not a PyTorch checkpoint",
        "folder": "is a folder but not a sharded checkpoint",
        "missing.ckpt": "does not exist",
        "unsafe.ckpt": "holds a pickled posix.getcwd, and moelab loads only tensors and plain values",
    }
    for name, why in cases.items():
        assert why in refusal(tmp_path / name.replace(".", "_"), tmp_path / name), name


def test_architecture_mismatches_name_the_differing_settings(tmp_path, trained):
    assert "(checkpoint has 8 experts per layer, config has experts=16)" in refusal(tmp_path / "a", trained, "experts=16")
    assert "(expert.activation: checkpoint gelu, config swiglu)" in refusal(tmp_path / "b", trained, "expert=swiglu")


def test_architecture_mismatch_under_fsdp_ep_is_refused_on_every_rank(tmp_path, trained):
    from ..run.test_train import train_cli

    result = train_cli(tmp_path / "run", *FAST, "trainer=fsdp_ep", "ep=2", "trainer.devices=2", "trainer.accelerator=cpu",
                       "experts=16", f"ckpt_path={trained}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith(
        "was trained with another architecture (checkpoint has 8 experts per layer, config has experts=16): "
        "resume with the config of the run that wrote it (its .hydra/config.yaml), or train anew without ckpt_path"
    )


def test_a_checkpoint_without_optimizer_state_cannot_resume(tmp_path, trained):
    state = torch.load(trained, weights_only=True)
    torch.save({"state_dict": state["state_dict"]}, tmp_path / "weights.ckpt")
    assert "holds weights but no optimizer and loop state" in refusal(tmp_path / "run", tmp_path / "weights.ckpt")


def test_the_checkpoint_carries_the_run_config_and_loads_weights_only(trained):
    info = inspect_checkpoint(str(trained))
    assert info.config["experts"] == 8 and info.config["expert"]["activation"] == "gelu"
    assert not info.sharded and info.resumable
    assert info.shapes["model.vit.blocks.1.mlp.experts.w1_EDF"] == (8, 64, 64)  # top-2 experts of 128/2 units


def test_a_matching_checkpoint_passes(tmp_path, trained):
    _, task, _ = build(compose_config(tmp_path, *FAST))
    check_resumable(str(trained), task, sharded_strategy=False)
    with pytest.raises(ConfigError, match="is not a sharded checkpoint|holds no model state"):
        torch.save({"no": "state"}, tmp_path / "plain.ckpt")
        check_resumable(str(tmp_path / "plain.ckpt"), task, sharded_strategy=False)


def test_shape_and_config_differences_read_well():
    saved = {"experts.w1": (8, 4, 16), "norm": (4,), "old": (2,)}
    model = {"experts.w1": (16, 4, 16), "norm": (4,), "new": (3,)}
    notes = shape_differences(saved, model)
    assert notes[0] == "checkpoint has 8 experts per layer, config has experts=16"
    assert any("not in the checkpoint, e.g. new" in n for n in notes)
    assert any("not in the model, e.g. old" in n for n in notes)
    assert config_differences({"experts": 8, "model": {"depth": 4}}, {"experts": 8, "model": {"depth": 6}}) == [
        "model.depth: checkpoint 4, config 6"
    ]
