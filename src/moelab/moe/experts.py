"""Routed experts with weights stored as (E, …) tensors and computed by grouped matmuls."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.moe.dispatch import grouped_mm
from moelab.moe.errors import ConfigError, check_num_experts

ACTIVATIONS = ("gelu", "swiglu")


class GroupedExperts(nn.Module):
    """E feed-forward experts evaluated in one grouped matmul per weight.

    mlp (`activation="gelu"`):   f_e(x) = W2_e · GELU(W1_e x)
    swiglu (`activation="swiglu"`): f_e(x) = W2_e · (SiLU(W1_e x) ⊙ W3_e x)  (Shazeer 2020)

    Input rows arrive grouped by expert with `group_sizes_E` rows for expert e.
    """

    def __init__(self, d_model: int, hidden: int, num_experts: int, activation: str = "gelu") -> None:
        super().__init__()
        check_num_experts(num_experts)
        if activation not in ACTIVATIONS:
            raise ConfigError(f"expert activation '{activation}' is unknown: pick one of {', '.join(ACTIVATIONS)}")
        # Grouped matmul needs 16-byte aligned rows: multiples of 8 cover bf16 and fp32.
        if d_model % 8 or hidden % 8:
            raise ConfigError(
                f"grouped experts need d_model ({d_model}) and hidden ({hidden}) divisible by 8"
            )
        self.num_experts, self.d_model, self.hidden, self.activation = num_experts, d_model, hidden, activation
        self.w1_EDF = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.w2_EFD = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        self.w3_EDF = nn.Parameter(torch.empty(num_experts, d_model, hidden)) if activation == "swiglu" else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Each expert is initialised like a dense layer of its own fan-in.
        for w in (self.w1_EDF, self.w3_EDF):
            if w is not None:
                nn.init.normal_(w, std=self.d_model**-0.5)
        nn.init.normal_(self.w2_EFD, std=self.hidden**-0.5)

    def forward(self, x_ND: Tensor, group_sizes_E: Tensor) -> Tensor:
        offsets_E = torch.cumsum(group_sizes_E, 0, dtype=torch.int32)
        h_NF = grouped_mm(x_ND, self.w1_EDF, offsets_E)
        if self.w3_EDF is None:
            h_NF = F.gelu(h_NF)
        else:
            h_NF = F.silu(h_NF) * grouped_mm(x_ND, self.w3_EDF, offsets_E)
        return grouped_mm(h_NF, self.w2_EFD, offsets_E)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, d_model={self.d_model}, hidden={self.hidden}, activation={self.activation}"
