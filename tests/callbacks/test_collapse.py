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
        "task.warmup_steps=0",
    )
    datamodule, task, trainer = build(cfg)
    force_collapse_onto_expert_0(task.model)
    # No balance loss in this run: the advice is to add one.
    with pytest.warns(UserWarning, match=r"dead experts at step 2: layer 1 experts \[1, 2, 3, 4, 5, 6, 7\].*"
                                         r"consider a balance loss \(loss=balance_zloss\)"):
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
    """For every router, the experts the alarm finds low (patience 1) are those under 10 % of
    the fair share by tokens per expert counted by hand (test_utilisation); and a SMEAR layer
    whose merge puts all weight on expert 0 has experts 1-3 dead: SMEAR's soft counts are the
    merge weights summed over tokens, so its alarm can fire."""
    from types import SimpleNamespace

    from ..conftest import CONF
    from .test_utilisation import every_router_layer, tokens_per_expert_by_hand

    trainer = SimpleNamespace(global_step=1, log_every_n_steps=1, is_global_zero=True, loggers=[], world_size=1)
    for path in sorted((CONF / "router").glob("*.yaml")):
        layer = every_router_layer(path)
        alarm = ExpertCollapseAlarm(patience=1)
        alarm.on_train_batch_end(trainer, torch.nn.Sequential(layer), None, None, 0)
        counts = tokens_per_expert_by_hand(layer.last_plan)
        low = [e for e, c in enumerate(counts) if c / sum(counts) < 0.1 / len(counts)]
        assert alarm._streak[0].tolist() == [int(e in low) for e in range(len(counts))], path.stem
        assert alarm.dead_experts[0] == low, path.stem

    smear = every_router_layer(CONF / "router" / "smear.yaml")
    with torch.no_grad():
        smear.router.gate.weight.zero_()
        smear.router.gate.weight[0] = 10.0
        smear(torch.rand(2, 8, 16) + 0.5)  # positive inputs: expert 0's logit is far above the others'
    alarm = ExpertCollapseAlarm(patience=1)
    with pytest.warns(UserWarning, match=r"dead experts at step 1: layer 0 experts \[1, 2, 3\]"):
        alarm.on_train_batch_end(trainer, torch.nn.Sequential(smear), None, None, 0)
    assert alarm.dead_experts[0] == [1, 2, 3]


def test_the_alarm_waits_for_the_warm_up_and_advises_a_stronger_balance_loss_when_there_is_one(tmp_path):
    """Within the learning-rate warm-up nothing counts (routing moves fastest there); after
    it, a run that has a balance loss is told to raise it, naming its weight."""
    cfg = compose_config(
        tmp_path, "debug=default", "data.batch_size=16", "loss=balance", "loss.balance=0.01", "router.k=1",
        "router.normalize=false", "callbacks.progress=null", "callbacks.collapse_alarm.patience=1",
        "task.warmup_steps=2",
    )
    datamodule, task, trainer = build(cfg)
    force_collapse_onto_expert_0(task.model)
    with pytest.warns(UserWarning, match=r"dead experts at step 2: .*loss.balance=0.01 now, e.g. 0.1"):
        trainer.fit(task, datamodule=datamodule)
    events = load_events(tmp_path / "tensorboard")
    assert [e.step for e in events.Scalars(layer_scalar_tag(1, DEAD_EXPERTS))] == [2, 3, 4]  # none at step 1, in the warm-up
