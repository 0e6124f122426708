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
