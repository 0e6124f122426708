"""Fidelity to the papers where moelab once deviated: hash maps over the real keys, the
DeepSeekMoE active-expert count, one expert-width convention, initialisation that matches
the dense twin, V-MoE's batch priority, X-MoE without z-loss and Sinkhorn under extreme
logits. Each check is written out independently of the code it tests."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from moelab.models.build import build_model as model_of
from moelab.moe import (
    ConfigError,
    CosineRouter,
    ExpertChoiceRouter,
    GroupedExperts,
    GShardRouter,
    HashRouter,
    MoELayer,
    SinkhornRouter,
    TopKRouter,
    moe_layers,
)
from moelab.moe.experts import DenseFFN
from moelab.moe.routed import active_parameters

from ..conftest import compose_config


def build(tmp_path, *overrides: str):
    cfg = compose_config(tmp_path, *overrides)
    if cfg.model._target_.endswith("MoELM"):
        cfg.model.vocab_size = 256
    return model_of(cfg)


def unit_rms_tokens(num_tokens: int, d_model: int) -> torch.Tensor:
    """Tokens as a normalised residual stream delivers them: zero mean, unit RMS."""
    return F.layer_norm(torch.randn(num_tokens, d_model), (d_model,))


def rms(x: torch.Tensor) -> float:
    return x.float().pow(2).mean().sqrt().item()


# 1. Hash routing --------------------------------------------------------------------------

def test_default_vit_hashes_positions_with_a_balanced_map_per_layer(tmp_path):
    model = build(tmp_path, "router=hash")
    layers = moe_layers(model)
    positions = model.num_patches
    images = torch.randn(3, 1, 8, 8)
    maps = []
    for layer in layers:
        assert layer.router.key == "position" and layer.router.num_keys == positions
        keys_per_expert = torch.bincount(layer.router.expert_of_key, minlength=layer.num_experts)
        fair = {positions // layer.num_experts, -(-positions // layer.num_experts)}
        assert set(keys_per_expert.tolist()) <= fair, keys_per_expert
        maps.append(layer.router.expert_of_key.clone())
    model(images)
    for layer in layers:  # every expert gets tokens: no idle expert
        assert (layer.last_plan.tokens_per_expert_E == 3 * positions // layer.num_experts).all()
    assert not torch.equal(maps[0], maps[1]), "both MoE layers hash positions to the same experts"


def test_lm_hashes_token_ids_over_its_vocabulary(tmp_path):
    model = build(tmp_path, "model=lm", "data=pystdlib", "router=hash", "model.d_model=32", "model.ffn_hidden=64")
    for layer in moe_layers(model):
        assert (layer.router.key, layer.router.num_keys) == ("token_id", 256)
        assert torch.bincount(layer.router.expert_of_key, minlength=8).tolist() == [32] * 8


def test_frequency_balanced_map_evens_out_a_zipf_load():
    counts = (1e6 / torch.arange(1, 1001).double()).round()  # Zipf over 1000 token ids
    uniform = HashRouter(d_model=8, num_experts=8, key="token_id", num_keys=1000, layer_index=1)
    balanced = HashRouter(d_model=8, num_experts=8, key="token_id", num_keys=1000, balance="frequency", layer_index=1)
    balanced.fit_key_frequencies(counts)

    def loads(router):
        return torch.zeros(8, dtype=torch.float64).index_add(0, router.expert_of_key, counts)

    # Independent statement of the greedy's guarantee: loads differ by at most the largest key.
    balanced_loads = loads(balanced)
    assert balanced_loads.max() - balanced_loads.min() <= counts.max()
    assert balanced_loads.max() / balanced_loads.mean() < loads(uniform).max() / loads(uniform).mean()
    other_layer = HashRouter(d_model=8, num_experts=8, key="token_id", num_keys=1000, balance="frequency", layer_index=2)
    other_layer.fit_key_frequencies(counts)
    assert not torch.equal(other_layer.expert_of_key, balanced.expert_of_key)


def test_unseen_token_ids_spread_over_the_experts():
    counts = torch.zeros(256)
    counts[:50] = torch.arange(50, 0, -1).double()  # 50 seen ids, 206 never seen
    router = HashRouter(d_model=8, num_experts=8, key="token_id", num_keys=256, balance="frequency")
    router.fit_key_frequencies(counts)
    unseen_per_expert = torch.bincount(router.expert_of_key[50:], minlength=8)
    keys_per_expert = torch.bincount(router.expert_of_key, minlength=8)
    assert unseen_per_expert.min() > 0 and keys_per_expert.max() - keys_per_expert.min() <= 1


def test_layer_seeds_do_not_collide_across_run_seeds():
    def table(seed, layer):
        return HashRouter(d_model=8, num_experts=4, key="position", num_keys=64, seed=seed, layer_index=layer).expert_of_key

    assert not torch.equal(table(2, 1), table(0, 3))
    assert torch.equal(table(2, 1), table(2, 1))


def test_hash_without_model_facts_says_what_to_set():
    with pytest.raises(ConfigError, match="router.key=auto cannot tell what to hash") as info:
        MoELayer(16, 32, HashRouter, partial(GroupedExperts, num_experts=4))
    assert "\n" not in str(info.value)


# 2-3. Active compute ------------------------------------------------------------------------

def active_expert_units(layer: MoELayer) -> float:
    """FFN hidden units one token passes through: routed fine experts plus shared ones."""
    return (layer.router.experts_per_token + layer.num_shared) * layer.experts.hidden


@pytest.mark.parametrize("k", [1, 2, 4])
def test_vit_and_lm_experts_match_the_dense_ffn_for_every_k(tmp_path, k):
    normalize = f"router.normalize={str(k > 1).lower()}"
    vit = build(tmp_path, f"router.k={k}", normalize)
    lm = build(tmp_path, "model=lm", "data=pystdlib", f"router.k={k}", normalize)
    for layer in moe_layers(vit):
        assert active_expert_units(layer) == 64 * 2.0  # embed_dim · mlp_ratio
    for layer in moe_layers(lm):
        assert active_expert_units(layer) == 768  # ffn_hidden
    wide = build(tmp_path, f"router.k={k}", normalize, "model.expert_hidden=dense")
    assert all(active_expert_units(layer) == k * 128 for layer in moe_layers(wide))


@pytest.mark.parametrize("value", ["wide", 4, True, 12.5])
def test_a_bad_expert_width_is_one_line(value):
    from moelab.models.placement import expert_width

    with pytest.raises(ConfigError, match="use match .* dense .* or a width >= 8"):
        expert_width(value, 128)


def test_deepseek_routes_mk_minus_shared_and_matches_the_dense_twin(tmp_path):
    """DeepSeekMoE (Dai et al. 2024): granularity m = 4, one shared expert, top-k = 2:
    2·4 − 1 = 7 routed fine experts, 8 active in all, the dense FFN's width."""
    overrides = ("model=lm", "data=pystdlib", "expert=deepseek", "router.k=2")
    moe = build(tmp_path, *overrides)
    dense = build(tmp_path, *overrides, "model.moe_every=0")
    for layer in moe_layers(moe):
        assert (layer.router.k, layer.num_shared, layer.experts.hidden) == (7, 1, 96)
        assert active_expert_units(layer) == 768
    router_parameters = sum(p.numel() for layer in moe_layers(moe) for p in layer.router.parameters())
    assert active_parameters(moe) - router_parameters == active_parameters(dense)


def test_a_width_that_cannot_match_exactly_warns_with_the_numbers():
    # Expert choice with cf = 1.5 processes 1.5 experts per token on average: 128/1.5 is no
    # multiple of 8, so experts get 88 units (132 active) and the layer says so.
    with pytest.warns(UserWarning, match=r"experts of 88 units \(88 per fine expert\) give 1.031 of the dense FFN's FLOPs"):
        layer = MoELayer(16, 128, partial(ExpertChoiceRouter, capacity_factor=1.5), partial(GroupedExperts, num_experts=4),
                         layer_index=3, match_dense_flops=True)
    assert layer.experts.hidden == 88


def test_a_dense_width_no_granularity_divides_still_builds_matched_experts():
    # The experts' own checks apply to the width they get (H/k rounded), not to H.
    with pytest.warns(UserWarning, match=r"experts of 672 units \(168 per fine expert\) give 0.985 of the dense FFN's FLOPs"):
        layer = MoELayer(16, 1365, partial(TopKRouter, k=2), partial(GroupedExperts, num_experts=4, granularity=4),
                         match_dense_flops=True)
    assert (layer.experts.hidden, layer.router.k) == (168, 8)


def test_gshard_refuses_fine_or_shared_experts_in_one_line():
    with pytest.raises(ConfigError, match="gshard is top-2 by definition") as info:
        MoELayer(16, 64, GShardRouter, partial(GroupedExperts, num_experts=4, num_shared=1))
    assert "\n" not in str(info.value) and "router=topk" in str(info.value)


def test_too_many_shared_experts_for_k_is_one_line():
    with pytest.raises(ConfigError, match="leaving none routed") as info:
        MoELayer(16, 64, partial(TopKRouter, k=1, normalize=False), partial(GroupedExperts, num_experts=4, num_shared=1))
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=r"router.k × expert.granularity − expert.num_shared = 2 × 1 − 1 = 1"):
        MoELayer(16, 64, partial(TopKRouter, k=2), partial(GroupedExperts, num_experts=4, num_shared=1))


# 4. Initialisation ------------------------------------------------------------------------------

KINDS = [
    ("gelu", 1, 0), ("gelu", 2, 0), ("gelu", 4, 0), ("gelu", 4, 1),
    ("swiglu", 1, 0), ("swiglu", 2, 1), ("swiglu", 4, 0), ("swiglu", 4, 1),
    ("geglu", 1, 0), ("geglu", 4, 0), ("geglu", 4, 1),
]


@pytest.mark.parametrize("activation,granularity,shared", KINDS)
@pytest.mark.parametrize("in_std,out_std", [(None, None), (0.02, 0.02), (0.02, 0.005)])
def test_moe_output_starts_at_the_dense_twins_rms(activation, granularity, shared, in_std, out_std):
    d_model, dense_hidden = 64, 128
    layer = MoELayer(d_model, dense_hidden, partial(TopKRouter, k=2),
                     partial(GroupedExperts, num_experts=8, activation=activation, granularity=granularity,
                             num_shared=shared),
                     match_dense_flops=True)
    layer.reset_parameters(in_std, out_std)
    dense = DenseFFN(d_model, dense_hidden, activation)
    dense.reset_parameters(in_std, out_std)
    x = unit_rms_tokens(8192, d_model)
    with torch.no_grad():
        ratio = rms(layer(x)) / rms(dense(x))
    assert abs(ratio - 1) < 0.1, ratio


@pytest.mark.parametrize("fine", [(), ("expert.granularity=4", "expert.num_shared=1")])
def test_vit_moe_mlp_starts_like_timms_mlp(tmp_path, fine):
    moe = build(tmp_path, *fine)  # GELU experts, as timm's MLP
    dense = build(tmp_path, "model.moe_every=0")
    x = unit_rms_tokens(4096, 64).reshape(256, 16, 64)
    with torch.no_grad():
        for i in moe.moe_indices:
            ratio = rms(moe.vit.blocks[i].mlp(x)) / rms(dense.vit.blocks[i].mlp(x))
            assert abs(ratio - 1) < 0.1, (i, ratio)


def test_lm_ffn_output_projections_are_depth_scaled_and_moe_starts_like_dense(tmp_path):
    overrides = ("model=lm", "data=pystdlib", "model.depth=8", "model.moe_every=2")
    moe, dense = build(tmp_path, *overrides), build(tmp_path, *overrides, "model.moe_every=0")
    std = 0.02 / math.sqrt(2 * 8)  # GPT-2: residual projections scaled by 1/sqrt(2·depth)
    assert dense.blocks[0].ffn.w2_HD.std().item() == pytest.approx(std, rel=0.05)
    assert dense.blocks[0].ffn.w1_DH.std().item() == pytest.approx(0.02, rel=0.05)
    x = unit_rms_tokens(4096, 256).reshape(16, 256, 256)
    ids = torch.randint(0, 256, (16, 256))
    with torch.no_grad():
        for i in moe.moe_indices:
            ratio = rms(moe.blocks[i].ffn(x, token_ids=ids)) / rms(dense.blocks[i].ffn(x))
            assert abs(ratio - 1) < 0.1, (i, ratio)
        # The FFN branch starts at the embedding's scale, not 20x above it.
        assert rms(dense.blocks[0].ffn(x)) < 2 * dense.embed.weight.std().item()


# 5. Batch priority --------------------------------------------------------------------------

def test_batch_priority_ranks_tokens_by_their_raw_top_gate():
    """V-MoE: priority = the largest router probability, not the weight after renormalising
    over the chosen experts. Token 0 has the larger top probability (0.6 against 0.5) but,
    over its top 2, the smaller renormalised weight (0.6/0.95 against 0.5/0.72)."""
    router = TopKRouter(d_model=4, num_experts=4, k=2, normalize=True, capacity_factor=0.5, batch_priority=True)
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(4))
    x = torch.tensor([[0.6, 0.35, 0.03, 0.02], [0.5, 0.1, 0.22, 0.18]]).log()
    plan = router(x)
    probs = x.softmax(-1)
    raw_top = probs.max(-1).values
    renormalised_top = probs.topk(2).values[:, 0] / probs.topk(2).values.sum(-1)
    assert raw_top[0] > raw_top[1] and renormalised_top[0] < renormalised_top[1]
    # Capacity ⌈0.5·2·2/4⌉ = 1 per expert; both want expert 0 first: the raw-top token wins.
    kept_first = plan.kept_TK[:, 0].tolist()
    assert kept_first == [True, False]


# 6. Cosine router without z-loss ----------------------------------------------------------------

def test_cosine_router_skips_zloss_with_a_warning():
    with pytest.warns(UserWarning, match=r"CosineRouter ignores auxiliary loss \['zloss'\]"):
        layer = MoELayer(16, 32, CosineRouter, partial(GroupedExperts, num_experts=4), {"balance": 0.01, "zloss": 1e-3})
    assert layer.aux_loss_weights == {"balance": 0.01}


# 7. Sinkhorn --------------------------------------------------------------------------------

def sinkhorn_scalings(logits_TE: torch.Tensor, iterations: int) -> torch.Tensor:
    """Independent form: the matrix diag(r)·exp(h)·diag(c), with r and c updated in turn
    (float64, no shifting, moderate logits only)."""
    kernel = logits_TE.double().exp()
    num_tokens, num_experts = kernel.shape
    r = torch.ones(num_tokens, dtype=torch.float64)
    for _ in range(iterations):
        c = 1 / (num_experts * (r[:, None] * kernel).sum(0))
        r = 1 / (num_tokens * (kernel * c[None, :]).sum(1))
    return r[:, None] * kernel * c[None, :]


def test_sinkhorn_agrees_with_the_scaling_form_and_survives_extreme_logits():
    logits = torch.randn(64, 4) * 2
    ours = SinkhornRouter.sinkhorn(logits, 500, 1e-9).double()
    torch.testing.assert_close(ours, sinkhorn_scalings(logits, 500), atol=1e-7, rtol=1e-4)

    extreme = torch.randn(64, 4)
    extreme[:, 3] -= 200.0  # exp underflows to 0 for every token: a zero column
    extreme[0] += 500.0  # and one token far above the rest
    scaled = SinkhornRouter.sinkhorn(extreme, 50, 1e-3)
    assert torch.isfinite(scaled).all()
    assert (scaled[:, 3] == 0).all()
    torch.testing.assert_close(scaled.sum(1), torch.full((64,), 1 / 64), atol=1e-6, rtol=1e-3)
    live = scaled[:, :3].sum(0)
    assert (live.max() / live.min()).item() < 1.05  # the live experts still share the tokens evenly
    router = SinkhornRouter(d_model=4, num_experts=4, k=1)
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(4))
    plan = router(extreme)
    assert torch.isfinite(plan.combine_weight_N).all()


def test_sinkhorn_top1_weight_is_the_sigmoid_gate():
    """BASE layers (Lewis et al. 2021): y = x + σ(h_i) f_i(x) for the assigned expert i."""
    router = SinkhornRouter(d_model=8, num_experts=4, k=1).eval()
    x = torch.randn(16, 8)
    plan = router(x)
    logits = x @ router.gate.weight.t()
    chosen = plan.selected_experts_TK[:, 0]
    torch.testing.assert_close(plan.gates_TK[:, 0], torch.sigmoid(logits.gather(1, chosen[:, None])[:, 0]))
