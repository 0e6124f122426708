"""Fine-tuning recipes: named parameter groups, frozen weights that get no gradient and stay
bit-identical through training, and the auxiliary-loss scale."""

from __future__ import annotations

import pytest
import torch

from moelab.moe.routed import moe_layers
from moelab.tasks.finetune import parameter_groups
from moelab.run.build import build

from ..conftest import LM_FAST, VIT_FAST, compose_config, one_line_error



def test_groups_cover_what_their_names_say(tmp_path):
    _, lm_task, _ = build(compose_config(tmp_path / "lm", *LM_FAST))
    groups = parameter_groups(lm_task.model)
    names = {n for n, _ in lm_task.model.named_parameters()}
    assert groups["experts"] == {n for n in names if ".ffn.experts." in n}  # block 1 is the MoE block
    assert groups["router"] == {n for n in names if ".ffn.router." in n}
    assert groups["attention"] == {n for n in names if ".attn." in n} != set()
    assert groups["embeddings"] == {"embed.weight"}  # the head is tied to it
    assert groups["non_expert"] == names - groups["experts"]
    _, vit_task, _ = build(compose_config(tmp_path / "vit", *VIT_FAST))
    vit_groups = parameter_groups(vit_task.model)
    assert {"vit.pos_embed", "vit.patch_embed.proj.weight"} <= vit_groups["embeddings"]
    assert vit_groups["experts"] and all(".mlp.experts." in n for n in vit_groups["experts"])


@pytest.mark.parametrize("frozen", [["non_expert"], ["experts", "router"], ["attention", "embeddings"]])
def test_frozen_parameters_get_no_gradient_and_stay_bit_identical(tmp_path, frozen):
    cfg = compose_config(tmp_path, *LM_FAST, f"task.freeze=[{','.join(frozen)}]")
    datamodule, task, trainer = build(cfg)
    groups = parameter_groups(task.model)
    frozen_names = set().union(*(groups[g] for g in frozen))
    before = {n: p.detach().clone() for n, p in task.model.named_parameters()}
    trainer.fit(task, datamodule=datamodule)
    changed = 0
    for name, param in task.model.named_parameters():
        if name in frozen_names:
            assert not param.requires_grad and param.grad is None, name
            assert torch.equal(param, before[name]), name
        else:
            changed += not torch.equal(param, before[name])
    assert changed > 0  # the rest trained


def test_aux_loss_scale_multiplies_the_auxiliary_losses(tmp_path):
    _, task, _ = build(compose_config(tmp_path, *LM_FAST, "task.aux_loss_scale=0.25"))
    task.model.train()
    task.model(torch.randint(0, 256, (2, 16)))
    layers = moe_layers(task.model)
    aux = sum(layer.aux_loss for layer in layers)
    task_loss = torch.tensor(3.0)
    task.log_dict = lambda *args, **kwargs: None  # outside a Trainer
    torch.testing.assert_close(task.add_aux_losses(task_loss), task_loss + 0.25 * aux)


@pytest.mark.parametrize("override, message", [
    ("task.freeze=[ffn]", "task.freeze=['ffn']: unknown group 'ffn', pick from experts, router"),
    ("task.freeze=[experts,non_expert]", "freezes every parameter: nothing would train"),
    ("task.aux_loss_scale=-1", "task.aux_loss_scale=-1 must be a number >= 0"),
])
def test_fine_tuning_mistakes_are_one_line(tmp_path, override, message):
    assert message in one_line_error(compose_config(tmp_path, *LM_FAST, override))
