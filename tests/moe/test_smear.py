"""SMEAR (router=smear): the layer equals one FFN of the experts' parameters merged with the
router's probabilities, written out here; gradients reach every expert and the router; the
causal LM refuses the per-sequence form and trains the per-token one."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from moelab.models.build import build_model
from moelab.moe import ConfigError, GroupedExperts, LoRAExperts, MoELayer, SmearRouter
from moelab.moe.experts import DenseFFN
from moelab.parallel.fsdp_ep import split_experts
from moelab.run.train import run

from ..conftest import LM_FAST, VIT_FAST, compose_config


def layer(per: str, activation: str, bias: bool = True, experts: int = 4, segment_length: int = 2) -> MoELayer:
    torch.manual_seed(0)
    return MoELayer(16, 32, partial(SmearRouter, per=per, segment_length=segment_length),
                    partial(GroupedExperts, num_experts=experts, activation=activation, bias=bias), {"zloss": 1e-3})


def merge_weights_by_definition(moe: MoELayer, x_BLD: torch.Tensor, per: str, segment_length: int = 2) -> torch.Tensor:
    """p of every token's FFN, (B, L, E), from the gate: on the sequence's mean input, the
    token's own, or the mean of the segment before the token's (even for the first segment)."""
    gate = moe.router.gate.weight
    p_BLE = torch.zeros(*x_BLD.shape[:2], gate.shape[0])
    for b in range(x_BLD.shape[0]):
        for t in range(x_BLD.shape[1]):
            if per == "segment":
                start = (t // segment_length - 1) * segment_length
                p_BLE[b, t] = (torch.full((gate.shape[0],), 1.0 / gate.shape[0]) if start < 0 else
                               torch.softmax(x_BLD[b, start:start + segment_length].mean(0) @ gate.T, dim=-1))
            else:
                source = x_BLD[b].mean(0) if per == "sequence" else x_BLD[b, t]
                p_BLE[b, t] = torch.softmax(source @ gate.T, dim=-1)
    return p_BLE


def merged_ffn_by_definition(moe: MoELayer, x_BLD: torch.Tensor, per: str, segment_length: int = 2) -> torch.Tensor:
    """Every parameter merged as Σ_i p_i θ_i with the token's p (merge_weights_by_definition),
    then the FFN with those parameters, token by token."""
    e = moe.experts
    p_BLE = merge_weights_by_definition(moe, x_BLD, per, segment_length)
    out = torch.zeros_like(x_BLD)
    for b in range(x_BLD.shape[0]):
        for t in range(x_BLD.shape[1]):
            p = p_BLE[b, t]
            merged = {name: torch.einsum("e,e...->...", p, w) for name, w in e.expert_weights().items()}
            h = x_BLD[b, t] @ merged["w1_EDF"] + merged.get("b1_EF", 0)
            if e.activation == "gelu":
                a = F.gelu(h)
            else:
                a = F.silu(h) * (x_BLD[b, t] @ merged["w3_EDF"] + merged.get("b3_EF", 0))
            out[b, t] = a @ merged["w2_EFD"] + merged.get("b2_ED", 0)
    return out


@pytest.mark.parametrize("per", ["sequence", "token", "segment"])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_the_layer_is_the_ffn_of_merged_parameters_and_its_gradients_match(per, activation):
    moe = layer(per, activation)
    x = torch.randn(3, 6 if per == "segment" else 5, 16, requires_grad=True)
    y = moe(x)
    x_ref = x.detach().clone().requires_grad_(True)
    reference = merged_ffn_by_definition(moe, x_ref, per)
    torch.testing.assert_close(y, reference, atol=2e-6, rtol=1e-5)
    weights = torch.randn_like(y)
    grads = torch.autograd.grad((y * weights).sum(), [x, moe.router.gate.weight, *moe.experts.expert_weights().values()])
    expected = torch.autograd.grad((reference * weights).sum(),
                                   [x_ref, moe.router.gate.weight, *moe.experts.expert_weights().values()])
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert grads[1].abs().sum() > 0  # the router learns through the merge
    assert all(bool((g.flatten(1).abs().sum(1) > 0).all()) for g in grads[2:])  # every expert gets a gradient
    # Each expert's soft count: its merge weight summed over the tokens its merged FFNs ran
    # on, which is what the utilisation views and the collapse alarm read.
    plan = moe.last_plan
    soft_counts = merge_weights_by_definition(moe, x_ref.detach(), per).sum((0, 1))
    torch.testing.assert_close(plan.tokens_per_expert_E, soft_counts, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plan.stats()["tokens_per_expert"], soft_counts, atol=1e-5, rtol=1e-5)
    assert moe.aux_losses == {} or set(moe.aux_losses) == {"zloss"}


def test_a_sequence_is_routed_by_its_mean_and_never_by_other_sequences():
    moe = layer("sequence", "swiglu")
    x = torch.randn(2, 6, 16)
    alone = moe(x[1:])
    changed = x.clone()
    changed[0] = torch.randn(6, 16)
    torch.testing.assert_close(moe(changed)[1:], alone)


def test_the_merged_ffn_starts_at_the_dense_ffns_scale():
    torch.manual_seed(0)
    x = torch.randn(64, 8, 64)
    moe = MoELayer(64, 256, SmearRouter, partial(GroupedExperts, num_experts=8, activation="gelu"), match_dense_flops=True)
    dense = DenseFFN(64, 256, "gelu")
    ratio = (moe(x).std() / dense(x).std()).item()
    assert 0.7 < ratio < 1.4, ratio  # without the sqrt(E) gain it would be about 1/8


def test_refusals_are_one_line():
    with pytest.raises(ConfigError, match="router=smear merges the experts' weights, which LoRAExperts cannot"):
        MoELayer(16, 32, SmearRouter, partial(LoRAExperts, num_experts=4))
    with pytest.raises(ConfigError, match="router.per='batch'"):
        SmearRouter(16, 4, per="batch")

    class TwoRanks:
        def size(self) -> int:
            return 2

    with pytest.raises(ConfigError, match="router=smear merges every expert's weights .* run it with ep=1"):
        split_experts(layer("token", "gelu"), TwoRanks())


def test_the_causal_lm_refuses_the_per_sequence_form_and_trains_the_per_token_one(tmp_path):
    with pytest.raises(Exception, match="routes a token depending on other tokens"):
        build_model(compose_config(tmp_path, *LM_FAST, "router=smear"))
    run(compose_config(tmp_path / "lm", *LM_FAST, "router=smear", "router.per=token", "loss=zloss"))
    run(compose_config(tmp_path / "vit", *VIT_FAST, "router=smear", "loss=zloss"))
    import json

    for folder, metric in (("lm", "val/bpb"), ("vit", "val/acc")):
        record = json.loads((tmp_path / folder / "metrics.json").read_text())
        assert record["status"] == "ok" and record[metric] is not None


def test_segment_routing_is_causal_and_costs_one_ffn_a_token():
    """Lory's causal segments: changing tokens after t never changes the logits up to t, in a
    tiny causal LM of segment-routed SMEAR layers (a segment routed on its own mean would
    leak); the cost attributes say one FFN per token, and E for the per-token form."""
    from ..models.test_lm import causal_probe, tiny_lm

    torch.manual_seed(0)
    model = tiny_lm(partial(SmearRouter, per="segment", segment_length=4),
                    partial(GroupedExperts, num_experts=4, activation="swiglu"), moe_every=1)
    for train in (True, False):
        future_leaks, past_matters = causal_probe(model, train=train)
        assert not future_leaks and past_matters
    assert SmearRouter(16, 4, per="segment").expert_passes_per_token == 1
    assert SmearRouter(16, 4, per="token").expert_passes_per_token == 4
    with pytest.raises(ConfigError, match="router.segment_length=5 must divide the sequence length 12"):
        tiny_lm(partial(SmearRouter, per="segment", segment_length=5),
                partial(GroupedExperts, num_experts=4, activation="swiglu"), moe_every=1)(torch.zeros(1, 12, dtype=torch.long))
