"""A Triton kernel for the experts' first half on a GPU: the dispatch gather, the gate and up
grouped matmuls and the GLU product in one pass (`expert.kernel=triton`).

For the grouped rows n of expert e(n), each the copy of token t(n),
    h1_n = x_t(n) W1_e(n),  h3_n = x_t(n) W3_e(n),  a_n = act(h1_n) ⊙ h3_n
(SwiGLU: act = SiLU; GeGLU: GELU; Shazeer 2020), with x read straight from the (T, D)
tokens: the (N, D) dispatched copy, and the separate activation pass over h1 and h3, are
never written. Row tiles never straddle two experts: each expert's rows are cut into tiles
of BLOCK_M, and the tile → (expert, first row) map is computed on the device for an upper
bound of ⌈N / BLOCK_M⌉ + E tiles, so the launch needs no host sync (tiles past the last
one exit at once).

The backward is torch's: `_grouped_mm` for the weight and input gradients (the tokens are
gathered again there rather than kept), an fp32 `index_add` back to the tokens. The CPU
and the default GPU path stay in pure torch (moelab.moe.experts); `TRITON_INTERPRET=1`
runs this kernel on the CPU, which is how tests/moe/test_kernels.py checks it against the
torch path. Its speed on a GPU is measured by scripts/bench_moe_layer.py.
"""

from __future__ import annotations

import importlib.util
import math
import os

import torch
from torch import Tensor

ACTIVATIONS = {"swiglu": 0, "geglu": 1}
BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 32


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(x: Tensor) -> bool:
    """Whether the kernel can run on `x`: Triton installed, and a CUDA tensor (or the
    interpreter, on the CPU)."""
    return importlib.util.find_spec("triton") is not None and (x.is_cuda or interpreted())


def _kernel():
    """Triton and the jitted kernel (decorated for the interpreter or the GPU, as
    TRITON_INTERPRET says when the module is first imported)."""
    import triton

    from moelab.moe._triton_kernels import gather_gate_up as kernel

    return triton, kernel


def tile_map(group_sizes_E: Tensor, num_rows: int, block_m: int = BLOCK_M) -> tuple[Tensor, Tensor, Tensor]:
    """(expert of each tile, -1 past the last; first row of each tile; each expert's row end)
    for ⌈num_rows / block_m⌉ + E tiles: device ops only."""
    sizes_E = group_sizes_E.long()
    num_experts = sizes_E.numel()
    tiles_E = (sizes_E + block_m - 1) // block_m
    tile_end_E = torch.cumsum(tiles_E, 0)
    row_end_E = torch.cumsum(sizes_E, 0)
    tile = torch.arange(math.ceil(num_rows / block_m) + num_experts, device=sizes_E.device)
    expert = torch.searchsorted(tile_end_E, tile, right=True)
    clamped = expert.clamp(max=num_experts - 1)
    start = (row_end_E - sizes_E)[clamped] + (tile - (tile_end_E - tiles_E)[clamped]) * block_m
    return torch.where(expert < num_experts, expert, -1).to(torch.int32), start, row_end_E


def _launch(x_TD: Tensor, token_index_N: Tensor, group_sizes_E: Tensor, w1_EDF: Tensor, w3_EDF: Tensor,
            activation: str) -> tuple[Tensor, Tensor, Tensor]:
    triton, kernel = _kernel()
    num_rows, fine = token_index_N.numel(), w1_EDF.shape[-1]
    h1_NF = x_TD.new_empty(num_rows, fine)
    h3_NF, a_NF = torch.empty_like(h1_NF), torch.empty_like(h1_NF)
    tile_expert, tile_start, row_end = tile_map(group_sizes_E, num_rows)
    grid = (tile_expert.numel(), triton.cdiv(fine, BLOCK_N))
    kernel[grid](
        x_TD, token_index_N, w1_EDF, w3_EDF, h1_NF, h3_NF, a_NF, tile_expert, tile_start, row_end,
        x_TD.shape[1], fine, x_TD.stride(0), x_TD.stride(1), w1_EDF.stride(0), w1_EDF.stride(1), w1_EDF.stride(2),
        h1_NF.stride(0), h1_NF.stride(1),
        ACTIVATION=ACTIVATIONS[activation], BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )
    return h1_NF, h3_NF, a_NF


def _act_and_grad(activation: str, h_NF: Tensor) -> tuple[Tensor, Tensor]:
    h = h_NF.float()
    if activation == "swiglu":
        sig = torch.sigmoid(h)
        return h * sig, sig * (1 + h * (1 - sig))
    cdf = 0.5 * (1 + torch.erf(h * 0.7071067811865476))
    return h * cdf, cdf + h * torch.exp(-0.5 * h * h) * 0.3989422804014327


class _GatherGateUp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, token_index_N, group_sizes_E, w1_EDF, w3_EDF, activation):
        dtype = x_TD.dtype
        w1, w3 = w1_EDF.to(dtype), w3_EDF.to(dtype)
        h1_NF, h3_NF, a_NF = _launch(x_TD, token_index_N, group_sizes_E, w1, w3, activation)
        ctx.save_for_backward(x_TD, token_index_N, group_sizes_E, w1, w3, h1_NF, h3_NF)
        ctx.activation, ctx.weight_dtypes = activation, (w1_EDF.dtype, w3_EDF.dtype)
        return a_NF

    @staticmethod
    def backward(ctx, grad_a_NF):
        x_TD, token_index_N, group_sizes_E, w1, w3, h1_NF, h3_NF = ctx.saved_tensors
        act, act_grad = _act_and_grad(ctx.activation, h1_NF)
        grad_a = grad_a_NF.float()
        dtype = x_TD.dtype
        grad_h1 = (grad_a * h3_NF.float() * act_grad).to(dtype)
        grad_h3 = (grad_a * act).to(dtype)
        offsets_E = torch.cumsum(group_sizes_E, 0, dtype=torch.int32)
        x_ND = x_TD.index_select(0, token_index_N)
        grad_w1 = torch._grouped_mm(x_ND.t(), grad_h1, offs=offsets_E).to(ctx.weight_dtypes[0])
        grad_w3 = torch._grouped_mm(x_ND.t(), grad_h3, offs=offsets_E).to(ctx.weight_dtypes[1])
        grad_x_ND = (torch._grouped_mm(grad_h1, w1.transpose(-2, -1), offs=offsets_E)
                     + torch._grouped_mm(grad_h3, w3.transpose(-2, -1), offs=offsets_E))
        grad_x = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device)
        grad_x.index_add_(0, token_index_N, grad_x_ND.float())
        return grad_x.to(dtype), None, None, grad_w1, grad_w3, None


def gather_gate_up(x_TD: Tensor, token_index_N: Tensor, group_sizes_E: Tensor, w1_EDF: Tensor, w3_EDF: Tensor,
                   activation: str = "swiglu") -> Tensor:
    """a (N, F) = act(x[t(n)] W1_e(n)) ⊙ x[t(n)] W3_e(n) for grouped rows n (see the module).
    x is used in its dtype (the autocast dtype when the layer runs under autocast); the
    weights are cast to it."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"the Triton kernel computes {', '.join(ACTIVATIONS)}, not {activation}")
    return _GatherGateUp.apply(x_TD, token_index_N, group_sizes_E, w1_EDF, w3_EDF, activation)

