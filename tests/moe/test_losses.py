"""Balance and z-loss against their definitions computed with loops."""

import math

import pytest
import torch

from moelab.moe import balance_loss, z_loss
from moelab.moe.dispatch import token_choice_routing


def plan_from(logits, selected):
    probs = logits.softmax(-1)
    return token_choice_routing(logits, probs, selected, probs.gather(1, selected))


def reference_balance(logits, selected):
    T, E = logits.shape
    k = selected.shape[1]
    probs = logits.softmax(-1).tolist()
    total = 0.0
    for i in range(E):
        f_i = sum(row.count(i) for row in selected.tolist()) / (k * T)
        p_i = sum(p[i] for p in probs) / T
        total += f_i * p_i
    return E * total


@pytest.mark.parametrize("k", [1, 2, 4])
def test_balance_is_one_for_uniform_routing(k):
    E, T = 8, 64
    logits = torch.zeros(T, E)
    selected = (torch.arange(T)[:, None] + torch.arange(k)[None, :] * 3) % E  # each expert k·T/E times
    assert torch.equal(torch.bincount(selected.flatten(), minlength=E), torch.full((E,), k * T // E))
    assert balance_loss(plan_from(logits, selected)).item() == pytest.approx(1.0, abs=1e-6)


def test_balance_grows_with_skew():
    E, T = 4, 32
    values = []
    for skew in [0.0, 1.0, 2.0, 4.0]:
        logits = torch.zeros(T, E)
        logits[:, 0] = skew
        # With skew, a growing share of tokens goes to expert 0.
        n_to_zero = int(T * (0.25 + 0.75 * (1 - math.exp(-skew))))
        selected = torch.arange(T)[:, None] % E
        selected[:n_to_zero] = 0
        loss = balance_loss(plan_from(logits, selected))
        assert loss.item() == pytest.approx(reference_balance(logits, selected), rel=1e-5)
        values.append(loss.item())
    assert values == sorted(values) and values[-1] > 2 * values[0]


def test_balance_matches_loop_definition_on_random_routing():
    logits = torch.randn(40, 6)
    selected = logits.topk(2, dim=-1).indices
    assert balance_loss(plan_from(logits, selected)).item() == pytest.approx(
        reference_balance(logits, selected), rel=1e-5
    )


def test_balance_counts_assignments_before_capacity_drops():
    logits = torch.randn(16, 4)
    selected = torch.zeros(16, 1, dtype=torch.long)  # everyone picks expert 0
    probs = logits.softmax(-1)
    plan = token_choice_routing(logits, probs, selected, probs.gather(1, selected), capacity=2)
    assert plan.tokens_per_expert_E[0] == 2
    assert balance_loss(plan).item() == pytest.approx(reference_balance(logits, selected), rel=1e-5)


def test_z_loss_matches_formula():
    logits = torch.randn(20, 5) * 3
    plan = plan_from(logits, logits.topk(1, dim=-1).indices)
    want = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / 20
    assert z_loss(plan).item() == pytest.approx(want, rel=1e-5)


def test_importance_is_cv_squared_of_gate_sums():
    from moelab.moe.losses import importance_loss

    logits = torch.randn(30, 5)
    probs = logits.softmax(-1)
    selected = logits.topk(2, dim=-1).indices
    gates = probs.gather(1, selected)
    plan = token_choice_routing(logits, probs, selected, gates)
    imp = [0.0] * 5
    for t in range(30):
        for j in range(2):
            imp[selected[t, j]] += gates[t, j].item()
    mean = sum(imp) / 5
    var = sum((v - mean) ** 2 for v in imp) / 5
    assert importance_loss(plan).item() == pytest.approx(var / mean**2, rel=1e-5)


def test_load_loss_is_cv_squared_of_the_estimate():
    from moelab.moe.losses import load_loss

    logits = torch.randn(8, 4)
    probs = logits.softmax(-1)
    selected = logits.topk(1, dim=-1).indices
    estimate = torch.tensor([1.0, 2.0, 3.0, 6.0])
    plan = token_choice_routing(logits, probs, selected, probs.gather(1, selected), load_estimate_E=estimate)
    assert load_loss(plan).item() == pytest.approx(((1 - 3) ** 2 + 1 + 0 + 9) / 4 / 9, rel=1e-6)


def test_seq_balance_averages_per_sequence_balance():
    from moelab.moe.losses import seq_balance_loss
    from moelab.moe.routing import RoutingContext

    B, L, E = 3, 10, 4
    logits = torch.randn(B * L, E)
    selected = logits.topk(2, dim=-1).indices
    probs = logits.softmax(-1)
    plan = token_choice_routing(
        logits, probs, selected, probs.gather(1, selected), context=RoutingContext(num_sequences=B, seq_len=L)
    )
    per_sequence = [reference_balance(logits[b * L : (b + 1) * L], selected[b * L : (b + 1) * L]) for b in range(B)]
    assert seq_balance_loss(plan).item() == pytest.approx(sum(per_sequence) / B, rel=1e-5)
    assert seq_balance_loss(plan).item() != pytest.approx(balance_loss(plan).item(), rel=1e-3)


def test_entropy_loss():
    from moelab.moe.losses import entropy_loss

    logits = torch.randn(6, 3)
    plan = plan_from(logits, logits.topk(1, dim=-1).indices)
    probs = logits.softmax(-1).tolist()
    want = sum(-sum(p * math.log(p) for p in row) for row in probs) / 6
    assert entropy_loss(plan).item() == pytest.approx(want, rel=1e-5)
