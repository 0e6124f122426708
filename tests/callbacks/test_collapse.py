"""ExpertCollapseAlarm on a forced collapse: a router built to send every token to expert 0."""

from __future__ import annotations

import pytest
import torch

from moelab.callbacks.collapse import ExpertCollapseAlarm
from moelab.callbacks.tags import DEAD_EXPERTS, layer_scalar_tag
from moelab.moe import ConfigError, moe_layers
from moelab.run.build import build

from ..conftest import compose_config
from .events import load_events


def force_collapse_onto_expert_0(vit) -> None:
    """The MoE input is LayerNorm(h) + bias; LayerNorm output sums to 0 over features, so a
    constant added to gate row 0 only acts through the bias: with bias 1 everywhere every
    token's logit for expert 0 rises by 5·D, far beyond the others."""
    with torch.no_grad():
        for block in vit.vit.blocks:
            if block.mlp in moe_layers(vit):
                block.norm2.bias.fill_(1.0)
                block.mlp.router.gate.weight[0] += 5.0


def test_forced_collapse_raises_the_alarm_logs_the_flag_and_stops(tmp_path):
    cfg = compose_config(
        tmp_path, "debug=default", "data.batch_size=16", "loss=none", "router.k=1", "router.normalize=false",
        "callbacks.progress=null", "callbacks.collapse_alarm.patience=2", "callbacks.collapse_alarm.stop_on_collapse=true",
    )
    datamodule, task, trainer = build(cfg)
    force_collapse_onto_expert_0(task.model)
    with pytest.warns(UserWarning, match=r"dead experts at step 2: layer 1 experts \[1, 2, 3, 4, 5, 6, 7\]"):
        trainer.fit(task, datamodule=datamodule)

    alarm = next(cb for cb in trainer.callbacks if isinstance(cb, ExpertCollapseAlarm))
    assert alarm.stopped and trainer.global_step == 2  # stopped after 2 of 4 steps
    assert alarm.dead_experts == {1: [1, 2, 3, 4, 5, 6, 7], 3: [1, 2, 3, 4, 5, 6, 7]}
    events = load_events(tmp_path / "tensorboard")
    for layer in (1, 3):
        assert [(e.step, e.value) for e in events.Scalars(layer_scalar_tag(layer, DEAD_EXPERTS))] == [(1, 0.0), (2, 7.0)]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"patience": 0}, "patience=0 must be >= 1"),
        ({"min_fair_share": 0.0}, "min_fair_share=0.0 must be in"),
        ({"every_n_steps": -1}, "every_n_steps=-1 must be >= 1"),
    ],
)
def test_bad_alarm_settings_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ExpertCollapseAlarm(**kwargs)


def test_alarm_state_survives_a_checkpoint_and_ignores_non_finite_steps(tmp_path):
    cfg = compose_config(tmp_path, "debug=default", "data.batch_size=16", "callbacks.progress=null")
    _, task, trainer = build(cfg)
    alarm = ExpertCollapseAlarm(patience=3)
    alarm._streak = {1: torch.tensor([0, 2, 1])}
    alarm._warned = {1: torch.tensor([False, True, False])}
    restored = ExpertCollapseAlarm(patience=3)
    restored.load_state_dict(alarm.state_dict())
    assert torch.equal(restored._streak[1], alarm._streak[1]) and torch.equal(restored._warned[1], alarm._warned[1])

    # A forward whose router logits are NaN: the layer is skipped, its streaks do not move.
    layer = next(m for m in moe_layers(task.model) if m.layer_index == 1)
    with torch.no_grad():
        layer.router.gate.weight.fill_(float("nan"))
        task.model(torch.randn(4, 1, 8, 8))
    trainer.fit_loop.epoch_loop.automatic_optimization.optim_progress.optimizer.step.total.completed = 10
    restored.on_train_batch_end(trainer, task, None, None, 0)
    assert torch.equal(restored._streak[1], torch.tensor([0, 2, 1]))


def test_alarm_reads_the_plan_of_every_router_kind():
    from functools import partial
    from types import SimpleNamespace

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from moelab.moe import GroupedExperts, MoELayer

    from ..conftest import CONF

    trainer = SimpleNamespace(global_step=1, log_every_n_steps=1, is_global_zero=True, loggers=[], world_size=1)
    for path in sorted((CONF / "router").glob("*.yaml")):
        layer = MoELayer(16, 32, instantiate(OmegaConf.load(path)), partial(GroupedExperts, num_experts=4), layer_index=0,
                         router_facts={"vocab_size": 100})
        layer(torch.randn(2, 8, 16), token_ids=torch.randint(0, 100, (2, 8)))
        alarm = ExpertCollapseAlarm(patience=1)
        alarm.on_train_batch_end(trainer, torch.nn.Sequential(layer), None, None, 0)
        assert 0 in alarm._streak, path.stem
