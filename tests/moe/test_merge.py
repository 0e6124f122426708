"""Expert merging: weighted averages of expert stacks and router rows, MC-SMoE's grouping and
binding, and scripts/merge_experts.py end to end."""

from __future__ import annotations

import functools
import runpy
import sys

import pytest
import torch
from omegaconf import OmegaConf

from moelab.models.build import build_model
from moelab.moe import ConfigError, CosineRouter, GroupedExperts, HashRouter, MoELayer, TopKRouter
from moelab.moe.lifecycle.merge import expert_groups, mc_smoe_groups, merged_layer_state
from moelab.run.checkpoints import load_model_weights
from moelab.tasks.checkpoint_io import CONFIG_KEY

from ..conftest import ROOT


def layer(router=None, experts: int = 8, **expert_options) -> MoELayer:
    torch.manual_seed(0)
    router = router or functools.partial(TopKRouter, k=2)
    return MoELayer(16, 32, router, functools.partial(GroupedExperts, num_experts=experts, activation="swiglu",
                                                      **expert_options))


def test_merged_stacks_and_router_rows_are_the_weighted_means():
    moe = layer(bias=True)
    groups = [[0, 3, 5], [1, 2], [4, 6, 7]]
    weights = torch.arange(1.0, 9.0)
    state = merged_layer_state(moe, groups, weights)
    for key, stack in [("experts.w1_EDF", moe.experts.w1_EDF), ("experts.b2_ED", moe.experts.b2_ED),
                       ("router.gate.weight", moe.router.gate.weight)]:
        for g, members in enumerate(groups):
            w = weights[members]
            expected = sum(w_i * stack[e] for w_i, e in zip(w, members)) / w.sum()
            torch.testing.assert_close(state[key][g], expected.detach(), msg=key)
    merged = MoELayer(16, 32, functools.partial(TopKRouter, k=2),
                      functools.partial(GroupedExperts, num_experts=3, activation="swiglu", bias=True))
    merged.load_state_dict(state)  # the shapes of a 3-expert layer


def test_merging_identical_experts_changes_nothing():
    """Experts that are copies of each other merge into the same expert: with weights that
    sum to 1 the layer computes what it did (whatever the new routing)."""
    moe = layer()
    with torch.no_grad():
        for stack in moe.experts.expert_weights().values():
            stack.copy_(stack[:1].expand_as(stack))
    x = torch.randn(2, 5, 16)
    before = moe(x)
    groups = expert_groups(moe, 2, "neighbour-usage", torch.ones(8))
    merged = layer(experts=2)
    merged.load_state_dict(merged_layer_state(moe, groups, torch.ones(8)))
    torch.testing.assert_close(merged(x), before, atol=1e-6, rtol=1e-5)


def test_similarity_groups_the_closest_experts():
    moe = layer()
    pairs = [(0, 5), (1, 4), (2, 7), (3, 6)]
    with torch.no_grad():
        for a, b in pairs:
            for stack in moe.experts.expert_weights().values():
                stack[b] = stack[a] + 1e-3 * torch.randn_like(stack[a])
    groups = expert_groups(moe, 4, "weight-similarity", torch.ones(8))
    assert sorted(map(tuple, groups)) == sorted(pairs)
    assert expert_groups(moe, 2, "neighbour-usage", torch.ones(8)) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_hash_maps_follow_their_experts_and_bad_targets_are_refused():
    moe = layer(router=functools.partial(HashRouter, key="position", num_keys=16))
    groups = [[0, 1], [2, 3], [4, 5], [6, 7]]
    state = merged_layer_state(moe, groups, torch.ones(8))
    torch.testing.assert_close(state["router.expert_of_key"], moe.router.expert_of_key // 2)
    with pytest.raises(ConfigError, match="must divide 8"):
        expert_groups(moe, 3, "neighbour-usage", torch.ones(8))
    with pytest.raises(ConfigError, match="between 1 and the 8 experts"):
        expert_groups(moe, 9, "neighbour-mean", torch.ones(8))


def run_merge_script(monkeypatch, *args: str) -> None:
    """scripts/merge_experts.py's entry point, in this process (what `python scripts/merge_experts.py` runs)."""
    monkeypatch.setattr(sys, "argv", ["merge_experts.py", *args])
    with pytest.raises(SystemExit) as ended:
        runpy.run_path(str(ROOT / "scripts" / "merge_experts.py"), run_name="__main__")
    if ended.value.code not in (0, None):
        raise ended.value


def test_merge_script_reports_and_writes_loadable_checkpoints(tmp_path, monkeypatch, capsys, trained_vit):
    ckpt = trained_vit / "checkpoints" / "last.ckpt"
    run_merge_script(monkeypatch, str(ckpt), "--to", "4", "1", "--method", "neighbour-usage", "mc-smoe",
                     "--out", str(tmp_path / "merged"))
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "method" not in line]
    assert [r.split(" | ")[:2] for r in rows] == [["| original", "8"], ["| neighbour-usage", "4"],
                                                   ["| neighbour-usage", "1"], ["| mc-smoe", "4"], ["| mc-smoe", "1"]]
    # MC-SMoE keeps the router: its checkpoint has the 8 slots, holding 4 distinct experts.
    for name, experts in (("merged_neighbour-usage_E4.ckpt", 4), ("merged_neighbour-usage_E1.ckpt", 1),
                          ("merged_mc-smoe_E4.ckpt", 8)):
        path = tmp_path / "merged" / name
        cfg = OmegaConf.create(torch.load(path, weights_only=True)[CONFIG_KEY])
        model = build_model(cfg)
        model.load_state_dict(load_model_weights(str(path)))  # strict: the shapes of `experts` per layer
        assert cfg.experts == experts
    # A refusal, in this process (the script's own entry point): one line, no traceback.
    with pytest.raises(SystemExit) as refused:
        run_merge_script(monkeypatch, str(ckpt), "--to", "3", "--method", "neighbour-usage")
    assert str(refused.value).startswith("moelab: error: --method neighbour-usage merges neighbouring experts")


def test_mc_smoe_groups_around_the_most_used_experts_by_router_logits():
    """A hand-built case: experts 5 and 2 are the most used; experts 0 and 3 have logit columns
    (over four calibration tokens) close to 5's, 1 and 4 close to 2's, whatever their weights."""
    usage = torch.tensor([1.0, 2.0, 9.0, 1.0, 0.0, 10.0])
    lead5 = torch.tensor([3.0, -1.0, 2.0, 0.0])
    lead2 = torch.tensor([-2.0, 4.0, 0.0, 1.0])
    columns = {5: lead5, 0: 2 * lead5 + 0.1, 3: lead5 - 0.2 * lead2, 2: lead2, 1: lead2 + 0.3 * lead5, 4: 0.5 * lead2}
    logits_TE = torch.stack([columns[e] for e in range(6)], dim=1)
    assert mc_smoe_groups(usage, logits_TE, 2) == [[0, 3, 5], [1, 2, 4]]  # leaders in order of usage
    assert mc_smoe_groups(usage, logits_TE, 1) == [[0, 1, 2, 3, 4, 5]]
    assert mc_smoe_groups(usage, logits_TE, 6) == [[e] for e in (5, 2, 1, 0, 3, 4)]


def test_mc_smoe_keeps_the_router_and_binds_members_to_the_merged_weights():
    moe = layer()
    x = torch.randn(2, 5, 16)
    moe(x)
    usage = moe.last_plan.tokens_per_expert_E.double() + 1
    groups = expert_groups(moe, 3, "mc-smoe", usage, moe.last_plan.router_logits_TE)
    state = merged_layer_state(moe, groups, usage, bind=True)
    torch.testing.assert_close(state["router.gate.weight"], moe.router.gate.weight.detach())  # the router kept
    for members in groups:
        w = usage[members] / usage[members].sum()
        expected = sum(w_i.float() * moe.experts.w1_EDF[e] for w_i, e in zip(w, members)).detach()
        for e in members:
            torch.testing.assert_close(state["experts.w1_EDF"][e], expected)
    bound = layer()
    bound.load_state_dict(state)  # E slots: the shapes of the original layer
    # Each token keeps its experts and their weights (the router is the one it had).
    plan_before = moe.last_plan
    bound(x)
    torch.testing.assert_close(bound.last_plan.selected_experts_TK, plan_before.selected_experts_TK)
    torch.testing.assert_close(bound.last_plan.gates_TK, plan_before.gates_TK)

def test_cosine_router_merges_its_expert_embeddings_not_its_projection():
    """With as many experts as projection dims, the projection (dim × d_model) has a dimension
    of E too: only the expert embeddings are per expert."""
    moe = layer(router=functools.partial(CosineRouter, k=2, dim=8))
    groups = [[0, 1], [2, 3], [4, 5], [6, 7]]
    state = merged_layer_state(moe, groups, torch.ones(8))
    torch.testing.assert_close(state["router.project.weight"], moe.router.project.weight.detach())
    embeddings = moe.router.expert_embeddings.detach()
    torch.testing.assert_close(state["router.expert_embeddings"], embeddings.view(4, 2, -1).mean(1))
    merged = MoELayer(16, 32, functools.partial(CosineRouter, k=2, dim=8),
                      functools.partial(GroupedExperts, num_experts=4, activation="swiglu"))
    merged.load_state_dict(state)
