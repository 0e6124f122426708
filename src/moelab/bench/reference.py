"""The plain MoE layer moelab's is measured against: a top-k softmax router, tokens sorted by
expert, three grouped matmuls, an `index_add_` back to the tokens; about 30 lines, no
capacity, no statistics, no side channels (scripts/bench_moe_layer.py's "30-line" column)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ReferenceMoE(nn.Module):
    """Top-k SwiGLU experts over grouped rows; fp32 router, fp32 master weights cast to the
    autocast dtype per call as moelab's are."""

    def __init__(self, d_model: int, hidden: int, num_experts: int, k: int) -> None:
        super().__init__()
        self.k, self.num_experts = k, num_experts
        self.gate = nn.Parameter(torch.randn(num_experts, d_model) * d_model**-0.5)
        self.w1 = nn.Parameter(torch.randn(num_experts, d_model, hidden) * d_model**-0.5)
        self.w3 = nn.Parameter(torch.randn(num_experts, d_model, hidden) * d_model**-0.5)
        self.w2 = nn.Parameter(torch.randn(num_experts, hidden, d_model) * hidden**-0.5)

    def forward(self, x: Tensor) -> Tensor:
        x_TD = x.reshape(-1, x.shape[-1])
        with torch.autocast(x.device.type, enabled=False):
            probs = F.linear(x_TD.float(), self.gate).softmax(-1)
        weights, experts = probs.topk(self.k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        order = experts.flatten().argsort(stable=True)
        token = order // self.k
        counts = torch.zeros(self.num_experts, dtype=torch.int32, device=x.device)
        counts.scatter_add_(0, experts.flatten(), torch.ones_like(order, dtype=torch.int32))
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        rows = x_TD.to(dtype)[token]
        gate_up = [torch._grouped_mm(rows, w.to(dtype), offs=offsets) for w in (self.w1, self.w3)]
        h = F.silu(gate_up[0]) * gate_up[1]
        y = torch._grouped_mm(h, self.w2.to(dtype), offs=offsets) * weights.flatten()[order, None].to(dtype)
        return torch.zeros_like(x_TD, dtype=dtype).index_add_(0, token, y).reshape(x.shape).to(x.dtype)
