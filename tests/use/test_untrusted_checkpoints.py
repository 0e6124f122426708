"""Files are data, never code: a checkpoint whose stored config names a foreign `_target_`
(`pathlib.Path.touch` of a marker file, which Hydra's `instantiate` would call) at the top
level, nested in the model, as the router or among the callbacks, goes through every entry
point that reads a checkpoint, and the marker never appears. The entry points that build
from the stored config refuse it in one line naming the key and the target; those that only
read its weights (`ckpt_path=` to resume, `init_from=`) never build from it."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import moelab
from moelab.models.targets import check_targets, foreign_targets
from moelab.moe.errors import ConfigError
from moelab.run.train import run
from moelab.tasks.checkpoint_io import CONFIG_KEY
from moelab.tasks.vision import ImageClassification
from moelab.use.evaluate import evaluate
from moelab.use.export_hf import export
from moelab.use.generate import main_generate
from moelab.use.predict import main_predict

from ..conftest import CONF, VIT_FAST, compose_config, one_line_error
from ..moe.test_merge import run_merge_script

TOUCH = "pathlib.Path.touch"


def place(config: dict, where: str, marker: Path) -> dict:
    evil = {"_target_": TOUCH, "_args_": [str(marker)]}
    config = copy.deepcopy(config)
    if where == "top":
        config.update(evil)
    elif where == "model":
        config["model"]["extra"] = evil
    elif where == "router":
        config["router"] = {**evil, "_partial_": True}
    else:
        config["callbacks"]["evil"] = evil
    return config


def poisoned(trained: Path, tmp_path: Path, where: str) -> tuple[Path, Path]:
    """A copy of the run's last.ckpt whose stored config touches a marker when instantiated."""
    marker = tmp_path / f"touched_{where}"
    checkpoint = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint[CONFIG_KEY] = place(checkpoint[CONFIG_KEY], where, marker)
    path = tmp_path / f"evil_{where}.ckpt"
    torch.save(checkpoint, path)
    return path, marker


PLACES = ["top", "model", "router", "callbacks"]


@pytest.mark.parametrize("where", PLACES)
def test_moelab_load_refuses_a_foreign_target_anywhere_in_one_line(tmp_path, trained_vit, where):
    path, marker = poisoned(trained_vit, tmp_path, where)
    with pytest.raises(ConfigError) as refused:
        moelab.load(path)
    message = str(refused.value)
    key = {"top": "_target_", "model": "model.extra._target_", "router": "router._target_",
           "callbacks": "callbacks.evil._target_"}[where]
    assert "\n" not in message and f"{key}={TOUCH}" in message and f"checkpoint={path}" in message
    assert not marker.exists()


ENTRY_POINTS = ["load_from_checkpoint", "teacher", "eval", "predict", "generate", "merge", "export", "ckpt_path", "init_from"]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_no_entry_point_runs_a_stored_target(tmp_path, trained_vit, monkeypatch, entry):
    where = PLACES[ENTRY_POINTS.index(entry) % len(PLACES)]
    path, marker = poisoned(trained_vit, tmp_path, where)
    refused = "its stored config has"
    if entry == "load_from_checkpoint":
        with pytest.raises(ConfigError, match=refused):
            ImageClassification.load_from_checkpoint(path)
    elif entry == "teacher":
        assert refused in one_line_error(compose_config(tmp_path / "run", *VIT_FAST, f"teacher={path}"))
    elif entry == "eval":
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name="eval", overrides=[f"ckpt_path={path}", f"paths.output_dir={tmp_path / 'eval'}"])
            with pytest.raises(ConfigError, match=refused):
                evaluate(cfg)
    elif entry == "predict":
        with pytest.raises(ConfigError, match=refused):
            main_predict({"ckpt_path": str(path), "images": str(tmp_path)})
    elif entry == "generate":
        with pytest.raises(ConfigError, match=refused):
            main_generate({"ckpt_path": str(path), "max_new_tokens": 1, "temperature": 0.0}, "def ")
    elif entry == "merge":
        with pytest.raises(SystemExit) as ended:
            run_merge_script(monkeypatch, str(path), "--to", "2")
        assert refused in str(ended.value.code)  # sys.exit(<the line>): printed, exit status 1
    elif entry == "export":
        with pytest.raises(ConfigError, match=refused):
            export(str(path), tmp_path / "hf")
    else:  # resuming and starting from the weights read only the weights: they train
        key = "ckpt_path" if entry == "ckpt_path" else "init_from"
        run(compose_config(tmp_path / "run", *VIT_FAST, f"{key}={path}"))
    assert not marker.exists()


def test_foreign_targets_are_found_at_every_depth_and_trusted_ones_pass(monkeypatch):
    config = {"model": {"_target_": "moelab.models.vit.MoEViT", "parts": [{"x": {"_target_": "os.system"}}]},
              "router": {"_target_": "moelab.moe.routers.TopKRouter", "_partial_": True,
                         "_args_": [{"_target_": "builtins.eval", "_args_": ["1"]}]}}
    assert foreign_targets(config) == [("model.parts[0].x._target_", "os.system"),
                                       ("router._args_[0]._target_", "builtins.eval")]
    monkeypatch.setenv("MOELAB_TRUSTED_TARGETS", "os.system, builtins.eval")
    check_targets(config, "test")  # trusted by the user: passes
    monkeypatch.delenv("MOELAB_TRUSTED_TARGETS")
    with pytest.raises(ConfigError, match=r"model.parts\[0\].x._target_=os.system \(and 1 more\)"):
        check_targets(config, "test")
    assert sys.modules.get("moelab.moe") is not None  # the check itself imports nothing it names


def test_every_target_the_configs_name_is_trusted_in_a_stored_config():
    """A run's stored config holds the targets of conf/ (not Hydra's own settings): each one a
    config can name must pass the allow-list, or the run's own checkpoints would be refused."""
    import re

    from moelab.models.targets import ALLOWED_TARGETS

    from ..conftest import ROOT

    named = set()
    for path in (ROOT / "conf").rglob("*.yaml"):
        if path.parent.name in ("hydra", "hparams_search"):
            continue  # Hydra's settings (sweepers, callbacks): never part of a run's config
        named |= set(re.findall(r"_target_:\s*([\w.]+)", path.read_text()))
    assert named and not named - ALLOWED_TARGETS, sorted(named - ALLOWED_TARGETS)
