"""The head + cross-entropy in row chunks equals the plain form, written out here: the loss
and the gradients of the hidden states and the head, in fp32 and under bf16 autocast, for
chunks that do and do not divide the rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moelab.models.linear_cross_entropy import chunk_rows, linear_cross_entropy


def plain(hidden, weight, targets):
    logits = (hidden @ weight.t()).float()
    log_probs = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    return -log_probs.gather(1, targets.unsqueeze(1)).mean()


@pytest.mark.parametrize("rows", [1, 7, 64, 1000])
def test_chunked_loss_and_gradients_equal_the_plain_form(rows):
    torch.manual_seed(0)
    hidden = torch.randn(64, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (64,))
    loss = linear_cross_entropy(hidden, weight, targets, rows)
    (2.5 * loss).backward()  # the incoming gradient scales both
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    expected = plain(h2, w2, targets)
    (2.5 * expected).backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(loss, F.cross_entropy(hidden @ weight.t(), targets))
    torch.testing.assert_close(hidden.grad, h2.grad)
    torch.testing.assert_close(weight.grad, w2.grad)


def test_under_bf16_autocast_the_matmuls_are_bf16_and_the_loss_fp32():
    torch.manual_seed(0)
    hidden = torch.randn(32, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    targets = torch.randint(0, 40, (32,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, targets, 5)
        logits = F.linear(hidden, weight)  # what nn.Linear computes under autocast
        expected = F.cross_entropy(logits.float(), targets)
    assert loss.dtype == torch.float32 and logits.dtype == torch.bfloat16
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    loss.backward()
    assert weight.grad.dtype == torch.float32 and torch.isfinite(hidden.grad).all()


def test_chunks_hold_about_the_budget_of_fp32_logits():
    assert chunk_rows(16384, 50304) == (1 << 28) // (4 * 50304)
    assert chunk_rows(100, 320) == 100 and chunk_rows(10, 10**9) == 1
