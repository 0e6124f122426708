"""Each router against its paper's equation, written independently here (loops, math)."""

import math
from functools import partial

import pytest
import torch

from moelab.moe import (
    AuxFreeRouter,
    ConfigError,
    CosineRouter,
    DenseRouter,
    ExpertChoiceRouter,
    GroupedExperts,
    GShardRouter,
    HashRouter,
    MoELayer,
    NoisyTopKRouter,
    RoutingContext,
    SinkhornRouter,
    SoftMoERouter,
    TopKRouter,
)

from .test_dispatch import loop_experts


def rows_of(plan):
    """{token: {expert: weight}} over the plan's real rows."""
    experts_N = plan.expert_index_N()
    valid_N = torch.ones_like(plan.token_index_N, dtype=torch.bool) if plan.valid_N is None else plan.valid_N
    out = {}
    for t, e, w, v in zip(plan.token_index_N.tolist(), experts_N.tolist(), plan.combine_weight_N.tolist(), valid_N.tolist()):
        if v:
            out.setdefault(t, {})[e] = out.get(t, {}).get(e, 0.0) + w
    return out


def sigmoid(v):
    return 1 / (1 + math.exp(-v))


def phi(v):
    return 0.5 * (1 + math.erf(v / math.sqrt(2)))


def assert_rows(plan, expected):
    got = rows_of(plan)
    assert got.keys() == expected.keys()
    for t in expected:
        assert got[t].keys() == expected[t].keys(), t
        for e in expected[t]:
            assert got[t][e] == pytest.approx(expected[t][e], abs=1e-5)


@pytest.mark.parametrize("normalize", [True, False])
def test_sigmoid_topk(normalize):
    router = TopKRouter(d_model=8, num_experts=6, k=2, normalize=normalize, score="sigmoid")
    x = torch.randn(20, 8)
    plan = router(x)
    expected = {}
    for t, row in enumerate((x @ router.gate.weight.t()).tolist()):
        s = [sigmoid(v) for v in row]
        top = sorted(range(6), key=lambda i: -s[i])[:2]
        total = sum(s[i] for i in top) if normalize else 1.0
        expected[t] = {i: s[i] / total for i in top}
    assert_rows(plan, expected)


def test_gshard_second_expert_kept_with_probability_2g2():
    router = GShardRouter(d_model=8, num_experts=4)
    x = torch.randn(300, 8)
    torch.manual_seed(5)
    plan = router(x)
    torch.manual_seed(5)
    uniform = torch.rand(300).tolist()
    logits = (x @ router.gate.weight.t()).tolist()
    expected, kept_second = {}, 0
    for t, row in enumerate(logits):
        p = [math.exp(v) for v in row]
        p = [v / sum(p) for v in p]
        e1 = max(range(4), key=lambda i: p[i])
        e2 = max((i for i in range(4) if i != e1), key=lambda i: p[i])
        g1, g2 = p[e1] / (p[e1] + p[e2]), p[e2] / (p[e1] + p[e2])
        expected[t] = {e1: g1}
        if 2 * g2 > uniform[t]:
            expected[t][e2] = g2
            kept_second += 1
    assert 0 < kept_second < 300
    assert_rows(plan, expected)
    router.eval()
    assert all(len(v) == 2 for v in rows_of(router(x)).values())


def test_noisy_topk_weights_and_load_estimator():
    router = NoisyTopKRouter(d_model=8, num_experts=5, k=2)
    torch.nn.init.normal_(router.gate.weight)
    torch.nn.init.normal_(router.noise.weight)
    x = torch.randn(12, 8)
    torch.manual_seed(3)
    plan = router(x)
    torch.manual_seed(3)
    eps = torch.randn(12, 5).tolist()
    clean = (x @ router.gate.weight.t()).tolist()
    raw_noise = (x @ router.noise.weight.t()).tolist()
    expected, load = {}, [0.0] * 5
    for t in range(12):
        std = [math.log1p(math.exp(v)) + router.noise_epsilon for v in raw_noise[t]]
        H = [clean[t][i] + eps[t][i] * std[i] for i in range(5)]
        top = sorted(range(5), key=lambda i: -H[i])[:2]
        z = sum(math.exp(H[i]) for i in top)
        expected[t] = {i: math.exp(H[i]) / z for i in top}
        for i in range(5):
            others = sorted((H[j] for j in range(5) if j != i), reverse=True)
            load[i] += phi((clean[t][i] - others[1]) / std[i])  # k-th largest excluding i, k=2
    assert_rows(plan, expected)
    torch.testing.assert_close(plan.load_estimate_E, torch.tensor(load), atol=1e-5, rtol=1e-5)
    router.eval()
    assert router(x).load_estimate_E is None


def test_cosine_router_scores():
    router = CosineRouter(d_model=8, num_experts=4, k=2, dim=3, init_temperature=0.5)
    x = torch.randn(10, 8)
    plan = router(x)
    W, emb = router.project.weight.tolist(), router.expert_embeddings.tolist()
    for t, xt in enumerate(x.tolist()):
        z = [sum(W[r][c] * xt[c] for c in range(8)) for r in range(3)]
        nz = math.sqrt(sum(v * v for v in z))
        for i in range(4):
            ne = math.sqrt(sum(v * v for v in emb[i]))
            cos = sum(z[r] * emb[i][r] for r in range(3)) / (nz * ne)
            assert plan.router_logits_TE[t, i].item() == pytest.approx(cos / 0.5, abs=1e-5)
    with torch.no_grad():
        router.log_temperature.fill_(-20.0)
    assert router.temperature.item() == pytest.approx(0.01)


def test_aux_free_selection_uses_bias_but_weights_do_not():
    router = AuxFreeRouter(d_model=8, num_experts=4, k=2, update_rate=0.1)
    router.expert_bias_E.copy_(torch.tensor([0.0, 5.0, 0.0, 0.0]))  # expert 1 always selected
    x = torch.randn(16, 8)
    plan = router(x)
    expected = {}
    for t, row in enumerate((x @ router.gate.weight.t()).tolist()):
        s = [sigmoid(v) for v in row]
        biased = [s[i] + router.expert_bias_E[i].item() for i in range(4)]
        top = sorted(range(4), key=lambda i: -biased[i])[:2]
        expected[t] = {i: s[i] / sum(s[j] for j in top) for i in top}
    assert_rows(plan, expected)
    counts = plan.tokens_per_expert_E.float()
    router.update_bias()
    want = torch.tensor([0.0, 5.0, 0.0, 0.0]) + 0.1 * torch.sign(counts.mean() - counts)
    torch.testing.assert_close(router.expert_bias_E, want)
    assert router.load_since_update_E.sum() == 0


def test_aux_free_bias_balances_a_skewed_stream():
    torch.manual_seed(0)
    router = AuxFreeRouter(d_model=8, num_experts=4, k=1 + 1, update_rate=0.02)
    with torch.no_grad():
        torch.nn.init.normal_(router.gate.weight, std=8**-0.5)  # unit-scale logits: a spread of scores
        router.gate.weight[0] += 1.0  # tokens have a positive mean along this row: expert 0 is favoured
    def imbalance():  # on a large batch, so sampling noise stays small against the 1.15 bound
        counts = router(torch.randn(8192, 8) + 0.5).tokens_per_expert_E.float()
        return (counts.max() / counts.mean()).item()
    router.load_since_update_E.zero_()
    start = imbalance()
    router.load_since_update_E.zero_()
    for _ in range(200):
        router(torch.randn(256, 8) + 0.5)
        router.update_bias()
    end = imbalance()
    assert start > 1.5 and end < 1.15, (start, end)


def test_sinkhorn_balances_in_training_and_is_topk_at_eval():
    router = SinkhornRouter(d_model=8, num_experts=4, k=1)
    with torch.no_grad():
        router.gate.weight[0] += 2.0
    x = torch.randn(400, 8) + 0.5
    scaled = SinkhornRouter.sinkhorn(x @ router.gate.weight.t(), 200, 1e-6)
    torch.testing.assert_close(scaled.sum(1), torch.full((400,), 1 / 400), atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(scaled.sum(0), torch.full((4,), 1 / 4), atol=1e-6, rtol=1e-4)
    train_counts = router(x).tokens_per_expert_E.float()
    router.eval()
    eval_plan = router(x)
    eval_counts = eval_plan.tokens_per_expert_E.float()
    assert train_counts.max() / train_counts.mean() < 1.3
    assert eval_counts.max() / eval_counts.mean() > 2.0
    assert torch.equal(eval_plan.selected_experts_TK[:, 0], eval_plan.router_probs_TE.argmax(-1))


def test_hash_router_is_a_fixed_balanced_map():
    router = HashRouter(d_model=8, num_experts=3, key="token_id", num_keys=10)
    assert sorted(torch.bincount(router.expert_of_key, minlength=3).tolist()) == [3, 3, 4]
    ids = torch.tensor([[1, 2, 1], [12, 2, 7]])
    plan = router(torch.randn(6, 8), RoutingContext.for_input(torch.randn(2, 3, 8), ids))
    chosen = plan.selected_experts_TK[:, 0]
    table = router.expert_of_key
    assert chosen.tolist() == [table[i % 10].item() for i in ids.flatten().tolist()]
    assert_rows(plan, {t: {chosen[t].item(): 1.0} for t in range(6)})
    with pytest.raises(ConfigError, match="needs token ids"):
        router(torch.randn(6, 8))
    by_position = HashRouter(d_model=8, num_experts=3, key="position", num_keys=4)
    plan = by_position(torch.randn(8, 8), RoutingContext(num_sequences=2, seq_len=4))
    assert plan.selected_experts_TK[:4].tolist() == plan.selected_experts_TK[4:].tolist()


def test_dense_gating_uses_every_expert_with_softmax_weights():
    layer = MoELayer(8, 16, DenseRouter, partial(GroupedExperts, num_experts=3))
    x = torch.randn(7, 8)
    y = layer(x)
    probs = (x @ layer.router.gate.weight.t()).softmax(-1)
    want = sum(probs[:, i : i + 1] * loop_experts(layer.experts, x, i) for i in range(3))
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)


def test_expert_choice_takes_top_c_tokens_per_expert():
    layer = MoELayer(8, 16, partial(ExpertChoiceRouter, capacity_factor=1.0), partial(GroupedExperts, num_experts=4))
    x = torch.randn(10, 8)
    y = layer(x)
    plan = layer.last_plan
    c = math.ceil(10 / 4)
    assert plan.group_sizes_E.tolist() == [c] * 4 == plan.tokens_per_expert_E.tolist()
    logits = (x @ layer.router.gate.weight.t()).tolist()
    S = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits]
    want = torch.zeros(10, 8)
    taken = set()
    for i in range(4):
        column = sorted(range(10), key=lambda t: -S[t][i])[:c]
        taken |= set(column)
        out = loop_experts(layer.experts, x[column], i)
        for j, t in enumerate(column):
            want[t] += S[t][i] * out[j]
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    assert plan.stats()["unrouted_fraction"].item() == pytest.approx(1 - len(taken) / 10)


def test_soft_moe_matches_per_sequence_loops_and_normalises():
    torch.manual_seed(1)
    layer = MoELayer(8, 16, partial(SoftMoERouter, slots_per_expert=2), partial(GroupedExperts, num_experts=3))
    with torch.no_grad():
        layer.router.scale.fill_(3.0)
    x = torch.randn(2, 5, 8)
    y = layer(x)
    plan = layer.last_plan
    torch.testing.assert_close(plan.dispatch_BMS.sum(1), torch.ones(2, 6))  # over tokens
    torch.testing.assert_close(plan.combine_BMS.sum(2), torch.ones(2, 5))  # over slots
    phi = layer.router.slot_embeddings_DS.detach()
    for b in range(2):
        X = x[b]
        L = 3.0 * (X / X.norm(dim=1, keepdim=True)) @ (phi / phi.norm(dim=0, keepdim=True))
        D = torch.stack([L[:, s].softmax(0) for s in range(6)], 1)
        C = torch.stack([L[m].softmax(0) for m in range(5)], 0)
        slots = D.t() @ X
        outputs = torch.stack([loop_experts(layer.experts, slots[s : s + 1], s // 2)[0] for s in range(6)])
        torch.testing.assert_close(y[b], C @ outputs, atol=1e-5, rtol=1e-5)


def test_soft_moe_sequences_are_independent():
    layer = MoELayer(8, 16, SoftMoERouter, partial(GroupedExperts, num_experts=4))
    x = torch.randn(3, 6, 8)
    y = layer(x)
    x2 = x.clone()
    x2[1:] = torch.randn(2, 6, 8)
    torch.testing.assert_close(layer(x2)[0], y[0])
    torch.testing.assert_close(layer(x[:1])[0], y[0], atol=1e-6, rtol=1e-5)


def test_batch_priority_drops_the_lowest_priority_tokens():
    router = TopKRouter(d_model=8, num_experts=2, k=1, normalize=False, capacity_factor=0.5, batch_priority=True)
    x = torch.randn(16, 8)
    plan = router(x)
    capacity = math.ceil(0.5 * 16 / 2)
    probs = (x @ router.gate.weight.t()).softmax(-1)
    priority, choice = probs.max(-1)
    for e in range(2):
        mine = sorted((t for t in range(16) if choice[t] == e), key=lambda t: -priority[t].item())
        kept = {t for t in range(16) if plan.kept_TK[t, 0] and choice[t] == e}
        assert kept == set(mine[:capacity])


@pytest.mark.parametrize(
    "factory,message",
    [
        (partial(GShardRouter, num_experts=1), "router.k=2 must be between 1 and experts=1"),
        (partial(NoisyTopKRouter, num_experts=2, k=2), "noisy_topk needs router.k < experts"),
        (partial(CosineRouter, num_experts=4, k=5), "router.k=5"),
        (partial(ExpertChoiceRouter, num_experts=4, capacity_factor=0), "capacity_factor=0 must be > 0"),
        (partial(SoftMoERouter, num_experts=4, num_slots=6), "num_slots=6 must be a positive multiple"),
        (partial(HashRouter, num_experts=4, key="word"), "router.key='word' is unknown"),
        (partial(HashRouter, num_experts=4, key="position"), "needs the number of positions"),
        (partial(HashRouter, num_experts=4, balance="frequency", num_positions=16), "balance=frequency balances token-id"),
        (partial(TopKRouter, num_experts=4, score="relu"), "router.score='relu' is unknown"),
        (partial(SinkhornRouter, num_experts=0), "experts=0"),
    ],
)
def test_router_config_errors(factory, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        factory(d_model=8)


def test_aux_free_with_balance_loss_warns_and_unsupported_losses_are_skipped():
    with pytest.warns(UserWarning, match="aux_free balances with its bias"):
        MoELayer(8, 16, AuxFreeRouter, partial(GroupedExperts, num_experts=4), {"balance": 0.01})
    with pytest.warns(UserWarning, match="ignores auxiliary loss \\['balance'\\]"):
        layer = MoELayer(8, 16, SoftMoERouter, partial(GroupedExperts, num_experts=4), {"balance": 0.01})
    assert layer.aux_loss_weights == {}


@pytest.mark.parametrize("router", [TopKRouter, DenseRouter, partial(HashRouter, key="position", num_keys=6)])
def test_causal_safe_routers_route_each_token_alone(router):
    layer = MoELayer(8, 16, router, partial(GroupedExperts, num_experts=4))
    assert layer.causal_safe
    x = torch.randn(2, 6, 8)
    y = layer(x)
    x2 = x.clone()
    x2[:, 3:] = torch.randn(2, 3, 8)
    torch.testing.assert_close(layer(x2)[:, :3], y[:, :3])


def test_new_config_guards():
    with pytest.raises(ConfigError, match="batch_priority=true only orders capacity drops"):
        TopKRouter(d_model=8, num_experts=4, batch_priority=True)
    with pytest.raises(ConfigError, match="this router renormalises, use router.k>=2"):
        AuxFreeRouter(d_model=8, num_experts=4, k=1)
    with pytest.raises(ConfigError, match="top-2 by definition"):
        GShardRouter(d_model=8, num_experts=4, k=3)
    with pytest.raises(ConfigError, match="not both"):
        SoftMoERouter(d_model=8, num_experts=4, slots_per_expert=2, num_slots=8)
    with pytest.raises(ConfigError, match="multiplies the router's k, and this router sets none"):
        MoELayer(8, 16, SoftMoERouter, partial(GroupedExperts, num_experts=2, granularity=2))


def test_aux_free_counts_load_before_capacity_drops():
    router = AuxFreeRouter(d_model=8, num_experts=4, k=2, capacity_factor=0.5)
    router.expert_bias_E.copy_(torch.tensor([5.0, 5.0, 0.0, 0.0]))  # everyone picks experts 0 and 1
    plan = router(torch.randn(32, 8))
    assert plan.tokens_per_expert_E.tolist()[:2] == [8, 8]  # capacity ⌈0.5·2·32/4⌉ = 8
    assert router.load_since_update_E.tolist() == [32.0, 32.0, 0.0, 0.0]


def test_combine_accumulates_in_fp32(monkeypatch):
    """The generic combine (index_add; every plan on the CPU, expert choice everywhere) sums a
    token's bf16 rows in fp32 and rounds once: each output is the float64 sum, worked out
    here, rounded to bf16 (half a bf16 spacing, plus fp32's own error). 64 rows a token with
    mixed signs: summed in bf16 instead, about half the outputs miss by many spacings."""
    from moelab.moe import routing

    monkeypatch.setattr(routing, "GATHER_ROWS", False)
    tokens, experts, width = 32, 64, 16
    plan = DenseRouter(d_model=8, num_experts=experts)(torch.randn(tokens, 8))
    y = torch.randn(tokens * experts, width).to(torch.bfloat16)
    terms = plan.combine_weight_N.double()[:, None] * y.double()
    exact = torch.zeros(tokens, width, dtype=torch.float64).index_add_(0, plan.token_index_N, terms)
    magnitude = torch.zeros(tokens, width, dtype=torch.float64).index_add_(0, plan.token_index_N, terms.abs())
    spacing = torch.exp2(torch.floor(torch.log2(exact.abs())) - 7)  # between bf16 numbers near |exact|
    out = plan.combine(y)
    assert out.dtype == torch.bfloat16
    assert bool(((out.double() - exact).abs() <= 0.5 * spacing + 1e-6 * magnitude).all())
