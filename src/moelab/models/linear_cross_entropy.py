"""The LM head and its cross-entropy in one pass over row chunks, so the (N, V) logits never
exist whole: each chunk's logits are computed, turned into the loss and into the gradients
of the hidden states and the head, and dropped. With a 50k vocabulary and 16k tokens a
step, the full fp32 logits would be 3.3 GB, written and read several times.

The gradients are those of the plain form, mean over rows of
    CE_n = logsumexp(h_n Wᵀ) − (h_n Wᵀ)[y_n],
∂CE/∂logits = (softmax(logits) − onehot(y)) / N, then ∂h = ∂logits · W and
∂W = ∂logitsᵀ · h. They are computed in the forward (the loss is the graph's end, so
the backward only scales them by the incoming gradient), as in Liger-Kernel's fused
linear cross-entropy (Hsu et al. 2024). Under autocast the matmuls run in its dtype, as
`nn.Linear` would; the softmax and the loss are fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK_BYTES = 1 << 28  # fp32 logits per chunk: 256 MiB


def chunk_rows(num_rows: int, vocab: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk so that a chunk's fp32 logits take about `chunk_bytes`."""
    return max(1, min(num_rows, chunk_bytes // (4 * vocab)))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_ND: Tensor, weight_VD: Tensor, targets_N: Tensor, rows: int) -> Tensor:
        num_rows = hidden_ND.shape[0]
        compute = torch.get_autocast_dtype(hidden_ND.device.type) if torch.is_autocast_enabled(hidden_ND.device.type) \
            else torch.promote_types(hidden_ND.dtype, weight_VD.dtype)
        weight = weight_VD.to(compute)
        loss = torch.zeros((), dtype=torch.float32, device=hidden_ND.device)
        grad_hidden = torch.empty_like(hidden_ND) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight_VD.shape, dtype=torch.float32, device=weight_VD.device) \
            if ctx.needs_input_grad[1] else None
        with torch.autocast(hidden_ND.device.type, enabled=False):
            for start in range(0, num_rows, rows):
                h = hidden_ND[start:start + rows].to(compute)
                y = targets_N[start:start + rows]
                logits = (h @ weight.t()).float()
                log_z = torch.logsumexp(logits, dim=-1)
                loss = loss + (log_z - logits.gather(1, y.unsqueeze(1)).squeeze(1)).sum()
                if grad_hidden is None and grad_weight is None:
                    continue
                grad_logits = torch.exp(logits - log_z.unsqueeze(1))  # softmax, in place of the logits
                grad_logits[torch.arange(len(y), device=y.device), y] -= 1.0
                grad_logits = (grad_logits / num_rows).to(compute)
                if grad_hidden is not None:
                    grad_hidden[start:start + rows] = (grad_logits @ weight).to(hidden_ND.dtype)
                if grad_weight is not None:
                    grad_weight += (grad_logits.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight_VD.dtype
        return loss / num_rows

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        out_hidden = None if grad_hidden is None else grad_hidden * grad_loss.to(grad_hidden.dtype)
        out_weight = None if grad_weight is None else (grad_weight * grad_loss).to(ctx.weight_dtype)
        return out_hidden, out_weight, None, None


def linear_cross_entropy(hidden_ND: Tensor, weight_VD: Tensor, targets_N: Tensor, rows: int | None = None) -> Tensor:
    """mean_n CE(h_n Wᵀ, y_n) without materialising the (N, V) logits (see the module)."""
    if rows is None:
        rows = chunk_rows(hidden_ND.shape[0], weight_VD.shape[0])
    return _LinearCrossEntropy.apply(hidden_ND, weight_VD, targets_N, rows)
