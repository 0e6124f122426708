"""Checkpoints describe themselves: `moelab.load(path)` gives the trained model and
`<Task>.load_from_checkpoint(path)` needs no other argument."""

from __future__ import annotations

import pytest
import torch

import moelab
from moelab.moe.errors import ConfigError
from moelab.tasks.language import LanguageModeling
from moelab.tasks.vision import ImageClassification



@pytest.mark.parametrize("kind", ["vit", "lm"])
def test_a_checkpoint_loads_as_a_model_and_as_its_task(request, kind):
    path = request.getfixturevalue(f"trained_{kind}") / "checkpoints" / "last.ckpt"
    model = moelab.load(path)
    task = (ImageClassification if kind == "vit" else LanguageModeling).load_from_checkpoint(path)
    assert not model.training
    inputs = torch.randn(4, 1, 8, 8) if kind == "vit" else torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(task.eval()(inputs), model(inputs))
    saved = torch.load(path, weights_only=True)["state_dict"]
    assert all(torch.equal(value, saved[f"model.{name}"]) for name, value in model.state_dict().items())


def test_a_sharded_folder_is_refused_by_the_task_loader_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="is a sharded checkpoint folder: read its model with moelab.load"):
        ImageClassification.load_from_checkpoint(tmp_path)
